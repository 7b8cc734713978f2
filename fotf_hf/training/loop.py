"""The one Accelerate training loop behind `scripts/distill.py`.

It owns devices, precision, distribution, state and I/O; it builds the data, models, FOTF and
the criterion from the config and composes them, but knows no loss formula. Checkpoints are
full Accelerate states (student + loss modules, optimiser, scheduler, RNG, step and data
position), written to a temporary folder and renamed into place, so a run killed at any moment
leaves the previous checkpoint loadable; `run.resume: latest` continues bit-identically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from ..config import ConfigError, ExperimentConfig, save_config
from ..fotf import FOTF
from .log_history import LOG_HISTORY_FILE, append_log_line, truncate_log_history
from .module import DistillationModule
from .precision import resolve_mixed_precision

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf; the message names the step and the term."""


@dataclass
class TrainerState:
    """Loop counters saved with every checkpoint (registered with `accelerator.save_state`)."""

    step: int = 0
    best_miou: float = -1.0
    best_step: int = -1
    history: List[Dict[str, Any]] = field(default_factory=list)
    # Training wall time up to the last checkpoint, so a resumed run reports its whole cost.
    wall_time_s: float = 0.0

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# --------------------------------------------------------------------------- building blocks


def build_models(cfg: ExperimentConfig, num_labels: int, id2label: Dict[int, str]):
    """Student (random init or `pretrained`) and frozen teacher, both as `SegmentationStudent`."""
    from ..models import SegmentationStudent, create_model

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

    student = SegmentationStudent(make(cfg.student, "student"))
    teacher = None
    if cfg.needs_teacher:
        path = cfg.teacher.pretrained
        if not (Path(path).exists() or ("/" in path and not path.startswith((".", "/")))):
            raise ConfigError(
                f"teacher.pretrained = {path!r} does not exist: train a teacher first (scripts/distill.py with "
                "method ce) or convert one (scripts/convert_cirkd_checkpoint.py)"
            )
        teacher_classes = _saved_num_labels(path)
        if teacher_classes is not None and teacher_classes != student.num_labels:
            raise ConfigError(
                f"teacher has {teacher_classes} classes but the student/dataset has {student.num_labels}: "
                "distillation needs the same label set (check teacher.pretrained and data.name)"
            )
        teacher = SegmentationStudent(make(cfg.teacher, "teacher"))
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
    from ..data import SegmentationTransform, build_dataset

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
    train_set = SeededTransformDataset(datasets[d.train_split], train_tf, seed=cfg.run.seed)
    eval_raw = datasets[d.eval_split]
    if d.max_eval_samples is not None:
        eval_raw = eval_raw.select(range(min(d.max_eval_samples, len(eval_raw))))
    eval_set = eval_raw.with_transform(eval_tf)
    return train_set, eval_set, info


class SeededTransformDataset(torch.utils.data.Dataset):
    """Applies a random transform with a seed derived from (run seed, epoch, sample index).

    Augmentations then do not depend on how many batches were drawn before, or in which worker,
    so a resumed run that skips the batches of the interrupted epoch sees exactly the same
    crops and flips as an uninterrupted one.
    """

    def __init__(self, dataset, transform, seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        sample_seed = (self.seed * 1_000_003 + self.epoch * 7_919 + int(index) * 104_729) % (2**31 - 1)
        row = self.dataset[int(index)]
        batch = {key: [value] for key, value in row.items()}
        out = self.transform(batch, generator=torch.Generator().manual_seed(sample_seed))
        return {key: value[0] for key, value in out.items()}


def build_criterion_and_fotf(cfg: ExperimentConfig, student, teacher, num_labels: int):
    from ..losses import build_criterion

    criterion = build_criterion(cfg.method, cfg.data.name, student=student, teacher=teacher, num_labels=num_labels)
    return criterion, FOTF.from_config(cfg.fotf)


def build_optimizer(cfg: ExperimentConfig, module: torch.nn.Module):
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


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run.output_dir) / CHECKPOINT_DIR


def find_checkpoint(cfg: ExperimentConfig) -> Optional[Path]:
    """Resolve `run.resume` (`latest`, a path, or None) to a complete checkpoint folder."""
    resume = cfg.run.resume
    if not resume:
        return None
    if resume == "latest":
        root = _checkpoint_root(cfg)
        done = sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if root.is_dir() else []
        if not done:
            logger.warning("run.resume = latest but %s holds no checkpoint: starting from scratch", root)
            return None
        return done[-1]
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"run.resume = {resume!r} is not a checkpoint folder (or use 'latest')")
    return path


def save_checkpoint(accelerator: Accelerator, cfg: ExperimentConfig, step: int) -> Path:
    """`save_state` into a temporary folder, then rename: the previous checkpoint stays valid until then."""
    root = _checkpoint_root(cfg)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        kept = sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in kept[: -cfg.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_student(student, folder: Path) -> None:
    """`save_pretrained` into `folder` via a temporary sibling and a rename (never half-written)."""
    folder = Path(folder)
    tmp = folder.parent / f".tmp_{folder.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    student.model.save_pretrained(tmp)
    if folder.exists():
        old = folder.parent / f".old_{folder.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def _publish_files(src: Path, dst: Path) -> None:
    """Move every file of `src` into `dst` with atomic renames (for the final output folder)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        os.replace(item, dst / item.name)
    src.rmdir()


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the loop


def _infinite_batches(loader, accelerator, start_step_in_epoch: int, epoch: int, dataset):
    """Yield `(epoch, batch)` forever; the first epoch skips the batches a resumed run already used."""
    while True:
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, start_step_in_epoch) if start_step_in_epoch else loader
        start_step_in_epoch = 0
        for batch in epoch_loader:
            yield epoch, batch
        epoch += 1


def train(cfg: ExperimentConfig, accelerator: Optional[Accelerator] = None) -> Dict[str, Any]:
    """Train `cfg.student` with `cfg.method` (+ FOTF); returns the final validation metrics.

    Writes into `cfg.run.output_dir`: the student (`config.json`, `model.safetensors`), the
    resolved `fotf_config.yaml`, `metrics.json`, `best/`, `checkpoints/`, `panels/`,
    `reliability.png`, tracker logs, `log_history.jsonl` (one JSON line per logging step: lr, loss,
    its terms and the `fotf/` statistics; see `training/log_history.py`) and the model card `README.md`.
    """
    from ..data import create_dataloader
    from ..evaluation import evaluate_model

    out_dir = Path(cfg.run.output_dir)
    if accelerator is None:
        # `auto` follows the hardware of the device this process will train on (PartialState is the
        # state the Accelerator below reuses); the choice is logged and printed once. `cpu=` as the
        # Accelerator reads it: without it a CPU launch's PartialState sees a single process.
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.run.mixed_precision, state.device,
                                                    announce=state.print),
            gradient_accumulation_steps=cfg.optim.grad_accum_steps,
            log_with=cfg.run.report_to or None,
            project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.run.seed),
            step_scheduler_with_optimizer=False,
        )
    set_seed(cfg.run.seed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "fotf_config.yaml")

    train_set, eval_set, info = build_data(cfg)
    student, teacher = build_models(cfg, info.num_labels, info.id2label)
    criterion, fotf = build_criterion_and_fotf(cfg, student, teacher, info.num_labels)
    module = DistillationModule(student, criterion, fotf)
    if accelerator.device.type == "cuda" and accelerator.num_processes > 1:
        # CPU/gloo DDP cannot run SyncBatchNorm; CIRKD uses it on GPUs for per-GPU batches of 2.
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    optimizer, scheduler = build_optimizer(cfg, module)

    train_loader = create_dataloader(
        train_set, batch_size=cfg.optim.batch_size, train=True, num_workers=cfg.data.num_workers, seed=cfg.run.seed
    )
    eval_loader = create_dataloader(
        eval_set, batch_size=cfg.run.eval_batch_size, train=False, num_workers=cfg.data.num_workers, seed=cfg.run.seed
    )
    module, optimizer, train_loader = accelerator.prepare(module, optimizer, train_loader)
    state = TrainerState()
    accelerator.register_for_checkpointing(scheduler, state)
    if teacher is not None:
        teacher.to(accelerator.device)

    checkpoint = find_checkpoint(cfg)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    log_history = out_dir / LOG_HISTORY_FILE
    if accelerator.is_main_process:
        if checkpoint is not None:  # drop lines logged after the checkpoint (killed before the next one)
            truncate_log_history(log_history, state.step)
        elif log_history.exists():  # another run's log: keep it, beside the new one
            os.replace(log_history, log_history.with_name(f"log_history.{int(time.time())}.jsonl"))

    steps_per_epoch = len(train_loader) // cfg.optim.grad_accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the training split has {len(train_set)} samples, fewer than one batch of {cfg.optim.batch_size} x "
            f"{accelerator.num_processes} processes x {cfg.optim.grad_accum_steps} accumulation steps"
        )
    micro_done = state.step * cfg.optim.grad_accum_steps
    batches = _infinite_batches(
        train_loader, accelerator, micro_done % len(train_loader), micro_done // len(train_loader), train_set
    )

    if accelerator.is_main_process and cfg.run.report_to:
        accelerator.init_trackers("fotf", config=_flat_config(cfg))
    unwrapped = lambda: accelerator.unwrap_model(module)  # noqa: E731
    progress = tqdm(
        total=cfg.optim.max_steps, initial=state.step, disable=not (accelerator.is_main_process and cfg.run.progress_bar),
        desc="train", dynamic_ncols=True,
    )
    running: Dict[str, float] = {}
    running_count = 0
    step_times: List[float] = []
    wall_before = state.wall_time_s  # earlier sessions of a resumed run
    start = time.perf_counter()
    module.train()
    metrics: Dict[str, Any] = {}

    while state.step < cfg.optim.max_steps:
        step_start = time.perf_counter()
        for _ in range(cfg.optim.grad_accum_steps):
            _, batch = next(batches)
            with accelerator.accumulate(module):
                pixel_values, labels = batch["pixel_values"], batch["labels"]
                teacher_out = None
                if teacher is not None:
                    with torch.no_grad(), accelerator.autocast():
                        teacher_out = teacher(pixel_values)
                with accelerator.autocast():
                    step_out = module(pixel_values, labels, teacher_out=teacher_out, teacher=teacher)
                terms = {name: value.float() for name, value in step_out.terms.items()}
                _check_finite(accelerator, terms, state.step + 1, cfg, step_out.fotf_stats)
                loss = sum(terms.values())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(module.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for name, value in {**terms, **{f"fotf/{k}": v for k, v in step_out.fotf_stats.items()}}.items():
                value = float(value.detach() if torch.is_tensor(value) else value)
                if name.endswith("_max"):  # logged as the max over the interval, everything else as the mean
                    running[name] = max(running.get(name, value), value)
                else:
                    running[name] = running.get(name, 0.0) + value
            running_count += 1
        scheduler.step()
        state.step += 1
        step_times.append(time.perf_counter() - step_start)
        progress.update(1)

        if state.step % cfg.run.log_every == 0 or state.step == cfg.optim.max_steps:
            means = {k: v if k.endswith("_max") else v / running_count for k, v in running.items()}
            log_line = {"step": state.step, "lr": float(scheduler.get_last_lr()[0]),
                        "loss": sum(means[name] for name in terms)}
            log_line.update({name: means[name] for name in terms})
            log_line.update({k: v for k, v in means.items() if k.startswith("fotf/")})
            if accelerator.is_main_process:
                append_log_line(log_history, log_line)
            tracked = {k if k.startswith("fotf/") else f"train/{k}": v for k, v in log_line.items() if k != "step"}
            accelerator.log(tracked, step=state.step)
            progress.set_postfix(loss=f"{log_line['loss']:.4f}", lr=f"{log_line['lr']:.2e}")
            if not cfg.run.progress_bar:  # the bar shows the loss; without it, one line per logging step
                accelerator.print(f"step {state.step}: loss {log_line['loss']:.4f}  lr {log_line['lr']:.2e}")
            running, running_count = {}, 0

        last = state.step == cfg.optim.max_steps
        if state.step % cfg.run.eval_every == 0 or last:
            _broadcast_buffers(unwrapped(), accelerator)
            metrics = evaluate_model(unwrapped().student, eval_loader, accelerator=accelerator, num_classes=info.num_labels)
            module.train()
            accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=state.step)
            record = {"step": state.step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
            state.history.append(record)
            accelerator.print(
                f"step {state.step}: mIoU {metrics['mean_iou']:.4f}  ECE {metrics['ece']:.4f}  "
                f"pixel acc {metrics['pixel_accuracy']:.4f}"
            )
            if metrics["mean_iou"] > state.best_miou:
                state.best_miou, state.best_step = float(metrics["mean_iou"]), state.step
                if accelerator.is_main_process:
                    save_student(unwrapped().student, out_dir / BEST_DIR)
            if accelerator.is_main_process and cfg.run.num_panels > 0:
                _write_panels(cfg, unwrapped(), eval_set, info, accelerator, state.step)
        if state.step % cfg.run.save_every == 0 or last:
            state.wall_time_s = wall_before + time.perf_counter() - start
            save_checkpoint(accelerator, cfg, state.step)
    progress.close()

    wall = wall_before + time.perf_counter() - start
    result = _finish(cfg, accelerator, unwrapped().student, teacher, metrics, state, info, wall)
    # Per-step times (data, forward, FOTF, backward, optimiser; no evaluation or saving) for benchmarks.
    result["step_times_s"] = step_times
    accelerator.end_training()
    return result


def _broadcast_buffers(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics) before evaluating.

    Why: DDP broadcasts buffers at the start of each forward, so after the last training step
    every rank still holds its own batch's update; evaluating with those would make each rank
    score a slightly different model from the one rank 0 saves.
    """
    if accelerator.num_processes > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def _check_finite(accelerator: Accelerator, terms: Dict[str, torch.Tensor], step: int, cfg: ExperimentConfig,
                  fotf_stats: Dict[str, torch.Tensor]) -> None:
    bad = [name for name, value in terms.items() if not torch.isfinite(value.detach()).all()]
    flag = torch.tensor([float(bool(bad))], device=accelerator.device)
    if accelerator.num_processes > 1:
        # Every rank must stop together, or the others would hang in the next all-reduce.
        flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() > 0:
        values = {name: float(terms[name].detach()) for name in terms}
        advice = ["lower optim.lr", "set optim.max_grad_norm"]
        if accelerator.mixed_precision != "no":
            advice.append(f"try run.mixed_precision 'no' (now {accelerator.mixed_precision!r})")
        largest = max((float(v) for k, v in fotf_stats.items() if k.startswith("weight_") and k.endswith("_max")),
                      default=None)
        fotf_note = ""
        if largest is not None:
            # (1 + m*sigma)^kappa grows fast: a from-scratch student with sigma ~ 0.5 and m = kappa = 10 gets ~6e7.
            fotf_note = (f" The largest FOTF weight this step was {largest:.3g} (fotf.kappa {cfg.fotf.kappa:g}, "
                         f"fotf.m {cfg.fotf.m:g}).")
            advice.insert(0, "lower fotf.kappa / fotf.m")
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: term(s) {bad or '(on another process)'} in {values}.{fotf_note} "
            f"The last good checkpoint is kept; {', '.join(advice[:-1])} or {advice[-1]}"
        )


def _flat_config(cfg: ExperimentConfig) -> Dict[str, Any]:
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", cfg.to_dict())
    return flat


def _write_panels(cfg, module, eval_set, info, accelerator, step: int) -> None:
    """Uncertainty panels (image | truth | prediction | sigma | FOTF weight) for a few val images."""
    from ..viz import write_uncertainty_panels

    paths = write_uncertainty_panels(
        module.student,
        eval_set,
        info,
        Path(cfg.run.output_dir) / "panels",
        step=step,
        num_images=cfg.run.num_panels,
        fotf=module.fotf,
        normalization=cfg.data.normalization,
        device=accelerator.device,
    )
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np
            from PIL import Image

            for i, path in enumerate(paths):
                tracker.writer.add_image(f"panels/{i}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")


def _finish(cfg, accelerator, student, teacher, metrics, state, info, wall_seconds) -> Dict[str, Any]:
    from ..hub import push_to_hub, write_model_card
    from ..viz import reliability_diagram

    out_dir = Path(cfg.run.output_dir)
    result = {
        "final": {k: v for k, v in metrics.items()},
        "best_mean_iou": state.best_miou,
        "best_step": state.best_step,
        "steps": state.step,
        "wall_time_s": wall_seconds,
        "history": state.history,
    }
    if accelerator.is_main_process:
        tmp = out_dir / ".tmp_final"
        if tmp.exists():
            shutil.rmtree(tmp)
        student.model.save_pretrained(tmp)
        _publish_files(tmp, out_dir)
        write_json(out_dir / "metrics.json", result)
        if "reliability" in metrics:
            rel = metrics["reliability"]
            reliability_diagram(rel["accuracy"], rel["confidence"], rel["count"], metrics["ece"], out_dir / "reliability.png")
        write_model_card(
            out_dir,
            metrics=metrics,
            dataset_name=cfg.data.name,
            split=cfg.data.eval_split,
            method=cfg.method.name + ("+fotf" if cfg.fotf.enabled else ""),
            teacher=None if teacher is None else cfg.teacher.pretrained,
            fotf=asdict(cfg.fotf) if cfg.fotf.enabled else None,
            steps=state.step,
            command=os.environ.get("FOTF_COMMAND"),
            base_model=cfg.student.pretrained,
        )
        if cfg.hub.push_to_hub:
            push_to_hub(out_dir, cfg.hub.repo_id, private=cfg.hub.private)
    accelerator.wait_for_everyone()
    return result
