"""Typed experiment configuration: dataclasses, loaded from YAML, overridable from the command line.

One experiment = one `ExperimentConfig`:

```yaml
base: ../base/camvid.yaml        # optional, one level of inheritance (path relative to this file)
student: {arch: deeplabv3, backbone: resnet18}
teacher: {arch: deeplabv3, backbone: resnet101, pretrained: outputs/teacher}
data: {name: camvid, root: data/camvid, crop_size: [360, 360]}
method: {name: kd}
fotf: {enabled: true, kappa: 10, m: 10}
optim: {lr: 0.02, max_steps: 40000, batch_size: 16}
run: {output_dir: outputs/kd_fotf, mixed_precision: auto}
```

Command-line overrides use dotted keys, either `--fotf.kappa 5` or `--set fotf.kappa=5`
(values are parsed as YAML, so `--data.crop_size [64,64]` works). Everything is validated before
any work starts: unknown keys list the valid ones with a close-match suggestion, values are
range-checked and typed (YAML reads `1e-4` as a string; it is coerced to float here).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .data.builders import DATASETS
from .data.checks import SPLIT_CHECKS
from .data.transforms import NORMALIZATIONS, ON_BAD_SAMPLE
from .fotf import FotfConfig
from .losses import get_method, method_names
from .models.factory import ARCHS

# Choice lists live with the concept that owns them (imported above); a field names its list in
# `metadata={"choices": ...}`, which `validate` checks and `_coerce` uses to read YAML's `no`/`off`.
OPTIMIZERS = ("sgd", "adamw")  # built by fotf_hf.training.build.build_optimizer
# `auto` follows the hardware at the start of training: `fotf_hf.training.precision.resolve_mixed_precision`.
PRECISIONS = ("no", "fp16", "bf16", "auto")


def _choices(default: str, choices) -> Any:
    return field(default=default, metadata={"choices": tuple(choices)})


def _choice_list(f: dataclasses.Field) -> tuple:
    """A field's choices (a tuple, or a callable returning the current ones, e.g. the method registry)."""
    choices = f.metadata.get("choices", ())
    return tuple(choices() if callable(choices) else choices)


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the valid choices."""


@dataclass
class ModelConfig:
    """A student or teacher network.

    Args:
        arch: one of `ARCHS`.
        backbone: resnet18 | resnet50 | resnet101 (deeplabv3, pspnet) or mit-b0 .. mit-b5 (segformer).
        pretrained: local folder or Hub id for `from_pretrained` (None = random init).
        mc_dropout_p: dropout probability at the MC site (the head dropout before the classifier).
        overrides: extra model-config fields, e.g. `{backbone_base_width: 16}` for a narrow net.
    """

    arch: str = _choices("deeplabv3", ARCHS)
    backbone: str = "resnet18"
    pretrained: Optional[str] = None
    mc_dropout_p: float = 0.1
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Dataset, splits and transforms (see `fotf_hf.data.build_dataset`).

    Args:
        name: one of `DATASETS`.
        root: dataset folder (camvid, cityscapes, voc), or None to read it from `FOTF_<NAME>_ROOT`
            (e.g. `FOTF_CAMVID_ROOT`).
        options: builder-specific options (e.g. `{path: ..., image_column: ..., n_train: 200}`).
        crop_size: `[h, w]` training crop in pixels.
        scale_range: `[min, max]` random scale factor for training.
        train_size: `[h, w]` to resize training images to before the random scale/crop (None = as
            stored); CPU-scale protocols use it to train at reduced resolution.
        eval_size: `[h, w]` to resize validation images to, or None for full resolution.
        normalization: one of `NORMALIZATIONS` (`cirkd_bgr` for weights converted from CIRKD).
        num_workers: DataLoader workers per process.
        on_bad_sample: what a corrupt/invalid training sample does: raise, or skip it with a warning
            (a replacement sample keeps the batch full).
        max_skip_fraction: with `skip`, the run stops once more than this fraction of the training
            split's rows turned out bad.
        check: how the evaluation splits are checked before training (`fotf_hf.data.scan_split`):
            `quick` (headers, sizes, label ranges), `full` (also decodes every image) or `off`.
        max_eval_samples: evaluate on the first N validation samples only (None = all).
    """

    name: str = _choices("synthetic-streets", DATASETS)
    root: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "validation"
    crop_size: List[int] = field(default_factory=lambda: [96, 128])
    scale_range: List[float] = field(default_factory=lambda: [0.5, 2.0])
    train_size: Optional[List[int]] = None
    eval_size: Optional[List[int]] = None
    normalization: str = _choices("imagenet", NORMALIZATIONS)
    num_workers: int = 0
    on_bad_sample: str = _choices("raise", ON_BAD_SAMPLE)
    max_skip_fraction: float = 0.05
    check: str = _choices("quick", SPLIT_CHECKS)
    max_eval_samples: Optional[int] = None


@dataclass
class MethodConfig:
    """The distillation method: which loss terms the criterion is built from.

    Args:
        name: a registered method (`fotf_hf.losses.method_names()`; `scripts/distill.py --help` lists
            them). `ce` = plain supervised training (no teacher).
        kd_weight: weight of the pixel KD term (methods other than ce); CIRKD's `--lambda-kd`.
        kd_temperature: KD temperature (1 in CIRKD and FOTF).
        aux_weight: weight of the auxiliary-head CE (0.4).
        options: keyword arguments of the method's own loss modules, e.g. `{pixel_weight: 0.01}`.
    """

    # Registered methods, looked up when validating: a method module imported later counts too.
    name: str = field(default="ce", metadata={"choices": method_names})
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    aux_weight: float = 0.4
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser and iteration-based poly schedule `lr * (1 - step/max_steps)^power`.

    `batch_size` is per process; the global batch is `batch_size * processes * grad_accum_steps`.
    """

    optimizer: str = _choices("sgd", OPTIMIZERS)
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_steps: int = 40000
    batch_size: int = 16
    grad_accum_steps: int = 1
    poly_power: float = 0.9
    max_grad_norm: Optional[float] = None


@dataclass
class RunConfig:
    """Where outputs go, precision, logging, evaluation and checkpoint cadence."""

    output_dir: str = "outputs/run"
    seed: int = 0
    mixed_precision: str = _choices("auto", PRECISIONS)
    eval_every: int = 800
    save_every: int = 800
    log_every: int = 10
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    # A new run into a folder holding another run's files moves them aside (training/checkpoint.py).
    overwrite: bool = False
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])
    num_panels: int = 2
    eval_batch_size: int = 1
    progress_bar: bool = True


@dataclass
class HubConfig:
    """Upload of the final folder (`fotf_hf.hub.push_to_hub`)."""

    push_to_hub: bool = False
    repo_id: Optional[str] = None
    private: bool = True


@dataclass
class ExperimentConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: Optional[ModelConfig] = None
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    fotf: FotfConfig = field(default_factory=FotfConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    @property
    def needs_teacher(self) -> bool:
        return get_method(self.method.name).needs_teacher or (self.fotf.enabled and self.fotf.source == "teacher")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml_with_base(path: str | Path) -> Dict[str, Any]:
    """Read a YAML config; a top-level `base:` names one parent file (relative to this one).

    Only one level is allowed so that a reader sees every value in at most two files.
    """
    path = Path(path)
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base).resolve()
    parent = _read_yaml(base_path)
    if "base" in parent:
        raise ConfigError(
            f"{str(base_path)!r} (the base of {str(path)!r}) has its own `base:`; only one level of inheritance is allowed"
        )
    return _deep_merge(parent, data)


def _suggest(name: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_types(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


# The unquoted words YAML 1.1 (PyYAML's safe_load) reads as booleans, by the boolean they become.
_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _coerce(value: Any, tp, where: str, choices: typing.Sequence[str] = ()):
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} may not be null")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is str and isinstance(value, bool):
        # YAML turned an unquoted word into a bool (`mixed_precision: no` -> False). Take it back as
        # that word only when exactly one of the field's declared `choices` (dataclass field metadata)
        # is a YAML spelling of this bool: False -> "no" for run.mixed_precision. Any other str field
        # (no choices, or none spelled so) still rejects the bool, with a hint to quote it.
        words = [c for c in choices if c.lower() in _YAML_BOOL_WORDS[value]]
        if len(words) == 1:
            return words[0]
        hint = f"; choose one of: {', '.join(choices)}" if choices else ""
        raise ConfigError(
            f"{where} = {value!r} is not a valid str: YAML reads unquoted yes/no/on/off/true/false as a "
            f"boolean, quote the value{hint}"
        )
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
        if origin in (list, List):
            (item_tp,) = typing.get_args(tp)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin in (dict, Dict):
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} = {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def _build(cls, data: Any, where: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    choices = {f.name: _choice_list(f) for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            prefix = f"{where}." if where else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{_suggest(key, valid)}; valid keys"
                f"{' of ' + where if where else ''}: {', '.join(valid)}"
            )
        kwargs[key] = _coerce(value, types_[key], f"{where}.{key}" if where else key, choices[key])
    return cls(**kwargs)


def parse_overrides(args: List[str]) -> Dict[str, Any]:
    """Turn `--a.b value`, `--a.b=value` and `--set a.b=value` into a nested dict.

    Values are parsed as YAML scalars/lists (`5` -> int, `[64,64]` -> list, `null` -> None).
    """
    nested: Dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--set":
            if i + 1 >= len(args) or "=" not in args[i + 1]:
                raise ConfigError("--set needs KEY=VALUE, e.g. --set fotf.kappa=5")
            key, raw = args[i + 1].split("=", 1)
            i += 2
        elif arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
                i += 1
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"override {arg} has no value; write {arg} VALUE or {arg}=VALUE")
                key, raw = body, args[i + 1]
                i += 2
        else:
            raise ConfigError(f"cannot parse command-line argument {arg!r}; overrides look like --fotf.kappa 5")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str] | Dict[str, Any]] = None) -> ExperimentConfig:
    """Build and validate an `ExperimentConfig` from a YAML file plus command-line overrides."""
    data = load_yaml_with_base(path) if path is not None else {}
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        data = _deep_merge(data, overrides)
    # A teacher section given only partially still builds a full ModelConfig.
    cfg = _build(ExperimentConfig, data, "")
    validate(cfg)
    return cfg


def _choice(value: str, valid: typing.Sequence[str], where: str) -> None:
    if value not in valid:
        raise ConfigError(f"{where} = {value!r} is not valid{_suggest(value, valid)}; choose one of: {', '.join(valid)}")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: ExperimentConfig) -> None:
    """Range- and choice-check every field; raise `ConfigError` naming the first bad one."""
    for where, section in ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)):
        for f in dataclasses.fields(section) if section is not None else ():
            if f.metadata.get("choices"):
                _choice(getattr(section, f.name), _choice_list(f), f"{where}.{f.name}")
    models = [("student", cfg.student)] + ([("teacher", cfg.teacher)] if cfg.teacher is not None else [])
    for name, model in models:
        _check(0.0 <= model.mc_dropout_p < 1.0, f"{name}.mc_dropout_p = {model.mc_dropout_p} must be in [0, 1)")
    d = cfg.data
    _check(len(d.crop_size) == 2 and all(s >= 8 for s in d.crop_size), f"data.crop_size = {d.crop_size} must be [h, w], each >= 8")
    _check(
        len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1],
        f"data.scale_range = {d.scale_range} must be [min, max] with 0 < min <= max",
    )
    _check(d.train_size is None or (len(d.train_size) == 2 and min(d.train_size) >= 8), f"data.train_size = {d.train_size} must be null or [h, w]")
    _check(d.eval_size is None or (len(d.eval_size) == 2 and min(d.eval_size) >= 8), f"data.eval_size = {d.eval_size} must be null or [h, w]")
    _check(d.num_workers >= 0, f"data.num_workers = {d.num_workers} must be >= 0")
    _check(0 <= d.max_skip_fraction <= 1, f"data.max_skip_fraction = {d.max_skip_fraction} must be in [0, 1]")
    _check(d.max_eval_samples is None or d.max_eval_samples >= 1, "data.max_eval_samples must be null or >= 1")
    mth = cfg.method
    _check(mth.kd_weight >= 0 and mth.aux_weight >= 0, "method.kd_weight and method.aux_weight must be >= 0")
    _check(mth.kd_temperature > 0, f"method.kd_temperature = {mth.kd_temperature} must be > 0")
    f = cfg.fotf
    if f.enabled:
        try:
            f.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if mth.name == "ce" and f.apply_to == "kd":
            raise ConfigError("fotf.apply_to = 'kd' with method.name = 'ce' weights nothing: use apply_to 'ce' (paper Table 2)")
    o = cfg.optim
    _check(0 < o.lr < float("inf"), f"optim.lr = {o.lr} must be a finite number > 0")
    _check(o.max_steps >= 1, f"optim.max_steps = {o.max_steps} must be >= 1")
    _check(o.batch_size >= 1, f"optim.batch_size = {o.batch_size} must be >= 1")
    _check(o.grad_accum_steps >= 1, f"optim.grad_accum_steps = {o.grad_accum_steps} must be >= 1")
    _check(o.weight_decay >= 0 and 0 <= o.momentum < 1, "optim.weight_decay must be >= 0 and optim.momentum in [0, 1)")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm must be null or > 0")
    r = cfg.run
    for key in ("eval_every", "save_every", "log_every"):
        _check(getattr(r, key) >= 1, f"run.{key} = {getattr(r, key)} must be >= 1")
    _check(r.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
    _check(r.eval_batch_size >= 1, "run.eval_batch_size must be >= 1")
    if cfg.needs_teacher:
        if cfg.teacher is None:
            raise ConfigError(
                f"method.name = {mth.name!r} needs a teacher: add a `teacher:` section with arch, backbone and pretrained"
            )
        if not cfg.teacher.pretrained:
            raise ConfigError(
                "teacher.pretrained is empty: a distillation teacher must be trained weights (a folder written by "
                "scripts/distill.py or scripts/convert_cirkd_checkpoint.py, or a Hub id)"
            )
    if cfg.hub.push_to_hub and not cfg.hub.repo_id:
        raise ConfigError("hub.push_to_hub is true but hub.repo_id is empty: set --hub.repo_id USER/NAME")


def flatten_config(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists and scalars are leaves."""
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a partial file never replaces a good one)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    tmp.replace(path)
