"""Release side: the model card (`README.md` with a `model-index`) and the upload of an output folder.

The card is rendered by `huggingface_hub.ModelCard.from_template` from the Jinja template
`fotf_hf/templates/fotf_student.md` (package data, so an installed package finds it too; the only
copy). Pass `template_path=` to render your own template with the same variables (those passed to
`ModelCard.from_template` in `build_model_card`).

The card's metadata carries `model-index` results for `mean_iou`, `ece` (`metric_config`
"<bins>-bins") and pixel accuracy, task `image-segmentation`, with the dataset name, type and split.
Licence: `other` (with NVIDIA's licence link and a note) when the teacher or the initialisation is an
`nvidia/` SegFormer / MiT checkpoint, or a local folder whose own card says `license: other`;
`apache-2.0` otherwise.

`push_to_hub` uploads a finished folder (`create_repo(exist_ok=True)` + `upload_folder`, never
`ModelCard.push_to_hub`, which validates online). It never modifies the folder; any failure
(offline mode, network, authentication) becomes a `HubUploadError` that says how to retry.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants, get_token
from transformers import AutoConfig

from .metrics import UNCERTAINTY_ROWS

__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "HubUploadError",
    "NVIDIA_LICENSE_LINK",
    "build_model_card",
    "card_license",
    "default_template_path",
    "push_to_hub",
    "write_model_card",
]

DEFAULT_IGNORE_PATTERNS = ("checkpoints/*", ".tmp*", "logs/*")
NVIDIA_LICENSE_LINK = "https://github.com/NVlabs/SegFormer/blob/master/LICENSE"
NVIDIA_LICENSE_NAME = "nvidia-segformer"

# FOTF options shown on the card, in this order, with their labels.
_FOTF_ROWS = (
    ("num_samples", "T (MC samples)"),
    ("p", "dropout p"),
    ("m", "m"),
    ("kappa", "kappa"),
    ("weighting", "weighting"),
    ("merge_kd", "merge (KD)"),
    ("merge_ce", "merge (CE)"),
    ("apply_to", "applied to"),
    ("mode", "sampling mode"),
    ("source", "uncertainty source"),
)


class HubUploadError(RuntimeError):
    """The upload failed; the local folder is untouched and the message says how to retry."""


def default_template_path() -> Path:
    """The packaged card template, `fotf_hf/templates/fotf_student.md`."""
    return Path(__file__).resolve().parent / "templates" / "fotf_student.md"


# --------------------------------------------------------------------------- licence


def _is_hub_id(name: Optional[str]) -> bool:
    """True for `owner/name` strings that are not local paths (what the Hub metadata may reference)."""
    if not name:
        return False
    name = str(name)
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _is_nvidia_segformer(name: Optional[str]) -> bool:
    lowered = str(name or "").lower()
    return lowered.startswith("nvidia/") and ("segformer" in lowered or "mit-b" in lowered)


def _local_card_license(name: Optional[str]) -> Optional[Dict[str, Optional[str]]]:
    """The licence fields of a local model folder's own card (a teacher trained here), if it has one."""
    if not name or not (Path(name) / "README.md").is_file():
        return None
    try:
        data = ModelCard.load(Path(name) / "README.md").data
    except Exception:  # an unparsable card says nothing about the licence
        return None
    return {"license": data.license, "license_name": getattr(data, "license_name", None),
            "license_link": getattr(data, "license_link", None)}


def card_license(teacher: Optional[str] = None, base_model: Optional[str] = None) -> Dict[str, Optional[str]]:
    """Licence metadata and a note for a student distilled from `teacher`, initialised from `base_model`.

    Returns:
        `{"license", "license_name", "license_link", "text"}`: `other` + NVIDIA's licence when either
        is an `nvidia/` SegFormer/MiT checkpoint (those Hub cards are `license: other` since
        2022-08), or a local folder whose card is `other` (the restriction is inherited);
        `apache-2.0` otherwise. `text` is the card's licence paragraph.
    """
    for role, name in (("teacher", teacher), ("initialisation", base_model)):
        if _is_nvidia_segformer(name):
            return {
                "license": "other",
                "license_name": NVIDIA_LICENSE_NAME,
                "license_link": NVIDIA_LICENSE_LINK,
                "text": (
                    f"`license: other`. The {role} `{name}` is an NVIDIA SegFormer checkpoint, distributed "
                    f"under NVIDIA's own licence ({NVIDIA_LICENSE_LINK}), not an open-source one. This model "
                    "was derived from it, so check those terms (they restrict use, e.g. to non-commercial "
                    "research) before using or redistributing it. This note is not legal advice."
                ),
            }
        inherited = _local_card_license(name)
        if inherited and inherited["license"] == "other":
            link = inherited.get("license_link")
            return {
                "license": "other",
                "license_name": inherited.get("license_name") or NVIDIA_LICENSE_NAME,
                "license_link": link,
                "text": (
                    f"`license: other`, inherited from the {role} `{name}`, whose card is `license: other`"
                    + (f" ({link})" if link else "")
                    + ". Check those terms before using or redistributing this model. "
                    "This note is not legal advice."
                ),
            }
    return {
        "license": "apache-2.0",
        "license_name": None,
        "license_link": None,
        "text": "Apache-2.0 (the code and, unless a teacher or initialisation says otherwise, "
                "these weights).",
    }


# --------------------------------------------------------------------------- card


def _pct(value: Any) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "n/a" if value != value else f"{100 * value:.2f}"


def _fotf_rows(fotf: Any) -> Optional[List[Dict[str, str]]]:
    if fotf is None:
        return None
    fotf = getattr(fotf, "config", fotf)  # a FOTF module holds its settings in `.config` (a FotfConfig)
    get = fotf.get if isinstance(fotf, Mapping) else (lambda k, d=None: getattr(fotf, k, d))
    if get("enabled", True) is False:
        return None
    rows = []
    for key, label in _FOTF_ROWS:
        value = get(key, None)
        if key == "p" and value is None:
            value = "the model's own dropout"
        if value is not None:
            rows.append({"name": label, "value": str(value)})
    return rows


def _id2label_from_folder(folder: Optional[Path]) -> Optional[Dict[int, str]]:
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        return {int(k): str(v) for k, v in config["id2label"].items()}
    except (TypeError, OSError, ValueError, KeyError, AttributeError):
        return None


def _needs_remote_code(folder: Optional[Path]) -> bool:
    """Whether the card shows `trust_remote_code=True`: a DeepLabV3 / PSPNet folder (or an unknown one).

    A SegFormer student is a plain transformers model: its card shows the plain pipeline call.
    """
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (TypeError, OSError, ValueError):
        return True
    return "auto_map" in config or str(config.get("model_type", "")).startswith("fotf_")


# Written by `python benchmarks/latency.py --card_table ...`; ships with the package, as the template.
LATENCY_TABLE = Path(__file__).resolve().parent / "templates" / "latency.json"


def architecture_key(config) -> str:
    """What fixes a segmentation model's inference cost, from its `PretrainedConfig`: e.g.
    `fotf_deeplabv3/r18/w64/h128`, `segformer/d2-2-2-2/h32-64-160-256/dec256` (the number of
    classes, which changes only the 1x1 classifier, is left out)."""
    if config.model_type == "segformer":
        return (f"segformer/d{'-'.join(map(str, config.depths))}/h{'-'.join(map(str, config.hidden_sizes))}"
                f"/dec{config.decoder_hidden_size}")
    return f"{config.model_type}/r{config.backbone_depth}/w{config.backbone_base_width}/h{config.head_width}"


def speed_rows(folder: Optional[Path], table_path: Union[str, os.PathLike] = LATENCY_TABLE
               ) -> Optional[Dict[str, Any]]:
    """The card's "what the student buys" rows: every measured teacher -> student pair of the latency
    benchmark whose student has the architecture of the model in `folder` (None when there is none).

    Returns:
        `{"machine": host line, "command": benchmark command, "rows": [{"teacher", "size", "batch",
        "teacher_ms", "student_ms", "speedup", "flops_ratio"} (text cells)]}` or None.
    """
    try:
        key = architecture_key(AutoConfig.from_pretrained(str(folder)))
        table = json.loads(Path(table_path).read_text())
    except (TypeError, OSError, ValueError, AttributeError):  # no folder / config / table: no speed section
        return None
    rows = []
    for pair in table["pairs"]:
        if pair["student_key"] != key:
            continue
        t, s = pair["teacher_ms"], pair["student_ms"]
        rows.append({"teacher": pair["teacher"], "size": pair["size"], "batch": pair["batch"],
                     "teacher_ms": f"{t['eager']:.0f} / {t['onnx']:.0f}",
                     "student_ms": f"{s['eager']:.0f} / {s['onnx']:.0f}",
                     "speedup": f"{t['eager'] / s['eager']:.2f}x / {t['onnx'] / s['onnx']:.2f}x",
                     "flops_ratio": f"{pair['flops_ratio']:.3f}"})
    return {"machine": table["machine"], "command": table["command"], "rows": rows} if rows else None


def _describe_evaluation(evaluation: Optional[Mapping[str, Any]]) -> str:
    evaluation = dict(evaluation or {})
    scales = evaluation.get("scales") or [1.0]
    size = evaluation.get("eval_size")
    parts = ["whole image at native resolution" if not size else f"whole image resized to {size[0]}x{size[1]}"]
    if list(scales) == [1.0]:
        parts.append("single scale")
    else:
        parts.append("scales " + ", ".join(f"{float(s):g}" for s in scales))
    if evaluation.get("flip"):
        parts.append("+ horizontal flip")
    if evaluation.get("mc_samples"):
        parts.append(f"MC-dropout predictive mean of {evaluation['mc_samples']} samples")
    parts.append("logits upsampled bilinearly (align_corners=True) to the label size")
    return ", ".join(parts)


def build_model_card(
    metrics: Mapping[str, Any],
    dataset_name: str,
    split: str,
    method: Optional[str] = None,
    teacher: Optional[str] = None,
    fotf: Any = None,
    steps: Optional[int] = None,
    command: Optional[str] = None,
    base_model: Optional[str] = None,
    id2label: Optional[Mapping[int, str]] = None,
    model_name: str = "fotf-student",
    repo_id: Optional[str] = None,
    evaluation: Optional[Mapping[str, Any]] = None,
    template_path: Optional[Union[str, os.PathLike]] = None,
    all_evaluations: Optional[Mapping[str, Mapping[str, Any]]] = None,
    remote_code: bool = True,
    speed: Optional[Mapping[str, Any]] = None,
):
    """Render the student's `huggingface_hub.ModelCard` (nothing is written).

    Args:
        metrics: `evaluate_model` / `SegmentationMetrics.compute()` dict (fractions; shown in %).
        dataset_name: the dataset (`build_dataset` name or Hub id), the model-index `dataset.type`.
        split: evaluated split (model-index `dataset.split`).
        method: e.g. `kd+fotf`; teacher / base_model: checkpoint names or folders (drive the licence).
        fotf: FOTF settings (a dict like `asdict(FotfConfig)`, a `FotfConfig`, a `FOTF` module) or None.
        steps: optimisation steps; command: the command that reproduces the run.
        id2label: class names for the per-class table (default: class ids).
        model_name: the model-index name and the card's title.
        repo_id: Hub id used in the loading snippet (default: a folder path placeholder).
        evaluation: evaluation settings (`flip`, `scales`, `mc_samples`, `eval_size`) to describe the protocol.
        template_path: Jinja template (default `default_template_path()`).
        all_evaluations: `metrics.json["evaluations"]` (`{key: {settings, metrics}}`): every split and
            setting the model was scored with, listed in one table (None = only `metrics`).
        remote_code: the usage snippets show `trust_remote_code=True` (the model code travels with
            the weights, DeepLabV3 / PSPNet) next to `import fotf_hf`; False: a plain transformers
            model (SegFormer).
        speed: `speed_rows(folder)`: this architecture's latency next to its teachers' (None: none).

    Returns:
        `huggingface_hub.ModelCard`; `card.data.eval_results` holds `mean_iou`, `ece`, `accuracy`.
    """
    bins = len(metrics["reliability"]["count"]) if "reliability" in metrics else 10
    eval_results = _eval_results(metrics, dataset_name, split, bins)
    lic = card_license(teacher, base_model)
    data = _card_data(model_name, lic, method, base_model, dataset_name, eval_results)
    names = {int(k): str(v) for k, v in (id2label or {}).items()}
    per_class = [{"name": names.get(i, str(i)), "iou": _pct(v)}
                 for i, v in enumerate(metrics.get("per_class_iou", []))]
    results = _results_rows(metrics, bins)
    if teacher:
        kind = f"distilled from `{teacher}` with {method}"
    else:
        kind = f"trained with {method}" if method else "trained"
    return ModelCard.from_template(
        data,
        template_path=str(template_path or default_template_path()),
        model_name=model_name,
        summary=f"A semantic-segmentation student for {dataset_name} ({len(per_class)} classes), {kind}.",
        repo_id=repo_id or f"path/to/{model_name}",
        dataset_name=dataset_name,
        split=split,
        results=results,
        per_class=per_class,
        ece_bins=bins,
        evaluation=_describe_evaluation(evaluation),
        all_evaluations=_all_evaluations_rows(all_evaluations),
        method=method or "not recorded",
        teacher=f"`{teacher}`" if teacher else "none",
        base_model=f"`{base_model}`" if base_model else "random initialisation",
        steps=steps if steps is not None else "not recorded",
        fotf=_fotf_rows(fotf),
        command=command or "# not recorded",
        license_text=lic["text"],
        remote_code=remote_code,
        speed=speed,
    )


def _eval_results(metrics: Mapping[str, Any], dataset_name: str, split: str, bins: int) -> List[EvalResult]:
    """The card's `model-index` results: `mean_iou`, `ece` (`<bins>-bins`) and, when known, pixel accuracy."""
    shared = dict(task_type="image-segmentation", task_name="Semantic Segmentation",
                  dataset_type=dataset_name, dataset_name=dataset_name, dataset_split=split)
    eval_results = [
        EvalResult(metric_type="mean_iou", metric_name="mIoU", metric_value=float(metrics["mean_iou"]),
                   **shared),
        EvalResult(metric_type="ece", metric_name="ECE", metric_value=float(metrics["ece"]),
                   metric_config=f"{bins}-bins", metric_args={"n_bins": bins}, **shared),
    ]
    if metrics.get("pixel_accuracy") is not None:
        eval_results.append(EvalResult(metric_type="accuracy", metric_name="pixel accuracy",
                                       metric_value=float(metrics["pixel_accuracy"]), **shared))
    return eval_results


def _card_data(
    model_name: str, lic: Mapping[str, Any], method: Optional[str], base_model: Optional[str],
    dataset_name: str, eval_results: List[EvalResult],
) -> ModelCardData:
    """The card's metadata: licence, tags, base model and dataset (Hub ids only), model-index."""
    tags = ["image-segmentation", "semantic-segmentation", "knowledge-distillation", "fotf"]
    if method:
        tags.append(str(method))
    return ModelCardData(
        model_name=model_name,
        license=lic["license"],
        license_name=lic["license_name"],
        license_link=lic["license_link"],
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=tags,
        base_model=base_model if _is_hub_id(base_model) else None,
        datasets=[dataset_name] if _is_hub_id(dataset_name) else None,
        metrics=["mean_iou", "ece"],
        eval_results=eval_results,
    )


def _results_rows(metrics: Mapping[str, Any], bins: int) -> List[Dict[str, str]]:
    """The card's results table: mIoU, ECE, accuracies (%), then the uncertainty metrics that are known."""
    return [
        {"name": "mIoU (%)", "value": _pct(metrics["mean_iou"])},
        {"name": f"ECE (%, {bins} bins)", "value": _pct(metrics["ece"])},
        {"name": "pixel accuracy (%)", "value": _pct(metrics.get("pixel_accuracy"))},
        {"name": "mean class accuracy (%)", "value": _pct(metrics.get("mean_accuracy"))},
    ] + [{"name": name, "value": fmt(metrics[key])} for key, name, fmt in UNCERTAINTY_ROWS if metrics.get(key) is not None]


def _all_evaluations_rows(all_evaluations: Optional[Mapping[str, Mapping[str, Any]]]) -> List[Dict[str, str]]:
    """One row per `metrics.json["evaluations"]` entry, sorted by key: split, protocol, mIoU and ECE (%)."""
    return [
        {"key": key, "split": e["settings"].get("split", "?"),
         "protocol": _describe_evaluation(e["settings"]).rsplit(", logits", 1)[0],
         "miou": _pct(e["metrics"]["mean_iou"]), "ece": _pct(e["metrics"]["ece"])}
        for key, e in sorted((all_evaluations or {}).items())
    ]


def write_model_card(
    out_dir: Union[str, os.PathLike],
    metrics: Mapping[str, Any],
    dataset_name: str,
    split: str,
    method: Optional[str] = None,
    teacher: Optional[str] = None,
    fotf: Any = None,
    steps: Optional[int] = None,
    command: Optional[str] = None,
    base_model: Optional[str] = None,
    id2label: Optional[Mapping[int, str]] = None,
    model_name: Optional[str] = None,
    repo_id: Optional[str] = None,
    evaluation: Optional[Mapping[str, Any]] = None,
    template_path: Optional[Union[str, os.PathLike]] = None,
    all_evaluations: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Path:
    """Write the card to `out_dir/README.md` atomically (temporary file + rename); returns the path.

    Same arguments as `build_model_card`, with these defaults from the folder: `id2label` from
    `out_dir/config.json`, `model_name` the folder's name, `remote_code` from the config's model
    type, and, when no `command` is given but the folder holds the run's resolved
    `fotf_config.yaml`, the command that re-runs it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if id2label is None:
        id2label = _id2label_from_folder(out)
    if command is None and (out / "fotf_config.yaml").is_file():
        command = "accelerate launch scripts/distill.py --config fotf_config.yaml"
    card = build_model_card(
        metrics, dataset_name, split, method=method, teacher=teacher, fotf=fotf, steps=steps, command=command,
        base_model=base_model, id2label=id2label,
        model_name=model_name or out.resolve().name or "fotf-student",
        repo_id=repo_id, evaluation=evaluation, template_path=template_path, all_evaluations=all_evaluations,
        remote_code=_needs_remote_code(out), speed=speed_rows(out),
    )
    path = out / "README.md"
    tmp = out / ".tmp_README.md"
    card.save(tmp)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- upload


# Token-shaped text a server or proxy may echo back in an error (an `Authorization: Bearer ...`
# header, an `hf_...` access token), masked even when we do not know the token's value.
_TOKEN_PATTERNS = (re.compile(r"(?i)(bearer\s+)[^\s'\",;}\]]+"), re.compile(r"\bhf_[A-Za-z0-9]{20,}"))


def _redact(text: str, token: Optional[str]) -> str:
    """`text` with the token passed, the environment's and the stored login's, and token-shaped strings masked."""
    secrets = {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}
    try:
        secrets.add(get_token())  # what HfApi sends when token=None
    except Exception:  # a broken login store must not hide the upload error itself
        pass
    for secret in sorted(filter(None, secrets), key=len, reverse=True):  # longest first: no partial leftovers
        text = text.replace(secret, "***")
    text = _TOKEN_PATTERNS[0].sub(r"\1***", text)
    return _TOKEN_PATTERNS[1].sub("hf_***", text)


def _retry_hint(folder: Path, repo_id: str, private: bool, ignore_patterns: Sequence[str]) -> str:
    excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in ignore_patterns)
    visibility = "--private" if private else "--no-private"
    return (
        f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))} . {visibility} {excludes}"
        " (the CLI formerly named `huggingface-cli upload`), or call fotf_hf.hub.push_to_hub again / rerun "
        "scripts/distill.py with --push_to_hub"
    )


def push_to_hub(
    folder: Union[str, os.PathLike],
    repo_id: str,
    private: bool = True,
    token: Optional[str] = None,
    api=None,
    commit_message: str = "Upload FOTF student (fotf-hf)",
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
):
    """Upload a finished output folder to a (private by default) Hub model repo.

    Args:
        folder: the run's output folder (weights, `config.json`, card `README.md`, pictures).
        repo_id: `owner/name` (or `name` for the logged-in user).
        private: visibility when the repo is created (an existing repo keeps its own).
        token: Hub token; None = `HF_TOKEN` / the stored login (read by huggingface_hub; never printed).
        api: an `HfApi`-like object (tests inject a fake); default `HfApi(token=token)`.
        commit_message: the commit's title.
        ignore_patterns: left out of the upload (checkpoints, temporary folders, tracker logs).
            Everything else goes up, including `preprocessor_config.json` and the `*.py` model code
            that `write_inference_files` puts next to the weights.

    Returns:
        what `upload_folder` returns (a `CommitInfo` for the real API).

    Raises:
        HubUploadError: anything failed (`HF_HUB_OFFLINE=1`, no network, no/invalid token, ...); the
            message names the cause and the retry command. The folder is never modified.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"push_to_hub: {folder} is not a folder")
    if not repo_id:
        raise ValueError("push_to_hub needs a repo_id such as 'username/model-name'")
    ignore_patterns = list(ignore_patterns)
    try:
        if api is None:
            api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        target = getattr(url, "repo_id", None) or repo_id
        return api.upload_folder(
            repo_id=target, folder_path=str(folder), commit_message=commit_message,
            ignore_patterns=ignore_patterns,
        )
    except Exception as exc:
        # Only the redacted text leaves this block: the raw exception (and its own chain) may quote the
        # request's Authorization header, so it is neither chained nor kept as __context__ (raised below).
        detail = _redact(f"{type(exc).__name__}: {exc}", token)
    hint = ""
    if constants.HF_HUB_OFFLINE:
        hint = (" HF_HUB_OFFLINE=1 is set: run the retry from a shell without it, on a machine with "
                "network access.")
    raise HubUploadError(
        f"upload of {folder} to the Hub repo {repo_id!r} failed ({detail}).{hint} The local folder is "
        f"intact (nothing was changed or deleted). To retry: "
        f"{_retry_hint(folder, repo_id, private, ignore_patterns)}."
    ) from None
