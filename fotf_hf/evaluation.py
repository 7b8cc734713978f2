"""Whole-image evaluation of a `SegmentationAdapter`: mIoU, accuracies and ECE, exact under Accelerate.

`evaluate_model` is what the training loop calls every `run.eval_every` steps; `run_evaluation` is
the library side of `scripts/evaluate.py` (load a saved student, build the dataset, evaluate,
write `metrics.json`, `reliability.png` and the model card).

Protocol (CIRKD's `eval.py`): whole image, no sliding window; the logits are upsampled to the label
size (bilinear, `align_corners=True`) before softmax/argmax. Optional multi-scale and horizontal
flip average the *upsampled logits* over views, as CIRKD does. Optional MC dropout replaces the
deterministic prediction by the predictive mean of T dropout samples of the head (softmax of each
upsampled sample, averaged over samples and views); calibration is then measured on that mean.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import yaml
from accelerate.data_loader import BatchSamplerShard, DataLoaderAdapter
from torch.utils.data import DataLoader
from transformers import AutoModelForSemanticSegmentation

from .config import load_config
from .data import SegmentationTransform, build_dataset, create_dataloader
from .hub import write_model_card
from .metrics import UNCERTAINTY_ROWS, SegmentationMetrics
from .models import SegmentationAdapter, eval_mode, module_device, warn_if_no_image_processor
from .viz import reliability_diagram

logger = logging.getLogger(__name__)

__all__ = [
    "evaluate_model",
    "evaluation_key",
    "format_metrics_table",
    "load_student",
    "parse_key_values",
    "predict",
    "run_evaluation",
]


# --------------------------------------------------------------------------- helpers


def _is_prepared(loader) -> bool:
    return isinstance(loader, DataLoaderAdapter)


def _shard_without_padding(loader, num_processes: int, process_index: int):
    """This process's share of a plain map-style `DataLoader`: whole batches `i, i + W, ...`, no padding.

    Uses accelerate's `BatchSamplerShard(even_batches=False)`, so each batch is one of the batches
    the single-process loader yields (same composition, nothing duplicated); a process may get one
    batch fewer than another, or none.
    """
    if loader.batch_sampler is None:
        raise ValueError("multi-process evaluation needs a batched DataLoader (batch_size set, not None)")
    shard = BatchSamplerShard(
        loader.batch_sampler, num_processes, process_index, split_batches=False, even_batches=False
    )
    return DataLoader(
        loader.dataset,
        batch_sampler=shard,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        timeout=loader.timeout,
    )


def _check_options(scales: Sequence[float], mc_samples: int) -> Tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive factors, got {scales}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0 or mc_samples == 1:
        raise ValueError(
            f"mc_samples = {mc_samples!r}: use 0 for the deterministic prediction or T >= 2 for the "
            "MC-dropout predictive mean"
        )
    return scales


def _upsample(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


@torch.no_grad()
def predict(
    student,
    pixel_values: torch.Tensor,
    size: Tuple[int, int],
    flip: bool = False,
    scales: Tuple[float, ...] = (1.0,),
    mc_samples: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, bool, Optional[torch.Tensor]]:
    """What the evaluation scores for one batch (the app and the processor tests reuse it).

    Args:
        student: a `SegmentationAdapter` (in eval mode for a deterministic prediction).
        pixel_values: `(B, 3, h, w)` normalised images; `size`: `(H, W)` of the label maps.
        flip, scales: test-time views (horizontal flip, rescaled inputs), averaged.
        mc_samples: T >= 2 for T exact MC-dropout passes (0: one deterministic pass).

    Returns:
        `(B, C, H, W)` fp32 logits averaged over views, or MC-dropout mean probabilities; `is_probs`;
        and with MC dropout the per-pixel uncertainty `(B, H, W)`: the standard deviation over the T
        passes (population, so within [0, 0.5]) of the probability of the class the mean predicts,
        averaged over views like the prediction (else None).
    """
    total, total_sigma = None, None
    for scale in scales:
        x = pixel_values
        if scale != 1.0:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)
        views = [(x, False)] + ([(torch.flip(x, dims=[3]), True)] if flip else [])
        per_scale, per_scale_sigma = None, None
        for view, flipped in views:
            sigma = None
            if mc_samples:
                # T exact MC-dropout passes from the first dropout site (see SegmentationAdapter.sample_logits)
                samples = student.sample_logits(mc_samples, features=student.forward_features(view),
                                                generator=generator)
                pred, square = 0.0, 0.0
                # One sample at a time at full resolution: T x B x C x H x W would not fit for Cityscapes.
                # The passes are drawn lazily: each runs here, under the caller's autocast like the
                # forward above, not inside the fp32 block (bf16 features into fp32 layers fail).
                for s in samples:
                    with torch.autocast(device_type=view.device.type, enabled=False):
                        prob = torch.softmax(_upsample(s, size), dim=1)
                        pred, square = pred + prob, square + prob * prob
                pred = pred / mc_samples
                top = pred.argmax(1, keepdim=True)
                var = (square / mc_samples).gather(1, top) - pred.gather(1, top) ** 2
                sigma = var.clamp_min(0).sqrt().squeeze(1)
            else:
                logits = student(view).logits
                with torch.autocast(device_type=view.device.type, enabled=False):
                    pred = _upsample(logits, size)
            if flipped:
                pred = torch.flip(pred, dims=[3])
                sigma = None if sigma is None else torch.flip(sigma, dims=[2])
            per_scale = pred if per_scale is None else per_scale + pred
            if sigma is not None:
                per_scale_sigma = sigma if per_scale_sigma is None else per_scale_sigma + sigma
        total = per_scale / len(views) if total is None else total + per_scale / len(views)
        if per_scale_sigma is not None:
            total_sigma = per_scale_sigma / len(views) + (0 if total_sigma is None else total_sigma)
    return total / len(scales), bool(mc_samples), None if total_sigma is None else total_sigma / len(scales)


def _per_sample_states(
    metrics: SegmentationMetrics, pred: torch.Tensor, labels: torch.Tensor, is_probs: bool,
    sigma: Optional[torch.Tensor] = None,
):
    """Accumulators of each sample of the batch, stacked: `{name: (B, ...)}` (for `gather_for_metrics`)."""
    states = []
    for b in range(pred.shape[0]):
        one = SegmentationMetrics(
            metrics.num_classes, metrics.ignore_index, metrics.ece_bins, device=pred.device
        )
        one.update(pred[b : b + 1], labels[b : b + 1], is_probs=is_probs,
                   uncertainty=None if sigma is None else sigma[b : b + 1])
        states.append(one.state_tensors())
    return {name: torch.stack([s[name] for s in states]) for name in states[0]}


# --------------------------------------------------------------------------- evaluate_model


def evaluate_model(
    student,
    loader,
    accelerator=None,
    num_classes: Optional[int] = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    mc_samples: int = 0,
    ignore_index: int = 255,
    ece_bins: int = 10,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Any]:
    """Dataset-level mIoU / accuracy / ECE of `student` on `loader`, whole-image inference.

    Args:
        student: a `SegmentationAdapter` (or anything with its interface): `student(x).logits`
            `(B, C, h, w)`; for MC dropout also `forward_features(x)` and
            `sample_logits(T, features=..., generator=...)` (T logits `(B, C, h, w)`). Not DDP-wrapped (pass
            `accelerator.unwrap_model(...)`); evaluated under `no_grad` in eval mode, and every
            submodule's train/eval flag is restored afterwards.
        loader: yields `{"pixel_values": (B, 3, H, W), "labels": (B, H, W) int64}`; a plain
            `DataLoader` or one already prepared by Accelerate.
        accelerator: optional `accelerate.Accelerator`; with several processes every process must
            call this function (the accumulators are summed across them).
        num_classes: C; default `student.num_labels`.
        flip: also predict the horizontally flipped image and average the logits (CIRKD `--flip-eval`).
        scales: input scale factors (bilinear, `align_corners=True`); the upsampled logits are
            averaged over scales (CIRKD `--scales`).
        mc_samples: 0 = deterministic prediction; T >= 2 = MC-dropout predictive mean: the softmax of
            T exact MC-dropout passes (every dropout site of the prediction path; each upsampled
            first), averaged; metrics (argmax and
            confidence) are taken on that mean probability.
        ignore_index: label value excluded from every metric.
        ece_bins: equal-width confidence bins of the ECE (10 in the paper).
        generator: RNG for the MC-dropout masks (None = the global RNG).

    Returns:
        `SegmentationMetrics.compute()`: `mean_iou`, `mean_iou_cirkd`, `per_class_iou` (C,),
        `pixel_accuracy`, `mean_accuracy`, `per_class_accuracy`, `ece` (fractions, not %),
        `reliability` {`accuracy`, `confidence`, `count`, `bin_edges`}, `num_pixels`; and the
        uncertainty metrics `nll` (nats), `brier`, `auroc_msp` / `aurc_msp` (max-softmax confidence
        as a detector of the model's own errors), with MC dropout also `auroc_sigma` /
        `aurc_sigma` (the MC standard deviation of the predicted class; else None). Identical on
        every process.

    Exact with several processes: no padded sample is counted twice (how: `_process_share`).
    Integer counts make mIoU and accuracies bit-identical to a one-process run; the ECE's float64
    confidence sums differ only by summation order (~1e-16). This assumes every process computes
    the same logits for an image: weights left memory-mapped by `from_pretrained` do not (see
    `load_student`).

    Mixed precision: may be called inside `accelerator.autocast()` / `torch.autocast`; the model
    runs under it, while upsampling, averaging, softmax and metrics run in fp32. No autocast is
    added here (the caller decides the precision of the forward).
    """
    scales = _check_options(scales, mc_samples)
    if num_classes is None:
        num_classes = int(student.num_labels)
    device = module_device(student, getattr(accelerator, "device", None))
    metrics = SegmentationMetrics(num_classes, ignore_index=ignore_index, ece_bins=ece_bins, device=device)

    world = 1 if accelerator is None else int(accelerator.num_processes)
    loader, gather = _process_share(loader, accelerator, world)
    _score_batches(student, loader, metrics, device, accelerator, gather, flip, scales, mc_samples, generator)
    if world > 1 and not gather:
        metrics.reduce(accelerator)
    return metrics.compute()


def _process_share(loader, accelerator, world: int) -> Tuple[Any, bool]:
    """What this process iterates, and whether each batch's accumulators must go through a gather.

    A loader that Accelerate prepared with `even_batches=True` (the default) pads the last round
    with repeated samples, which would be counted twice. We therefore do not let it pad:

    - plain map-style loader (what the training loop passes): each process iterates whole batches
      `rank, rank + W, ...` of the same loader (`BatchSamplerShard(even_batches=False)`), so no
      sample is repeated, and the `C*C + 3*bins` accumulator numbers are summed once at the end
      (`SegmentationMetrics.reduce`). No per-pixel traffic, no collective per batch, and a loader
      we build here is never registered with the accelerator (it would be saved in checkpoints).
    - loader already prepared with padding (`even_batches=True`, or dispatched batches): the
      per-sample accumulators of each batch, `(B, C*C + 3*bins)` numbers, go through
      `accelerator.gather_for_metrics`, which drops the padded duplicates; every process adds the
      gathered sums. Still no per-pixel traffic, but one gather per batch.
    - loader prepared with `even_batches=False`: already unpadded; summed at the end as above.
    """
    gather = False
    if world > 1:
        if _is_prepared(loader):
            batch_sampler = getattr(loader, "batch_sampler", None)
            gather = getattr(batch_sampler, "even_batches", True) is not False
        elif isinstance(loader.dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "multi-process evaluation of an IterableDataset: prepare the loader first "
                "(accelerator.prepare_data_loader) so that gather_for_metrics can drop the padded samples"
            )
        else:
            loader = _shard_without_padding(loader, world, int(accelerator.process_index))
    return loader, gather


def _score_batches(
    student, loader, metrics: SegmentationMetrics, device, accelerator, gather: bool, flip: bool,
    scales: Tuple[float, ...], mc_samples: int, generator: Optional[torch.Generator],
) -> None:
    """Predict every batch of `loader` (eval mode, no grad) and add it to `metrics`; `gather`: via
    `accelerator.gather_for_metrics`."""
    with eval_mode(student), torch.no_grad():
        for batch in loader:
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            size = tuple(labels.shape[-2:])
            pred, is_probs, sigma = predict(student, pixel_values, size, flip, scales, mc_samples, generator)
            if gather:
                gathered = accelerator.gather_for_metrics(_per_sample_states(metrics, pred, labels, is_probs, sigma))
                metrics.load_state_tensors({name: t.sum(0) for name, t in gathered.items()}, add=True)
            else:
                metrics.update(pred, labels, is_probs=is_probs, uncertainty=sigma)


# --------------------------------------------------------------------------- run_evaluation


def parse_key_values(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """`["num_val=8", "image_size=[64, 96]"]` -> `{"num_val": 8, "image_size": [64, 96]}` (YAML values)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


@torch.no_grad()
def _own_memory(model):
    """Copy every parameter and buffer into fresh torch allocations (ties kept); returns `model`.

    `from_pretrained` leaves the weights inside the memory-mapped safetensors file at 8- or
    16-byte-aligned addresses, and oneDNN's CPU convolutions round differently on those (logits
    differ by ~1e-6, the ECE by ~1e-9) from the same weights after any copy, which every
    `.to("cpu:0")` under a multi-process Accelerator makes. Fresh (64-byte-aligned) copies make a
    loaded model compute exactly as the in-memory model after training, in 1 or N processes.
    """
    copies = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or tensor.device.type != "cpu":
                    continue
                key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
                if key not in copies:
                    copies[key] = tensor.data.clone()
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = copies[key]
                else:
                    store[name] = copies[key]
    return model


def load_student(model: Union[str, os.PathLike, Any]):
    """A `SegmentationAdapter` from a saved folder or Hub id, a `PreTrainedModel`, or a student as is."""
    if hasattr(model, "sample_logits") and hasattr(model, "num_labels"):
        return model

    if isinstance(model, (str, os.PathLike)):
        warn_if_no_image_processor(model)  # folders of fotf-hf <= 0.1 still load; the warning says how to add one
        model = _own_memory(AutoModelForSemanticSegmentation.from_pretrained(str(model)))
    return SegmentationAdapter(model)


def format_metrics_table(metrics: Mapping[str, Any], id2label: Optional[Mapping[int, str]] = None) -> str:
    """Markdown table: one row of IoU (%) per class, then mIoU, ECE and pixel accuracy (%)."""
    per_class = metrics["per_class_iou"]
    names = {int(k): str(v) for k, v in (id2label or {}).items()}

    def pct(value) -> str:
        return "n/a" if value is None or value != value else f"{100 * value:.2f}"

    rows = ["| class | IoU (%) |", "| --- | --- |"]
    rows += [f"| {names.get(i, str(i))} | {pct(v)} |" for i, v in enumerate(per_class)]
    rows += [
        f"| **mIoU** | **{pct(metrics['mean_iou'])}** |",
        f"| **ECE ({len(metrics['reliability']['count'])} bins)** | **{pct(metrics['ece'])}** |",
        f"| **pixel accuracy** | **{pct(metrics['pixel_accuracy'])}** |",
    ]
    for key, name, fmt in UNCERTAINTY_ROWS:
        if metrics.get(key) is not None:
            rows.append(f"| {name} | {fmt(metrics[key])} |")
    return "\n".join(rows)



def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".tmp_{path.name}")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def _training_record(folder: Optional[Path]) -> Dict[str, Any]:
    """What the training loop left in a model folder: method, teacher, FOTF, steps, base model."""
    if folder is None or not (folder / "fotf_config.yaml").is_file():
        return {}
    try:
        cfg = load_config(folder / "fotf_config.yaml")
    except Exception as exc:  # a hand-edited or older config must not block the evaluation
        logger.warning("could not read %s (%s); the model card will not name method/teacher",
                       folder / "fotf_config.yaml", exc)
        return {}
    steps = cfg.optim.max_steps
    try:
        steps = int(json.loads((folder / "metrics.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {
        "method": cfg.method.name + ("+fotf" if cfg.fotf.enabled else ""),
        "teacher": cfg.teacher.pretrained if cfg.needs_teacher and cfg.teacher is not None else None,
        "fotf": asdict(cfg.fotf) if cfg.fotf.enabled else None,
        "steps": steps,
        "base_model": cfg.student.pretrained,
        "command": "accelerate launch scripts/distill.py --config fotf_config.yaml",
    }


def evaluation_key(settings: Mapping[str, Any]) -> str:
    """The `metrics.json["evaluations"]` key of one evaluation setting, e.g. `test@180x240` or
    `validation@native+flip+scales0.75,1,1.25+mc5`: split, resolution, then what differs from a
    single-scale, unflipped, deterministic pass."""
    size = settings.get("eval_size")
    key = f"{settings['split']}@{'native' if not size else 'x'.join(str(int(v)) for v in size)}"
    if settings.get("flip"):
        key += "+flip"
    scales = [float(v) for v in settings.get("scales") or [1.0]]
    if scales != [1.0]:
        key += "+scales" + ",".join(f"{v:g}" for v in scales)
    if settings.get("mc_samples"):
        key += f"+mc{int(settings['mc_samples'])}"
    return key


def run_evaluation(
    model: Union[str, os.PathLike, Any],
    dataset: str,
    root: Optional[str] = None,
    split: str = "validation",
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    mc_samples: int = 0,
    batch_size: int = 1,
    normalization: Optional[str] = None,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    dataset_options: Optional[Mapping[str, Any]] = None,
    eval_size: Optional[Sequence[int]] = None,
    num_workers: int = 0,
    accelerator=None,
    write_outputs: bool = True,
    print_table: bool = True,
) -> Dict[str, Any]:
    """Evaluate a saved student on a dataset split and write the results (`scripts/evaluate.py`).

    Args:
        model: a saved folder or Hub id (loaded with `AutoModelForSemanticSegmentation` after
            `import fotf_hf`), a `PreTrainedModel`, or a `SegmentationAdapter`.
        dataset, root, dataset_options: `fotf_hf.data.build_dataset(dataset, root, **options)`.
        split: the split to evaluate.
        flip, scales, mc_samples: see `evaluate_model`.
        batch_size: images per batch and process (> 1 needs equal image sizes, or `eval_size`).
        normalization: `imagenet` | `cirkd_bgr`; default the model config's `image_normalization`,
            else `imagenet`.
        output_dir: where to write; default the model folder (required for other model kinds).
        eval_size: `(h, w)` to resize images to, or None for native resolution.
        accelerator: an `Accelerator` for multi-process runs (`accelerate launch`), or None.
        write_outputs: write `metrics.json`, `reliability.png` and the card `README.md` (main
            process only). An existing `metrics.json` (e.g. the training record) is kept: the
            results are merged in under `"evaluations"`, one entry per split and setting
            (`evaluation_key`), so scoring test does not replace val.
        print_table: print the Markdown table on the main process.

    Returns:
        the `evaluate_model` metrics dict.
    """
    model_dir, output_dir = _output_folder(model, output_dir, write_outputs)
    student = load_student(model)
    config = getattr(getattr(student, "model", None), "config", None)
    if normalization is None:
        normalization = getattr(config, "image_normalization", None) or "imagenet"

    main = accelerator is None or accelerator.is_main_process
    datasets, info, id2label = _checked_dataset(student, config, dataset, root, dataset_options, split, main)
    loader = _eval_loader(datasets[split], info.num_labels, eval_size, normalization, batch_size, num_workers)
    if accelerator is not None:
        student.to(accelerator.device)
    scales = tuple(float(s) for s in scales)
    metrics = evaluate_model(student, loader, accelerator=accelerator, num_classes=info.num_labels, flip=flip,
                             scales=scales, mc_samples=mc_samples)

    if main and print_table:
        print(format_metrics_table(metrics, id2label))
    if main and write_outputs:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        settings = {
            "model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
            "dataset": dataset, "split": split, "num_images": len(datasets[split]), "flip": flip,
            "scales": list(scales), "mc_samples": mc_samples, "normalization": normalization,
            "eval_size": None if eval_size is None else list(eval_size),
        }
        _write_outputs(out, settings, metrics, model_dir, id2label)
    return metrics


def _output_folder(
    model: Union[str, os.PathLike, Any], output_dir: Optional[Union[str, os.PathLike]], write_outputs: bool
) -> Tuple[Optional[Path], Optional[Union[str, os.PathLike, Path]]]:
    """`(model_dir, output_dir)`: the model's local folder (or None), and where to write (default: it)."""
    model_dir = Path(model) if isinstance(model, (str, os.PathLike)) and Path(model).is_dir() else None
    if output_dir is None:
        if model_dir is None:
            if write_outputs:
                raise ValueError("output_dir is required unless model is a local folder")
        else:
            output_dir = model_dir
    return model_dir, output_dir


def _checked_dataset(
    student, config, dataset: str, root: Optional[str], dataset_options: Optional[Mapping[str, Any]],
    split: str, main: bool,
) -> Tuple[Mapping[str, Any], Any, Dict[int, str]]:
    """`build_dataset`'s `(datasets, info)`, checked to have `split` and the student's class count, and
    the dataset's `id2label` (warns on the main process when the model names the classes differently)."""
    datasets, info = build_dataset(dataset, root=root, **dict(dataset_options or {}))
    if split not in datasets:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; it has: {', '.join(datasets)}")
    if int(student.num_labels) != info.num_labels:
        raise ValueError(
            f"the model predicts {student.num_labels} classes but {dataset!r} has {info.num_labels}: "
            "evaluate it on the dataset it was trained for"
        )
    # The labels being scored are the dataset's, so its class names label the table and the card.
    id2label = dict(info.id2label)
    model_names = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    if main and model_names and model_names != id2label:
        logger.warning("the model's id2label %s differs from the dataset's %s; scoring class ids as they are",
                       model_names, id2label)
    return datasets, info, id2label


def _eval_loader(
    data, num_labels: int, eval_size: Optional[Sequence[int]], normalization: str, batch_size: int,
    num_workers: int,
) -> DataLoader:
    """The evaluation `DataLoader` of one split: eval transform (resize, `normalization`), no shuffling."""
    transform = SegmentationTransform(
        train=False,
        num_labels=num_labels,
        resize=None if eval_size is None else tuple(eval_size),
        normalization=normalization,
    )
    return create_dataloader(data.with_transform(transform), batch_size=batch_size, train=False,
                             num_workers=num_workers)


def _write_outputs(
    out: Path, settings: Dict[str, Any], metrics: Dict[str, Any], model_dir: Optional[Path],
    id2label: Dict[int, str],
) -> None:
    """Merge the results into `out/metrics.json`, then write `reliability.png` and the card `README.md`."""
    evaluations = _add_to_metrics_json(out / "metrics.json", settings, metrics)
    rel = metrics["reliability"]
    reliability_diagram(rel["accuracy"], rel["confidence"], rel["count"], metrics["ece"],
                        out / "reliability.png")
    trained = _training_record(model_dir)
    write_model_card(
        out,
        metrics=metrics,
        dataset_name=settings["dataset"],
        split=settings["split"],
        method=trained.get("method"),
        teacher=trained.get("teacher"),
        fotf=trained.get("fotf"),
        steps=trained.get("steps"),
        command=trained.get("command"),
        base_model=trained.get("base_model"),
        id2label=id2label,
        evaluation=settings,
        all_evaluations=evaluations,
    )


def _add_to_metrics_json(path: Path, settings: Dict[str, Any], metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Add one `"evaluations"` entry (`evaluation_key(settings)`) to the record at `path`, keeping what it
    held (a record that is not a JSON object is replaced); returns the record's `"evaluations"`."""
    record: Dict[str, Any] = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except ValueError:
            record = {}
        if not isinstance(record, dict):
            record = {}
    entry = {"settings": settings, "metrics": metrics}
    record.setdefault("evaluations", {})[evaluation_key(settings)] = entry
    _write_json_atomic(path, record)
    return record["evaluations"]
