#!/usr/bin/env python
"""Pretrain one model of the toy family from scratch (CPU-friendly).

    python train/pretrain_toy.py --size S --out build/toy/s_base --steps 3000 --lr 2e-3 --seed 0
    python train/pretrain_toy.py --size M --out build/toy/m_base --steps 3000 --lr 1e-3 --seed 0

See jaxrast/toy/family/PROVENANCE.md for the exact commands behind the shipped checkpoints.
"""

import argparse
import json

from jaxrast.toy.pretrain import SIZES, PretrainConfig, pretrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = PretrainConfig(out=args.out, size=args.size, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                         lr=args.lr, seed=args.seed)
    _, _, history = pretrain(cfg)
    print(json.dumps(history[-1]))


if __name__ == "__main__":
    main()
