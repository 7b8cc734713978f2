#!/usr/bin/env python
"""Sweep FOTF's kappa and m (and seeds) for one base config; writes sweep.csv and sweep.md.

    python scripts/sweep.py --config scripts/configs/camvid_cpu/kd_fotf.yaml --kappa 1 3 5 --m 1 10 \
        --seeds 0 --output_root results/sweep [--launcher "accelerate launch"] [--optim.max_steps 500 ...]
"""

import sys

from fotf_hf.sweep import main

if __name__ == "__main__":
    sys.exit(main())
