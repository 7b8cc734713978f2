"""What the training loop trains: data, student and teacher, criterion + FOTF, optimiser and schedule,
each built from the typed config (`ExperimentConfig`); config errors surface as `ConfigError`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from ..config import ConfigError, ExperimentConfig
from ..data import SegmentationTransform, SeededTransformDataset, build_dataset, create_dataloader, scan_splits
from ..fotf import FOTF
from ..losses import build_criterion
from ..models import SegmentationAdapter, create_model
from ..models.factory import check_pretrained


def check_weights(cfg: ExperimentConfig) -> None:
    """Every `pretrained` the run needs exists here or on a reachable Hub (before any other work)."""
    roles = [("student", cfg.student)] + ([("teacher", cfg.teacher)] if cfg.needs_teacher else [])
    for role, model_cfg in roles:
        try:
            check_pretrained(model_cfg.pretrained, f"{role}.pretrained")
        except FileNotFoundError as err:
            hint = " (a teacher: train one with method ce, or convert CIRKD's)" if role == "teacher" else ""
            raise ConfigError(f"{err}{hint}") from None


def build_models(cfg: ExperimentConfig, num_labels: int, id2label: Dict[int, str]):
    """Student (random init or `pretrained`) and frozen teacher, both as `SegmentationAdapter`."""
    def make(model_cfg, role):
        try:
            return create_model(
                model_cfg.arch,
                model_cfg.backbone,
                num_labels=num_labels,
                id2label=id2label,
                pretrained=model_cfg.pretrained,
                mc_dropout_p=model_cfg.mc_dropout_p,
                **model_cfg.overrides,
            )
        except ValueError as err:
            raise ConfigError(f"{role}: {err}") from None

    student = SegmentationAdapter(make(cfg.student, "student"))
    teacher = None
    if cfg.needs_teacher:
        path = cfg.teacher.pretrained
        teacher_classes = _saved_num_labels(path)
        if teacher_classes is not None and teacher_classes != student.num_labels:
            raise ConfigError(
                f"teacher has {teacher_classes} classes but the student/dataset has {student.num_labels}: "
                "distillation needs the same label set (check teacher.pretrained and data.name)"
            )
        teacher = SegmentationAdapter(make(cfg.teacher, "teacher"))
        if teacher.num_labels != student.num_labels:
            raise ConfigError(
                f"teacher has {teacher.num_labels} classes but the student/dataset has {student.num_labels}: "
                "distillation needs the same label set (check teacher.pretrained and data.name)"
            )
        t_labels = getattr(teacher.model.config, "id2label", None)
        if t_labels and id2label and {int(k): v for k, v in t_labels.items()} != {int(k): v for k, v in id2label.items()}:
            raise ConfigError(
                f"teacher id2label {dict(t_labels)} differs from the dataset's {dict(id2label)}: the class order "
                "must match for pixel-wise distillation"
            )
        teacher.eval()
        teacher.requires_grad_(False)
    return student, teacher


def _saved_num_labels(path: str) -> Optional[int]:
    """Class count in a local model folder's config.json (None for Hub ids or unreadable folders)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        data = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if "id2label" in data:
        return len(data["id2label"])
    return data.get("num_labels")


def build_data(cfg: ExperimentConfig):
    """`(train_set, eval_set, info)`: the seeded, augmented training split and the evaluation split."""
    d = cfg.data
    datasets, info = build_dataset(d.name, root=d.root, **d.options)
    for split in (d.train_split, d.eval_split):
        if split not in datasets:
            raise ConfigError(f"dataset {d.name!r} has no split {split!r}; it has: {', '.join(datasets)}")
    train_tf = SegmentationTransform(
        train=True,
        resize=None if d.train_size is None else tuple(d.train_size),
        crop_size=tuple(d.crop_size),
        scale_range=tuple(d.scale_range),
        normalization=d.normalization,
        num_labels=info.num_labels,
        on_bad_sample=d.on_bad_sample,
    )
    eval_tf = SegmentationTransform(
        train=False,
        resize=None if d.eval_size is None else tuple(d.eval_size),
        normalization=d.normalization,
        num_labels=info.num_labels,
    )
    if d.check != "off":  # every non-training split, before any step: a bad file is not found at step 800
        scan_splits(datasets, info, [s for s in datasets if s != d.train_split], full=d.check == "full")
    train_set = SeededTransformDataset(datasets[d.train_split], train_tf, seed=cfg.run.seed,
                                       max_skip_fraction=d.max_skip_fraction, split=d.train_split)
    eval_raw = datasets[d.eval_split]
    if d.max_eval_samples is not None:
        eval_raw = eval_raw.select(range(min(d.max_eval_samples, len(eval_raw))))
    eval_set = eval_raw.with_transform(eval_tf)
    return train_set, eval_set, info


def build_loaders(cfg: ExperimentConfig, train_set, eval_set):
    """Training loader (shuffled, seeded) and evaluation loader (in order)."""
    train = create_dataloader(train_set, batch_size=cfg.optim.batch_size, train=True,
                              num_workers=cfg.data.num_workers, seed=cfg.run.seed)
    evaluation = create_dataloader(eval_set, batch_size=cfg.run.eval_batch_size, train=False,
                                   num_workers=cfg.data.num_workers, seed=cfg.run.seed)
    return train, evaluation


def build_criterion_and_fotf(cfg: ExperimentConfig, student, teacher, num_labels: int):
    """The method's loss terms (`fotf_hf.losses.build_criterion`) and the FOTF weighting (or None)."""
    criterion = build_criterion(cfg.method, cfg.data.name, student=student, teacher=teacher, num_labels=num_labels)
    return criterion, FOTF.from_config(cfg.fotf)


def build_optimizer(cfg: ExperimentConfig, module: torch.nn.Module):
    """`(optimizer, scheduler)`: `optim.optimizer` over the trainable parameters, poly schedule."""
    o = cfg.optim
    params = [p for p in module.parameters() if p.requires_grad]
    if o.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    # Poly schedule per optimiser step, as CIRKD: lr * (1 - step / max_steps) ** power.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / o.max_steps) ** o.poly_power
    )
    return optimizer, scheduler
