"""The end of a run: final weights, `metrics.json`, reliability diagram, model card and upload; and
the uncertainty panels drawn at each evaluation."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import numpy as np
from PIL import Image

from ..hub import push_to_hub, write_model_card
from ..models.remote_code import write_inference_files
from ..viz import reliability_diagram, write_uncertainty_panels
from .checkpoint import publish_files, write_json


def write_panels(cfg, module, eval_set, info, accelerator, step: int) -> None:
    """Uncertainty panels (image | truth | prediction | sigma | FOTF weight) for a few val images."""
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
            for i, path in enumerate(paths):
                tracker.writer.add_image(f"panels/{i}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")


def finish(cfg, accelerator, student, teacher, metrics, state, info, wall_seconds) -> Dict[str, Any]:
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
        # Image processor (the run's normalisation and eval resize) + remote code: pipeline-ready folder.
        write_inference_files(tmp, normalization=cfg.data.normalization, size=cfg.data.eval_size)
        publish_files(tmp, out_dir)
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
