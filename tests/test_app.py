"""`app.py` end to end: the Gradio demo served on localhost and driven by a headless Chromium (Playwright).

Skips, with the reason, where gradio, Playwright or a Chromium binary is missing; installs nothing.
CI installs Debian's `chromium` in `.ci/run` and gradio + playwright through the `test` extra.
"""

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForSemanticSegmentation

import fotf_hf  # noqa: F401  (registers the FOTF model classes with the Auto* factories)
from fotf_hf.data.info import CAMVID_CLASSES, CAMVID_PALETTE
from fotf_hf.models import create_model, write_inference_files

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[test]')")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install -e '.[test]')")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Same lookup as conftest.py: real CamVid from $FOTF_CAMVID_ROOT, else data/camvid.
CAMVID_ROOT = Path(os.environ.get("FOTF_CAMVID_ROOT") or REPO_ROOT / "data" / "camvid")
CHROMIUM = os.environ.get("FOTF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# ImageNet statistics written out here, so the expected prediction does not reuse the app's normalisation.
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
STARTUP_TIMEOUT_S = 240  # importing torch + transformers + gradio on a busy 2-core machine
RUN_TIMEOUT_MS = 180_000

needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary found (apt-get install chromium, or set FOTF_CHROMIUM)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _example_root(tmp_path: Path) -> Path:
    """A CamVid root with `test/*.png`: the real one when present, else one synthetic street picture."""
    if sorted((CAMVID_ROOT / "test").glob("*.png")):
        return CAMVID_ROOT
    rng = np.random.default_rng(0)
    rgb = np.zeros((96, 128, 3), dtype=np.uint8)
    rgb[:40] = (120, 150, 220)  # sky
    rgb[40:70] = (110, 60, 40)  # buildings
    rgb[70:] = (90, 90, 90)  # road
    rgb = np.clip(rgb + rng.integers(-30, 30, rgb.shape), 0, 255).astype(np.uint8)
    (tmp_path / "camvid" / "test").mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "camvid" / "test" / "synthetic.png")
    return tmp_path / "camvid"


@torch.no_grad()
def _expected_prediction(model_dir: Path, image_path: Path) -> np.ndarray:
    """The CamVid-coloured argmax of the model's logits, bilinearly upsampled (align_corners) to the image."""
    model = AutoModelForSemanticSegmentation.from_pretrained(model_dir).eval()
    rgb = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float64)
    x = torch.from_numpy(((rgb / 255.0 - MEAN) / STD).transpose(2, 0, 1)).float()[None]
    logits = model(pixel_values=x).logits
    logits = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=True)
    return np.asarray(CAMVID_PALETTE, dtype=np.uint8)[logits[0].argmax(0).numpy()]


@pytest.fixture
def server(tmp_path):
    """`python app.py` on a free port, with a tiny random CamVid model as student and teacher (its folder
    holds the image processor, at native size, as a released folder does)."""
    model_dir = tmp_path / "tiny"
    create_model("deeplabv3", "resnet18", num_labels=11, id2label=dict(enumerate(CAMVID_CLASSES)),
                 backbone_base_width=8, head_channels=16).save_pretrained(model_dir)
    write_inference_files(model_dir)
    camvid = _example_root(tmp_path)
    port = _free_port()
    log = open(tmp_path / "app.log", "w")
    env = {**os.environ, "FOTF_CAMVID_ROOT": str(camvid), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py"), "--port", str(port), "--model",
                             str(model_dir), "--teacher", str(model_dir)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            log_tail = (tmp_path / "app.log").read_text()[-3000:]
            assert proc.poll() is None, f"app.py exited:\n{log_tail}"
            assert time.monotonic() < deadline, f"app.py not serving after {STARTUP_TIMEOUT_S} s:\n{log_tail}"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(1)
        example = sorted((camvid / "test").glob("*.png"))[0]  # the first example the page lists
        yield {"url": url, "model_dir": model_dir, "example": example, "tmp_path": tmp_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server["url"], wait_until="networkidle")
            yield page
        finally:
            browser.close()


def _served_image(page, elem_id: str) -> np.ndarray:
    """The exact pixels of an output image (its `src` file), not a rescaled screenshot."""
    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


@needs_browser
def test_example_shows_prediction_sigma_and_teacher_then_error_for_non_model_folder(server, page):
    expected = _expected_prediction(server["model_dir"], server["example"])
    assert len(np.unique(expected.reshape(-1, 3), axis=0)) > 1, "precondition: the model predicts >1 class"

    page.locator(".gallery-item").first.click()  # the first CamVid example
    page.locator("#image img").wait_for(timeout=30_000)
    page.locator("#run").click()
    page.locator("#prediction img").wait_for(timeout=RUN_TIMEOUT_MS)
    page.locator("#teacher_prediction img").wait_for(timeout=30_000)

    prediction = _served_image(page, "prediction")
    assert prediction.shape == expected.shape
    assert (prediction == expected).all(-1).mean() > 0.99  # tolerance: argmax ties after float reordering
    # The teacher is the same model, so its panel must show the same segmentation.
    assert ((_served_image(page, "teacher_prediction") == expected).all(-1).mean()) > 0.99
    sigma = _served_image(page, "sigma")
    assert sigma.shape == expected.shape
    assert sigma.astype(float).std() > 5, "sigma map is blank"
    status = page.locator("#status").inner_text()
    assert "ms" in status and "T = 8" in status and "teacher" in status, status

    not_a_model = server["tmp_path"] / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("no config.json here")
    page.locator("#model textarea").fill(str(not_a_model))
    page.locator("#run").click()
    page.locator("#status", has_text="Error").wait_for(timeout=RUN_TIMEOUT_MS)
    status = page.locator("#status").inner_text()
    assert "not a segmentation model" in status and str(not_a_model) in status, status
    assert "Traceback" not in page.content()
    assert page.locator("#prediction img").count() == 0  # the stale result is cleared, not left on show


def test_run_reports_unreadable_upload_and_missing_image(tmp_path):
    """Bad input comes back as a status message with empty outputs, never as an exception."""
    spec = importlib.util.spec_from_file_location("app", REPO_ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    *images, status = app.run(str(tmp_path), "", str(broken), 8)
    assert images == [None, None, None]
    assert status.startswith("Error:") and "broken.png" in status
    *images, status = app.run(str(tmp_path), "", None, 8)
    assert images == [None, None, None] and status.startswith("Error:")
