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
# Real CamVid: $FOTF_CAMVID_ROOT, else the project's documented place (README "Data"): data/camvid.
CAMVID_ROOT = Path(os.environ.get("FOTF_CAMVID_ROOT") or REPO_ROOT / "data" / "camvid")


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


@pytest.fixture
def run_two_processes():
    """Run `python -m torch.distributed.run --nproc_per_node 2 SCRIPT ARGS...` on the CPU (gloo).

    Fresh interpreters rather than `accelerate.debug_launcher`'s forked children: a fork of a
    pytest process whose OpenMP thread pool is already running can deadlock in the child.
    Returns the `CompletedProcess`; asserts a zero exit status and shows the end of stderr otherwise.
    """
    import socket
    import subprocess
    import sys

    def run(script, *args, timeout=600):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), *map(str, args)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return run
