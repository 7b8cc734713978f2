"""Test-wide settings: never touch the network, keep the 2-core machine responsive."""

import os
from pathlib import Path

for _var, _val in {
    "HF_HUB_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
}.items():
    os.environ[_var] = _val

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CAMVID_ROOT = Path(os.environ.get("FOTF_CAMVID_ROOT", REPO_ROOT.parent / "shared" / "datasets" / "camvid"))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def camvid_root():
    """Path to the real CamVid train/val files; skips the test when they are not on this machine."""
    if not (CAMVID_ROOT / "val.txt").is_file():
        pytest.skip(f"real CamVid not found at {CAMVID_ROOT} (set FOTF_CAMVID_ROOT to its folder)")
    return CAMVID_ROOT
