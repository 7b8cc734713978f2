"""Pictures: uncertainty panels, reliability diagrams and t-SNE of distillation features (matplotlib, Agg).

- `write_uncertainty_panels`: per validation image, image | ground truth | prediction | student
  sigma (eq. 6, mean over classes) | FOTF weight (eq. 7), both from the run's `FotfResult`. The
  training loop calls it after every evaluation.
- `reliability_diagram`: accuracy per confidence bin against the diagonal, from the
  `SegmentationMetrics` accumulators (no per-pixel data).
- `tsne_figure`: t-SNE (scikit-learn) of the students' `embedding` on sampled labelled pixels,
  one panel per student (the paper's appendix A.5 figure).

Every PNG is written to a temporary name in the same folder and renamed into place, so a reader
never sees half a file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .data import denormalize, pascal_palette  # noqa: E402
from .fotf import FOTF, FotfConfig, FotfResult  # noqa: E402
from .models import eval_mode, module_device  # noqa: E402

__all__ = [
    "colorize",
    "palette_for",
    "reliability_diagram",
    "tsne_embeddings",
    "tsne_figure",
    "write_uncertainty_panels",
]



def palette_for(num_classes: int, info=None) -> np.ndarray:
    """`(C, 3)` uint8 class colours: the dataset's (`DatasetInfo.palette`) or the generated Pascal VOC map."""
    if info is not None and getattr(info, "palette", None) is not None and len(info.palette) == num_classes:
        return np.asarray(info.palette, dtype=np.uint8)
    return pascal_palette(num_classes)


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255,
             ignore_color: Tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """`(H, W)` class ids -> `(H, W, 3)` uint8 RGB; `ignore_index` and out-of-range ids get `ignore_color`."""
    labels = np.asarray(labels)
    table = np.concatenate([np.asarray(palette, dtype=np.uint8), np.asarray([ignore_color], dtype=np.uint8)])
    n = len(palette)
    return table[np.where((labels >= 0) & (labels < n) & (labels != ignore_index), labels, n)]


def _save_atomic(fig, path: Union[str, os.PathLike], dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp_{path.name}")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------- reliability diagram


def reliability_diagram(
    accuracy: Sequence[float],
    confidence: Sequence[float],
    count: Sequence[int],
    ece: float,
    path: Union[str, os.PathLike],
    title: Optional[str] = None,
    dpi: int = 100,
) -> Path:
    """Reliability diagram (Guo et al. 2017) of equal-width max-softmax confidence bins on [0, 1].

    Args:
        accuracy: `(bins,)` fraction of correct pixels per bin (NaN for an empty bin).
        confidence: `(bins,)` mean confidence per bin (NaN for an empty bin).
        count: `(bins,)` pixels per bin (shown as the share of pixels below the diagram).
        ece: expected calibration error as a fraction (printed in % in the title).
        path: PNG to write (atomically).
        title: text before the ECE in the title.
        dpi: the figure is 5 x 6 inches, so the PNG is `5*dpi x 6*dpi` pixels.

    Returns:
        `path`. Bars: accuracy per bin; red shading: the gap to the bin's mean confidence;
        dashed: perfect calibration. Empty (NaN) bins are left out.
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    conf = np.asarray(confidence, dtype=np.float64)
    cnt = np.asarray(count, dtype=np.float64)
    if not (acc.shape == conf.shape == cnt.shape and acc.ndim == 1 and acc.size > 0):
        raise ValueError(
            f"accuracy, confidence and count must be 1-D of one length, "
            f"got {acc.shape}, {conf.shape}, {cnt.shape}"
        )
    bins = acc.size
    edges = np.linspace(0.0, 1.0, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / bins
    keep = np.isfinite(acc) & np.isfinite(conf) & (cnt > 0)

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(centers[keep], acc[keep], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    gap_bottom = np.minimum(acc, conf)[keep]
    ax.bar(centers[keep], np.abs(conf - acc)[keep], bottom=gap_bottom, width=width, color="tab:red",
           alpha=0.3, edgecolor="tab:red", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{title + ' - ' if title else ''}ECE = {100 * float(ece):.2f}% ({bins} bins)")
    share = cnt / max(cnt.sum(), 1.0)
    hist.bar(centers, share, width=width, edgecolor="black", color="tab:gray")
    hist.set_xlabel("confidence (max softmax)")
    hist.set_ylabel("share of pixels")
    hist.set_ylim(0, max(float(share.max()), 1e-3) * 1.1)
    fig.tight_layout()
    return _save_atomic(fig, path, dpi)


# --------------------------------------------------------------------------- uncertainty panels


def _panel_fotf(fotf, student) -> Tuple["FOTF", bool]:
    """The run's FOTF with student-side sigma (panels show the student), or the defaults when off
    (with p = 0.1, the paper's rate, for a student trained without any dropout)."""
    if fotf is None:
        active = any(site.p > 0 for site in student.mc_dropout_sites())
        return FOTF(FotfConfig(enabled=True, p=None if active else 0.1)), False
    config = fotf.config if isinstance(fotf, FOTF) else fotf
    return FOTF(dataclasses.replace(config, enabled=True, source="student")), True


def _weight_map(result: FotfResult) -> Tuple[torch.Tensor, str]:
    """`(1, 1, h, w)` map of the CE weight (else the KD weight), averaged over classes, and which term it is."""
    weights = result.weights
    weight, term = (weights.ce, "CE") if weights.ce is not None else (weights.kd, "KD")
    return weight.expand_as(result.sigma[:1]).mean(1, keepdim=True), term


@torch.no_grad()
def write_uncertainty_panels(
    student,
    eval_set,
    info,
    out_dir: Union[str, os.PathLike],
    step: int = 0,
    num_images: int = 2,
    fotf=None,
    normalization: str = "imagenet",
    device: Optional[Union[str, torch.device]] = None,
    panel_width: float = 2.6,
    dpi: int = 100,
    indices: Optional[Sequence[int]] = None,
    seed: int = 0,
) -> List[Path]:
    """One PNG per validation image: image | ground truth | prediction | sigma | FOTF weight.

    Args:
        student: a `SegmentationAdapter`.
        eval_set: transformed validation dataset; item i is `{"pixel_values": (3, H, W), "labels": (H, W)}`.
            `num_images` items evenly spread over the set are drawn (the first, the last, and
            between): validation sets of video frames (CamVid) start with near-identical images.
            The choice depends only on the set's length, so successive steps show the same images.
        info: the `DatasetInfo` (palette, ignore colour), or None for a generated palette.
        out_dir: folder of the PNGs (created).
        step: training step, part of the file names `step_{step:07d}_{i:02d}.png`.
        num_images: N images (at most `len(eval_set)`).
        fotf: the run's `FOTF` (or its `FotfConfig`): sigma and the weight are its `FotfResult` for
            the image, from the student. None: `FotfConfig()` defaults (the title says FOTF is off).
        normalization: how `pixel_values` were normalised (to show the image).
        device: where to run the student (default: where its parameters are).
        panel_width: inches per panel; the PNG is `round(5 * panel_width * dpi)` pixels wide and
            `round((panel_width * H / W + 0.8) * dpi)` high.
        dpi: pixels per inch.
        indices: draw these items instead (then `num_images` is ignored).
        seed: seed of the panels' own MC-dropout generator. The global RNG is left untouched, so
            writing panels during training does not change the training run that follows.

    Returns:
        the written PNG paths, in image order; file `step_{step:07d}_{k:02d}.png` is the k-th image
        drawn, and its title names the dataset index.

    The student runs in eval mode: the prediction is the deterministic argmax, sigma (eq. 6,
    averaged over classes for display) comes from the FOTF config's T passes and mode, and the
    weight map is the CE weight (else the KD weight) of that `FotfResult`, averaged over classes.
    Maps live at the logit resolution and are upsampled for display.
    """
    out_dir = Path(out_dir)
    fotf, from_run = _panel_fotf(fotf, student)
    c = fotf.config
    device = torch.device(device) if device is not None else module_device(student)
    palette = palette_for(int(student.num_labels), info)
    ignore_index = getattr(info, "ignore_index", 255)
    ignore_color = getattr(info, "ignore_color", (0, 0, 0))
    rate = "model's own p" if c.p is None else f"p={c.p:g}"

    if indices is None:
        count = min(int(num_images), len(eval_set))
        indices = sorted({round(float(v)) for v in np.linspace(0, len(eval_set) - 1, count)}) if count > 0 else []
    generator = torch.Generator(device=device).manual_seed(int(seed))
    paths: List[Path] = []
    with eval_mode(student):
        for k, i in enumerate(indices):
            sample = eval_set[int(i)]
            labels = torch.as_tensor(sample["labels"])
            size = tuple(labels.shape[-2:])
            pixel_values = sample["pixel_values"]
            pred, sigma, weight, term = _panel_maps(student, fotf, pixel_values, size, device, generator)
            shown = [
                (denormalize(pixel_values, normalization), "image", {}),
                (colorize(labels.numpy(), palette, ignore_index, ignore_color), "ground truth", {}),
                (colorize(pred, palette, ignore_index, ignore_color), "prediction", {}),
                (sigma, f"student sigma (mean over classes)\nT={c.num_samples}, {c.mode}, {rate}",
                 {"cmap": "magma", "vmin": 0.0}),
                (weight, _weight_title(c, term, from_run), {"cmap": "viridis", "vmin": 1.0}),
            ]
            fig = _panel_row(shown, f"step {step}, validation image {i}", size, panel_width)
            paths.append(_save_atomic(fig, out_dir / f"step_{int(step):07d}_{k:02d}.png", dpi))
    return paths


def _panel_maps(student, fotf, pixel_values, size: Tuple[int, int], device: torch.device, generator):
    """The student's prediction and FOTF maps for one image, upsampled to the label size `(H, W)`.

    Args:
        pixel_values: `(3, H', W')` normalised image (tensor or array).
        size: `(H, W)` of the labels.

    Returns:
        `(pred, sigma, weight, term)`: `(H, W)` numpy arrays of the argmax class ids, of sigma
        averaged over classes and of the CE (else KD) weight averaged over classes (both bilinear
        from the logit resolution), and the weight's term, "CE" or "KD".
    """
    x = torch.as_tensor(pixel_values).unsqueeze(0).to(device)
    out = student(x)
    result = fotf(student, out, pixel_values=x, generator=generator)
    weight, term = _weight_map(result)
    with torch.autocast(device_type=device.type, enabled=False):
        logits = F.interpolate(out.logits.float(), size=size, mode="bilinear", align_corners=True)
        pred = logits.argmax(1)[0].cpu().numpy()
        sigma_map = F.interpolate(result.sigma.mean(1, keepdim=True), size=size, mode="bilinear",
                                  align_corners=True)
        weight_map = F.interpolate(weight, size=size, mode="bilinear", align_corners=True)
    return pred, sigma_map[0, 0].cpu().numpy(), weight_map[0, 0].cpu().numpy(), term


def _weight_title(c, term: str, from_run: bool) -> str:
    """Title of the weight panel: the weighting formula with the run's m, kappa and merge rule."""
    weight_name = "(1+m*sigma)^kappa" if c.weighting == "power" else "exp(kappa*m*sigma)"
    merge = c.merge_ce if term == "CE" else c.merge_kd
    if from_run:
        return f"FOTF {term} weight {weight_name}\nm={c.m:g}, kappa={c.kappa:g}, {merge}"
    return f"weight {weight_name}\nFOTF off: m=1, kappa=1, {merge}"


def _panel_row(shown, title: str, size: Tuple[int, int], panel_width: float):
    """A figure with one row of panels, `panel_width` inches each, for images of `size = (H, W)`:
    `shown` holds `(array, title, imshow kwargs)`; panels with kwargs (the scalar maps) get a colour bar."""
    h, w = size
    fig, axes = plt.subplots(1, len(shown), figsize=(len(shown) * panel_width, panel_width * h / w + 0.8))
    for ax, (array, panel_title, kwargs) in zip(axes, shown):
        im = ax.imshow(array, interpolation="nearest", **kwargs)
        ax.set_title(panel_title, fontsize=7)
        ax.axis("off")
        if kwargs:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.97, bottom=0.02, top=0.78, wspace=0.15)
    return fig


# --------------------------------------------------------------------------- t-SNE


@torch.no_grad()
def tsne_embeddings(
    student,
    loader,
    points_per_class: int = 100,
    max_batches: Optional[int] = None,
    ignore_index: int = 255,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Sample labelled pixels of the student's distillation feature `embedding` `(B, D, h, w)`.

    Labels `(B, H, W)` are nearest-downsampled to `(h, w)`; ignored pixels are dropped. Each
    batch contributes at most `points_per_class` random pixels per class, and the pooled points
    are subsampled to `points_per_class` per class at the end (seeded, so two students evaluated
    on the same loader draw comparable sets).

    Returns:
        `features (N, D)` float32 and `labels (N,)` int64, N <= C * points_per_class.
    """

    device = torch.device(device) if device is not None else module_device(student)
    gen = torch.Generator().manual_seed(seed)
    feats: Dict[int, List[torch.Tensor]] = {}
    with eval_mode(student):
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            emb = student(batch["pixel_values"].to(device)).embedding
            if emb is None:
                raise ValueError("the student returned no embedding (the distillation feature) for the t-SNE")
            emb = emb.float().cpu()
            lab = F.interpolate(batch["labels"][:, None].float(), size=emb.shape[-2:], mode="nearest")
            lab = lab[:, 0].long()
            flat = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
            lab = lab.reshape(-1)
            for c in torch.unique(lab).tolist():
                if c == ignore_index:
                    continue
                idx = torch.nonzero(lab == c).squeeze(1)
                idx = idx[torch.randperm(idx.numel(), generator=gen)[:points_per_class]]
                feats.setdefault(int(c), []).append(flat[idx])
    if not feats:
        raise ValueError("no labelled pixel found for the t-SNE (every label was ignore_index?)")
    xs, ys = [], []
    for c in sorted(feats):
        pool = torch.cat(feats[c])
        pool = pool[torch.randperm(pool.shape[0], generator=gen)[:points_per_class]]
        xs.append(pool)
        ys.append(torch.full((pool.shape[0],), c, dtype=torch.int64))
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def tsne_figure(
    students: Union[Mapping[str, object], Sequence[Tuple[str, object]]],
    loader,
    path: Union[str, os.PathLike],
    id2label: Optional[Mapping[int, str]] = None,
    palette: Optional[np.ndarray] = None,
    points_per_class: int = 100,
    max_batches: Optional[int] = None,
    perplexity: float = 30.0,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    dpi: int = 100,
) -> Path:
    """Side-by-side t-SNE maps of the students' `embedding` on the same labelled pixels (paper A.5).

    Args:
        students: `{name: student}` or `[(name, student), ...]`, e.g. CIRKD vs CIRKD+FOTF.
        loader: validation batches `{"pixel_values": (B, 3, H, W), "labels": (B, H, W)}`.
        path: PNG to write (atomically); `4.5 * len(students)` x 5 inches.
        id2label, palette: class names / `(C, 3)` uint8 colours (default: generated).
        points_per_class, max_batches, seed, device: see `tsne_embeddings`.
        perplexity: t-SNE perplexity (capped below a third of the number of points).

    Returns:
        `path`.
    """
    from sklearn.manifold import TSNE  # optional dependency (the `tsne` extra): imported only here

    items = list(students.items()) if isinstance(students, Mapping) else list(students)
    if not items:
        raise ValueError("give at least one student")
    embedded = []
    for name, student in items:
        x, y = tsne_embeddings(student, loader, points_per_class=points_per_class, max_batches=max_batches,
                               seed=seed, device=device)
        tsne = TSNE(n_components=2, perplexity=min(perplexity, max(1.0, (len(x) - 1) / 3)), init="pca",
                    learning_rate="auto", random_state=seed)
        embedded.append((name, tsne.fit_transform(x), y))
    num_classes = max(int(y.max()) for _, _, y in embedded) + 1
    if palette is None:
        palette = palette_for(num_classes)
    names = {int(k): str(v) for k, v in (id2label or {}).items()}
    colors = np.asarray(palette, dtype=np.float64) / 255.0

    fig, axes = plt.subplots(1, len(embedded), figsize=(4.5 * len(embedded), 5), squeeze=False)
    present = sorted(set(np.concatenate([y for _, _, y in embedded]).tolist()))
    for ax, (name, points, y) in zip(axes[0], embedded):
        ax.scatter(points[:, 0], points[:, 1], c=colors[y], s=4, linewidths=0)
        ax.set_title(f"{name} ({len(y)} pixels)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=colors[c], label=names.get(c, str(c))) for c in present]
    ncol = min(len(handles), max(1, math.ceil(len(handles) / 2)))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return _save_atomic(fig, path, dpi)
