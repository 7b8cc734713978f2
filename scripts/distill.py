#!/usr/bin/env python
"""Train a segmentation student with CE, KD, CIRKD, Af-DCD, SKD, IFVD or CWD, optionally + FOTF.

    accelerate launch scripts/distill.py --config scripts/configs/demo/kd_fotf.yaml [--fotf.kappa 5 ...]

Every config field can be overridden as `--section.field VALUE` or `--set section.field=VALUE`;
`--resume latest` continues from the newest checkpoint, `--push_to_hub USER/NAME` uploads the
final folder. See fotf_hf/config.py for all fields.
"""

import argparse
import os
import shlex
import sys

from fotf_hf.config import ConfigError, load_config
from fotf_hf.losses import methods_table
from fotf_hf.training import CheckpointError, NonFiniteLossError, train


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="methods (method.name):\n" + methods_table())
    parser.add_argument("--config", help="experiment YAML (optional: defaults are the built-in demo)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (same as --run.resume)")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the final folder (same as --hub.repo_id)")
    args, overrides = parser.parse_known_args(argv)
    if args.resume:
        overrides += ["--run.resume", args.resume]
    if args.push_to_hub:
        overrides += ["--hub.push_to_hub", "true", "--hub.repo_id", args.push_to_hub]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    # The card records the command that reproduced the run.
    os.environ.setdefault("FOTF_COMMAND", "accelerate launch scripts/distill.py " + shlex.join(argv))
    try:
        train(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:  # the message names the step, the cause and what was kept
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
