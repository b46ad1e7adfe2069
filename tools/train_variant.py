"""Train defense variants outside the notebook (same cache, same checkpoints and snapshots):

    python tools/train_variant.py --profile cpu --variant defended            # to its target milestone
    python tools/train_variant.py --profile cpu --variant kl_only --until 2x  # to one milestone
    python tools/train_variant.py --profile cpu --plan                        # the whole queue, in order

The same as ``refusal-rank train-variant ...`` (the logic lives in ``refusal_rank.cli``). ``--plan`` trains
every variant of ``[defense] run`` to 1x, then the ``budget_curve`` variants milestone by milestone (2x, 4x,
8x), so that an interrupted queue leaves complete curves at lower budgets. Each variant resumes from its
last checkpoint; notebook 03 then finds the snapshots and reuses them. For long CPU runs:
``nohup python tools/train_variant.py --profile cpu --plan > train.log 2>&1 &``.
"""
from __future__ import annotations

import sys

from refusal_rank.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-variant", *sys.argv[1:]]))
