"""Fit the label embeddings (ASGE, paper Eq. 1-5) on a training split's labels; the network is model.networks.asge.

    python -m model.asge --train DATA/train --out label_emb.pt [--num-classes 3862] [--alpha 0.1]
"""
from model.engine.cli import run_cli
from model.networks.asge import get_args_parser, main

if __name__ == "__main__":
    run_cli(main, get_args_parser())
