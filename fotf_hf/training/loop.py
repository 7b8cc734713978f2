"""The one Accelerate training loop behind `scripts/distill.py`.

`train` reads top to bottom: prepare (build.py), step, log, checkpoint (checkpoint.py), evaluate,
release (release.py). It composes the data, models, FOTF and the criterion from the config but
knows no loss formula. Loss values and the non-finite check stay on the device between logging
steps (one host sync per logging interval), so the loop does not stall a GPU.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from ..config import ConfigError, ExperimentConfig, flatten_config, save_config
from ..evaluation import evaluate_model
from .build import build_criterion_and_fotf, build_data, build_loaders, build_models, build_optimizer, check_weights
from .checkpoint import (
    BEST_DIR,
    TrainerState,
    claim_output_dir,
    find_checkpoint,
    finished_run,
    load_checkpoint,
    save_checkpoint,
    save_student,
)
from .log_history import LOG_HISTORY_FILE, append_log_line, truncate_log_history
from .module import DistillationModule
from .precision import resolve_mixed_precision
from .release import finish, write_panels

# FOTF weights above this are worth a word about kappa / m when a run diverges.
LARGE_FOTF_WEIGHT = 100.0


class NonFiniteLossError(RuntimeError):
    """A loss term or the trained state became NaN/inf; the message names the step and the cause."""


def train(cfg: ExperimentConfig, accelerator: Optional[Accelerator] = None) -> Dict[str, Any]:
    """Train `cfg.student` with `cfg.method` (+ FOTF); returns the final record (`metrics.json`).

    Writes into `cfg.run.output_dir`: the student (`config.json`, `model.safetensors`), the
    resolved `fotf_config.yaml`, `metrics.json`, `best/`, `checkpoints/`, `panels/`,
    `reliability.png`, tracker logs, `log_history.jsonl` (see `training/log_history.py`) and the
    model card `README.md`. The record also carries `step_times_s` (this session's step times).
    """
    out_dir = Path(cfg.run.output_dir)
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(cfg.run.seed)
    checkpoint = find_checkpoint(cfg)
    finished = finished_run(cfg, checkpoint)
    if finished is not None:
        accelerator.print(f"{out_dir} holds a finished run (step {finished['steps']}); nothing to do")
        return {**finished, "step_times_s": []}
    check_weights(cfg)
    if checkpoint is None and accelerator.is_main_process:
        claim_output_dir(cfg)

    train_set, eval_set, info = build_data(cfg)
    student, teacher = build_models(cfg, info.num_labels, info.id2label)
    criterion, fotf = build_criterion_and_fotf(cfg, student, teacher, info.num_labels)
    module = DistillationModule(student, criterion, fotf)
    if accelerator.device.type == "cuda" and accelerator.num_processes > 1:
        # CPU/gloo DDP cannot run SyncBatchNorm; CIRKD uses it on GPUs for per-GPU batches of 2.
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    optimizer, scheduler = build_optimizer(cfg, module)
    train_loader, eval_loader = build_loaders(cfg, train_set, eval_set)
    module, optimizer, train_loader = accelerator.prepare(module, optimizer, train_loader)
    if teacher is not None:
        teacher.to(accelerator.device)
    state = TrainerState()
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, state, scheduler)
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    if accelerator.is_main_process:  # the config is written only once it has built a run
        _start_outputs(cfg, accelerator, out_dir, None if checkpoint is None else state.step)

    batches = _batches(cfg, accelerator, train_loader, train_set, state.step)
    inner = lambda: accelerator.unwrap_model(module)  # noqa: E731
    guard, running = DivergenceGuard(inner(), accelerator.device), RunningMeans()
    progress = tqdm(total=cfg.optim.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not (accelerator.is_main_process and cfg.run.progress_bar))
    wall_before, start, step_times, metrics = state.wall_time_s, time.perf_counter(), [], {}
    module.train()
    while state.step < cfg.optim.max_steps:
        step_start = time.perf_counter()
        _optimizer_step(cfg, accelerator, module, teacher, optimizer, batches, running, guard)
        scheduler.step()
        state.step += 1
        guard.observe_state(state.step)
        step_times.append(time.perf_counter() - step_start)
        progress.update(1)

        last = state.step == cfg.optim.max_steps
        if state.step % cfg.run.log_every == 0 or last:
            guard.check(accelerator, cfg, state.step)
            skipped = {"data/skipped": train_set.num_skipped} if cfg.data.on_bad_sample == "skip" else {}
            _log(cfg, accelerator, out_dir, state.step, scheduler.get_last_lr()[0], {**running.pop(), **skipped}, progress)
        if state.step % cfg.run.save_every == 0 or last:  # saved before evaluating: nothing waits on it
            guard.check(accelerator, cfg, state.step)
            state.wall_time_s = wall_before + time.perf_counter() - start
            save_checkpoint(accelerator, cfg, state, scheduler)
            guard.saved(state.step)
        if state.step % cfg.run.eval_every == 0 or last:
            guard.check(accelerator, cfg, state.step)
            metrics = _evaluate(cfg, accelerator, inner(), eval_loader, eval_set, info, state)
            module.train()
    progress.close()
    if not metrics:  # resumed from the last checkpoint of a run killed before it was published
        metrics = _evaluate(cfg, accelerator, inner(), eval_loader, eval_set, info, state)

    result = finish(cfg, accelerator, inner().student, teacher, metrics, state, info,
                    wall_before + time.perf_counter() - start)
    accelerator.end_training()
    return {**result, "step_times_s": step_times}  # per-step times (no evaluation or saving)


def _start_outputs(cfg, accelerator, out_dir: Path, resumed_step: Optional[int]) -> None:
    """Main process, once the run is built: the resolved `fotf_config.yaml`, `log_history.jsonl`
    (truncated to `resumed_step` on resume) and the trackers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "fotf_config.yaml")
    _start_log_history(out_dir / LOG_HISTORY_FILE, resumed_step)
    if cfg.run.report_to:
        # TensorBoard's hparams take scalars only: lists and None go in as their text.
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in flatten_config(cfg.to_dict()).items()}
        accelerator.init_trackers("fotf", config=hparams)


def _optimizer_step(cfg, accelerator, module, teacher, optimizer, batches, running, guard) -> None:
    """One optimiser step over `grad_accum_steps` micro-batches. The loss terms only go into
    `running` and `guard`, which keep them on the device: nothing here waits for the GPU."""
    for _ in range(cfg.optim.grad_accum_steps):
        pixel_values, labels = (batch := next(batches))["pixel_values"], batch["labels"]
        with accelerator.accumulate(module):
            with torch.no_grad(), accelerator.autocast():
                teacher_out = None if teacher is None else teacher(pixel_values)
            with accelerator.autocast():
                out = module(pixel_values, labels, teacher_out=teacher_out, teacher=teacher)
            terms = {name: value.float() for name, value in out.terms.items()}
            accelerator.backward(sum(terms.values()))
            if accelerator.sync_gradients and cfg.optim.max_grad_norm is not None:
                accelerator.clip_grad_norm_(module.parameters(), cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        running.add(terms, out.fotf_stats)
        guard.observe_loss(terms, out.fotf_stats)


def make_accelerator(cfg: ExperimentConfig) -> Accelerator:
    """The run's `Accelerator`; `mixed_precision: auto` follows the hardware of this process's device."""
    # PartialState is the state the Accelerator reuses; `cpu=` as the Accelerator reads it, or a CPU
    # launch's PartialState would see a single process.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    out_dir = Path(cfg.run.output_dir)
    precision = resolve_mixed_precision(cfg.run.mixed_precision, state.device, announce=state.print)
    # One process may train several runs (a notebook, the tests); Accelerate keeps one mixed precision
    # per process and refuses another, so a run with a different one starts from a fresh state.
    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != precision:
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
        log_with=cfg.run.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.run.seed),
        step_scheduler_with_optimizer=False,
    )


def _batches(cfg, accelerator, loader, dataset, step: int):
    """Batches forever, from where `step` left off (a resumed run skips what it already used)."""
    micro_done = step * cfg.optim.grad_accum_steps
    if len(loader) < cfg.optim.grad_accum_steps:
        raise ConfigError(
            f"the training split has {len(dataset)} samples, fewer than one batch of {cfg.optim.batch_size} x "
            f"{accelerator.num_processes} processes x {cfg.optim.grad_accum_steps} accumulation steps"
        )
    epoch, skip = divmod(micro_done, len(loader))
    while True:
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        epoch, skip = epoch + 1, 0


def _start_log_history(path: Path, resumed_step: Optional[int]) -> None:
    if resumed_step is not None:  # drop lines logged after the checkpoint (killed before the next one)
        truncate_log_history(path, resumed_step)
    elif path.exists():  # another run's log: keep it, beside the new one
        os.replace(path, path.with_name(f"log_history.{int(time.time())}.jsonl"))


def _log(cfg, accelerator, out_dir: Path, step: int, lr: float, means: Dict[str, float], progress) -> None:
    """One logging step: `log_history.jsonl`, the trackers, and the bar or a printed line."""
    terms = {k: v for k, v in means.items() if "/" not in k}  # loss terms; `fotf/...`, `data/...` are statistics
    line = {"step": step, "lr": float(lr), "loss": sum(terms.values()), **means}
    if accelerator.is_main_process:
        append_log_line(out_dir / LOG_HISTORY_FILE, line)
    accelerator.log({k if "/" in k else f"train/{k}": v for k, v in line.items() if k != "step"}, step=step)
    progress.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}")
    if not cfg.run.progress_bar:  # the bar shows the loss; without it, one line per logging step
        accelerator.print(f"step {step}: loss {line['loss']:.4f}  lr {line['lr']:.2e}")


def _evaluate(cfg, accelerator, module, eval_loader, eval_set, info, state: TrainerState) -> Dict[str, Any]:
    """Validation metrics; keeps `best/` and draws the panels. Runs under a forked RNG so that
    evaluating does not change the training's random stream (a resumed run stays bit-identical)."""
    _broadcast_buffers(module, accelerator)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        metrics = evaluate_model(module.student, eval_loader, accelerator=accelerator, num_classes=info.num_labels)
        if accelerator.is_main_process and cfg.run.num_panels > 0:
            write_panels(cfg, module, eval_set, info, accelerator, state.step)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    accelerator.log({f"val/{k}": v for k, v in scalars.items()}, step=state.step)
    state.history.append({"step": state.step, **scalars})
    accelerator.print(f"step {state.step}: mIoU {metrics['mean_iou']:.4f}  ECE {metrics['ece']:.4f}  "
                      f"pixel acc {metrics['pixel_accuracy']:.4f}")
    if metrics["mean_iou"] > state.best_miou:
        state.best_miou, state.best_step = float(metrics["mean_iou"]), state.step
        if accelerator.is_main_process:
            save_student(module.student, Path(cfg.run.output_dir) / BEST_DIR)
    return metrics


class RunningMeans:
    """Loss terms and FOTF statistics summed on the device; `pop` moves them to the host once:
    means over the micro-steps since the last pop, maxima for keys ending in `_max`."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, terms: Dict[str, torch.Tensor], fotf_stats: Dict[str, torch.Tensor]) -> None:
        for name, value in {**terms, **{f"fotf/{k}": v for k, v in fotf_stats.items()}}.items():
            value = value.detach().float()
            old = self.sums.get(name)
            self.sums[name] = value if old is None else (torch.maximum(old, value) if name.endswith("_max") else old + value)
        self.count += 1

    def pop(self) -> Dict[str, float]:
        names = list(self.sums)
        values = torch.stack([self.sums[n] for n in names]).tolist() if names else []
        means = {n: v if n.endswith("_max") else v / self.count for n, v in zip(names, values)}
        self.sums, self.count = {}, 0
        return means


class DivergenceGuard:
    """Remembers, on the device, the first step whose loss or updated state (parameters and
    buffers, e.g. BatchNorm running variances) is not finite, and the largest FOTF weight since the
    last checkpoint; `check` reads them (one sync) and stops the run before anything is saved."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        self.device = device
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)
        self.loss_ok = torch.ones((), dtype=torch.bool, device=device)
        self.bad_terms: Dict[str, torch.Tensor] = {}
        self.max_weight = torch.zeros((), device=device)
        self.last_saved = 0

    def observe_loss(self, terms: Dict[str, torch.Tensor], fotf_stats: Dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            ok = torch.isfinite(value.detach()).all()
            self.loss_ok = self.loss_ok & ok
            self.bad_terms[name] = self.bad_terms.get(name, torch.zeros((), dtype=torch.bool, device=self.device)) | (
                ~ok & (self.first_bad == 0))
        for key, value in fotf_stats.items():
            if key.startswith("weight_") and key.endswith("_max"):
                self.max_weight = torch.maximum(self.max_weight, value.detach().float())

    def observe_state(self, step: int) -> None:
        state_ok = torch.stack([torch.isfinite(t).all() for t in self.tensors]).all()
        ok = self.loss_ok & state_ok
        self.first_bad = torch.where((self.first_bad == 0) & ~ok, torch.full_like(self.first_bad, step), self.first_bad)
        self.loss_ok = torch.ones((), dtype=torch.bool, device=self.device)

    def saved(self, step: int) -> None:
        self.last_saved = step
        self.max_weight = torch.zeros((), device=self.device)

    def check(self, accelerator: Accelerator, cfg: ExperimentConfig, step: int) -> None:
        names = list(self.bad_terms)
        flags = torch.stack([self.first_bad.float(), self.max_weight, *[self.bad_terms[n].float() for n in names]])
        if accelerator.num_processes > 1:  # every rank stops together, or the others hang in the next all-reduce
            flags = accelerator.gather(flags[None]).max(dim=0).values
        first_bad, max_weight, *bad = flags.tolist()
        if not first_bad:
            return
        bad_terms = [n for n, b in zip(names, bad) if b]
        cause = f"loss term(s) {bad_terms}" if bad_terms else "the parameters or buffers after the optimiser step"
        advice = ["lower optim.lr", "set optim.max_grad_norm"]
        if accelerator.mixed_precision != "no":
            advice.append(f"try run.mixed_precision 'no' (now {accelerator.mixed_precision!r})")
        if cfg.fotf.enabled and max_weight > LARGE_FOTF_WEIGHT:
            # (1 + m*sigma)^kappa grows fast: a from-scratch student with sigma ~ 0.5 and m = kappa = 10 gets ~6e7.
            advice.insert(0, f"lower fotf.kappa / fotf.m (now {cfg.fotf.kappa:g} / {cfg.fotf.m:g})")
        kept = f"step {self.last_saved}" if self.last_saved else "none was saved yet"
        weight = f" The largest FOTF weight since then was {max_weight:.3g}." if cfg.fotf.enabled else ""
        raise NonFiniteLossError(
            f"non-finite values at step {int(first_bad)} (noticed at step {step}): {cause}. The last good "
            f"checkpoint ({kept}) is kept and nothing after it was saved.{weight} To go on: "
            f"{', '.join(advice[:-1])} or {advice[-1]}"
        )


def _broadcast_buffers(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics) before evaluating.

    Why: DDP broadcasts buffers at the start of each forward, so after the last training step
    every rank still holds its own batch's update; evaluating with those would make each rank
    score a slightly different model from the one rank 0 saves.
    """
    if accelerator.num_processes > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
