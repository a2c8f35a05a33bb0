#!/usr/bin/env python
"""Train the autoencoder and the FAR world model: `python train.py --help`."""
import sys

from worldsim.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
