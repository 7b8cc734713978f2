"""Gradio demo: a student's segmentation and its Monte-Carlo-dropout uncertainty, beside a teacher's.

    python app.py --model outputs/demo/kd_fotf [--teacher TEACHER_DIR] [--port 7860]

Pick a model folder or Hub id and an image (CamVid test images from `$FOTF_CAMVID_ROOT/test/` as
examples, or an upload). The page shows the student's prediction, its MC-dropout sigma (the
population std over T passes of the predicted class's probability, as `evaluate_model` scores it)
and, when a teacher is given, the teacher's prediction, with the inference time of each.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path
from typing import List, Optional, Tuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a demo should work offline and not phone home

import gradio as gr  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

import fotf_hf  # noqa: E402,F401  (registers the FOTF model classes with the Auto* factories)
from fotf_hf.data import BadSampleError, decode_image, normalize_image  # noqa: E402
from fotf_hf.data.info import CAMVID_CLASSES, CAMVID_PALETTE  # noqa: E402
from fotf_hf.evaluation import load_student, predict  # noqa: E402
from fotf_hf.models import eval_mode  # noqa: E402
from fotf_hf.viz import colorize, palette_for  # noqa: E402

# Longest image side fed to the model: keeps a phone photo from taking minutes on a CPU Space.
MAX_SIDE = 1024
# Population std of a probability lies in [0, 0.5]: a fixed colour scale keeps maps comparable.
SIGMA_MAX = 0.5
NUM_EXAMPLES = 4


def camvid_examples(root: Optional[str] = None) -> List[str]:
    """Up to `NUM_EXAMPLES` CamVid test images spread over `$FOTF_CAMVID_ROOT/test/*.png` ([] when absent)."""
    root = root if root is not None else os.environ.get("FOTF_CAMVID_ROOT")
    paths = sorted(Path(root, "test").glob("*.png")) if root else []
    step = max(1, len(paths) // NUM_EXAMPLES)
    return [str(p) for p in paths[::step][:NUM_EXAMPLES]]


@functools.lru_cache(maxsize=4)
def load_model(name: str):
    """A cached `(SegmentationAdapter in eval mode, image processor or None)` for a model folder or Hub
    id; ValueError if it is not one."""
    try:
        model = load_student(name)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # no/invalid config.json, unsupported class
        raise ValueError(
            f"{name!r} is not a segmentation model folder or Hub id this library supports ({exc})") from exc
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):  # saved before folders carried a processor: normalise at native size
        processor = None
    return model.eval(), processor


def _palette(config) -> np.ndarray:
    """The CamVid colours for a CamVid model (its class names match), else the library's default palette."""
    names = tuple(str(config.id2label[i]).lower() for i in range(config.num_labels))
    if names == tuple(c.lower() for c in CAMVID_CLASSES):
        return np.asarray(CAMVID_PALETTE, dtype=np.uint8)
    return palette_for(config.num_labels)


def _pixel_values(rgb: np.ndarray, model, processor) -> torch.Tensor:
    """`(1, 3, h, w)`: the folder's processor (the run's normalisation and evaluation size: a model
    trained at 180x240 segments poorly at 360x480), else the config's normalisation at native size."""
    if processor is not None:
        return processor(images=rgb, return_tensors="pt")["pixel_values"]
    normalization = getattr(model.config, "image_normalization", None) or "imagenet"
    return torch.from_numpy(normalize_image(rgb, normalization))[None]


def segment(model, processor, rgb: np.ndarray,
            mc_samples: int = 0) -> Tuple[np.ndarray, Optional[np.ndarray], float]:
    """`(colourised prediction (H, W, 3), sigma (H, W) or None, milliseconds)` of one RGB image.

    `mc_samples = 0`: the deterministic prediction; `T >= 2`: the MC-dropout predictive mean and
    its sigma, both from `fotf_hf.evaluation` so the demo shows what the evaluation scores.
    """
    x = _pixel_values(rgb, model, processor)
    generator = torch.Generator().manual_seed(0)  # the same image and T give the same sigma map
    start = time.perf_counter()
    with eval_mode(model):
        scores, _, sigma = predict(model, x, rgb.shape[:2], mc_samples=mc_samples, generator=generator)
    elapsed_ms = 1000 * (time.perf_counter() - start)
    labels = scores[0].argmax(0).numpy()
    return colorize(labels, _palette(model.config)), None if sigma is None else sigma[0].numpy(), elapsed_ms


def sigma_image(sigma: np.ndarray) -> np.ndarray:
    """`(H, W)` sigma -> `(H, W, 3)` uint8, magma colour map (as the training panels) on [0, SIGMA_MAX]."""
    rgba = matplotlib.colormaps["magma"](np.clip(sigma / SIGMA_MAX, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def run(model_name: str, teacher_name: str, image_path: Optional[str], mc_samples: int):
    """Gradio callback: (prediction, sigma map, teacher prediction, status); errors go to the status text."""
    try:
        if not image_path:
            raise ValueError("choose an example or upload an image first")
        if not (model_name or "").strip():
            raise ValueError("enter a model folder or Hub id")
        image = decode_image(str(image_path)).convert("RGB")
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        rgb = np.asarray(image)
        student = load_model(model_name.strip())
        pred, _, pred_ms = segment(*student, rgb)
        _, sigma, mc_ms = segment(*student, rgb, int(mc_samples))
        status = (f"student: {pred_ms:.0f} ms prediction, {mc_ms:.0f} ms for T = {int(mc_samples)} "
                  f"MC-dropout passes (mean sigma {sigma.mean():.4f}); image {rgb.shape[1]} x {rgb.shape[0]}")
        teacher_pred = None
        if (teacher_name or "").strip():
            teacher_pred, _, teacher_ms = segment(*load_model(teacher_name.strip()), rgb)
            status += f"; teacher: {teacher_ms:.0f} ms"
        return pred, sigma_image(sigma), teacher_pred, status
    except (BadSampleError, ValueError) as exc:
        return None, None, None, f"Error: {exc}"


def build_demo(model: str = "outputs/demo/kd_fotf", teacher: str = "",
               examples: Optional[List[str]] = None) -> gr.Blocks:
    """The demo page; `examples` default to `camvid_examples()`."""
    examples = camvid_examples() if examples is None else examples
    with gr.Blocks(title="Focus on the Fog: segmentation + MC-dropout uncertainty") as demo:
        gr.Markdown("## Focus on the Fog: student prediction, MC-dropout uncertainty and teacher")
        with gr.Row():
            model_box = gr.Textbox(value=model, label="Student model folder or Hub id", elem_id="model")
            teacher_box = gr.Textbox(value=teacher, label="Teacher model folder or Hub id (optional)",
                                     elem_id="teacher")
            samples = gr.Slider(2, 32, value=8, step=1, label="MC-dropout passes T", elem_id="samples")
        with gr.Row():
            image = gr.Image(type="filepath", format="png", label="Image", elem_id="image")
            with gr.Column():
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image], label="CamVid test images")
                button = gr.Button("Segment", variant="primary", elem_id="run")
                status = gr.Markdown(elem_id="status")
        with gr.Row():
            # PNG, not Gradio's default WebP: lossy compression would blend the class colours.
            outputs = [gr.Image(label=label, format="png", elem_id=elem_id) for label, elem_id in (
                ("Student prediction", "prediction"), ("Student sigma (MC dropout)", "sigma"),
                ("Teacher prediction", "teacher_prediction"))]
        button.click(run, [model_box, teacher_box, image, samples], outputs + [status])
    return demo


def main(argv: Optional[List[str]] = None) -> None:
    """Command line: build the demo and serve it until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/demo/kd_fotf", help="default student folder or Hub id")
    parser.add_argument("--teacher", default="", help="default teacher folder or Hub id (optional)")
    # None lets Gradio read GRADIO_SERVER_PORT / GRADIO_SERVER_NAME, which a Hugging Face Space sets.
    parser.add_argument("--port", type=int, default=None, help="default 7860")
    parser.add_argument("--host", default=None, help="default 127.0.0.1; 0.0.0.0 serves other machines")
    args = parser.parse_args(argv)
    examples = camvid_examples()
    # Gradio serves only files under the working directory unless told otherwise: allow the examples' folders.
    allowed = sorted({str(Path(p).parent) for p in examples})
    build_demo(args.model, args.teacher, examples).launch(server_name=args.host, server_port=args.port,
                                                          allowed_paths=allowed)


if __name__ == "__main__":
    main()
