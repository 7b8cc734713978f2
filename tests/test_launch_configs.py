"""The launch configs in accelerate_configs/ and the README commands that use them.

The two-process test runs exactly the `accelerate launch ... cpu_2proc.yaml` command the README shows
(environment prefix and launch options parsed out of README.md; only the script is swapped for a
probe), so the documentation and the config cannot drift apart.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "accelerate_configs"
CPU_2PROC = "accelerate_configs/cpu_2proc.yaml"

# `VAR=value ... accelerate launch ... cpu_2proc.yaml ...`, in a code block or in inline backticks.
_COMMAND = re.compile(r"((?:[A-Za-z_][A-Za-z0-9_]*=\S+\s+)*accelerate launch\b[^`\n]*" + re.escape(CPU_2PROC) + r"[^`\n]*)")

PROBE = """
import os, sys
import torch
from accelerate import Accelerator

accelerator = Accelerator()
out = os.path.join(sys.argv[1], f"rank{accelerator.process_index}.txt")
with open(out, "w") as f:
    f.write(f"{accelerator.process_index} {accelerator.num_processes} {torch.get_num_threads()} "
            f"{accelerator.device.type} {accelerator.distributed_type.value}\\n")
accelerator.wait_for_everyone()
"""


def _readme_cpu_2proc_command():
    """(env, launch options) of the README's cpu_2proc command; every README mention must agree."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = []
    for match in _COMMAND.finditer(readme):
        tokens = shlex.split(match.group(1))
        env = {}
        while "=" in tokens[0] and not tokens[0].startswith("-"):
            key, value = tokens.pop(0).split("=", 1)
            env[key] = value
        assert tokens[:2] == ["accelerate", "launch"], match.group(1)
        tokens = tokens[2:]
        script = next((i for i, tok in enumerate(tokens) if tok.endswith(".py")), len(tokens))
        found.append((env, tokens[:script]))
    assert found, f"README.md shows no `accelerate launch ... {CPU_2PROC}` command"
    assert all(f == found[0] for f in found), f"README.md shows different cpu_2proc commands: {found}"
    assert "--config_file" in found[0][1] and CPU_2PROC in found[0][1], found[0]
    return found[0]


def _expected_threads(num_processes=2):
    """accelerate's rule for use_cpu configs: physical cores / local processes, at least 1."""
    import psutil

    return max(1, int(psutil.cpu_count(logical=False) / num_processes))


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_launch_config_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # raises on unknown keys or bad enum values
    assert isinstance(config, ClusterConfig)
    assert config.num_processes >= 1 and config.num_machines >= 1


def test_readme_cpu_2proc_command_takes_the_torchrun_path_with_a_thread_share(monkeypatch):
    """Checks accelerate's argument resolution for the README command with a faked core count
    (this machine has 2 cores, where every share rounds to 1)."""
    import psutil
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    env, options = _readme_cpu_2proc_command()
    monkeypatch.chdir(REPO)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 32 if logical else 16)
    parser = launch_command_parser()

    args, _, _ = _validate_launch_command(parser.parse_args([*options, "probe.py"]))
    assert args.multi_gpu and not args.cpu, "cpu_2proc must go through torchrun (the simple launcher starts 1 process)"
    assert args.num_processes == 2 and args.num_machines == 1
    assert args.num_cpu_threads_per_process == 8
    assert prepare_multi_gpu_env(args)["OMP_NUM_THREADS"] == "8"
    assert os.environ.get("ACCELERATE_USE_CPU") == "1", "the README command must set ACCELERATE_USE_CPU=1"

    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's explicit setting wins
    args, _, _ = _validate_launch_command(parser.parse_args([*options, "probe.py"]))
    assert args.num_cpu_threads_per_process == 3


@pytest.mark.slow
def test_readme_cpu_2proc_command_starts_two_cpu_processes(tmp_path):
    env, options = _readme_cpu_2proc_command()
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    run_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let accelerate choose
    run_env.update(env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *options, str(probe), str(out)]
    done = subprocess.run(cmd, env=run_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    rows = sorted(p.read_text().split() for p in out.glob("rank*.txt"))
    assert [r[:2] for r in rows] == [["0", "2"], ["1", "2"]], (rows, done.stderr[-3000:])
    assert {r[3] for r in rows} == {"cpu"} and {r[4] for r in rows} == {"MULTI_CPU"}, rows
    assert [int(r[2]) for r in rows] == [_expected_threads(2)] * 2, rows
