#!/usr/bin/env python
"""Play in a generated maze with the keyboard: `python play.py --help`."""
import sys

from worldsim.cli import main

if __name__ == "__main__":
    sys.exit(main(["play", *sys.argv[1:]]))
