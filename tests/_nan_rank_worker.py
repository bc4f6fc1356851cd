"""torchrun worker for tests/test_base_train.py: base_train whose loss turns NaN on one rank at one step.

    python -m torch.distributed.run --nproc-per-node 2 tests/_nan_rank_worker.py --nan-rank 1 --nan-step 2 -- <base_train flags>
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat import gpt  # noqa: E402
from scripts import base_train  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nan-rank", type=int, required=True)
    p.add_argument("--nan-step", type=int, required=True, help="the optimizer step whose loss is NaN (one micro-batch per step)")
    args, rest = p.parse_known_args()
    rest = rest[1:] if rest[:1] == ["--"] else rest
    calls = {"n": 0}
    real_forward = gpt.GPT.forward

    def forward(self, idx, targets=None, **kwargs):
        out = real_forward(self, idx, targets, **kwargs)
        if targets is not None and self.training:
            calls["n"] += 1
            if int(os.environ["RANK"]) == args.nan_rank and calls["n"] == args.nan_step + 1:
                return out * float("nan")
        return out

    gpt.GPT.forward = forward
    base_train.main(rest)


if __name__ == "__main__":
    main()
