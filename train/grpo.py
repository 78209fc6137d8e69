"""GRPO training entry point (same as `jaxrast train`).

    python train/grpo.py --config configs/grpo_qwen2.5_0.5b_gsm8k.yaml [--set key=value ...] [--resume]
"""

import os
import sys

# Run from a checkout without installing: this tree's package wins.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrast.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
