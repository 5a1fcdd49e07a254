"""Pretraining entry point, the same as `hybrid-lm train` (kept as a script for torchrun):

    python train/pretrain.py [CONFIG.yaml] [--out DIR] [--max-steps N] [--resume] [--set key=value ...]
    torchrun --nproc_per_node 2 train/pretrain.py train/configs/dense-small.yaml
"""

import sys

from hybrid_lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
