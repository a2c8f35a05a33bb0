"""The largest per-frame PSNR difference between two `worldsim eval` runs of the same episodes.

    python scripts/max_frame_difference.py NEW/results.json OLD/results.json

compare_evals.py compares means (rounded to 0.01 dB); this says how far any single frame moved,
separately for the ground-truth episodes and the self-consistency probes: what to check after a
change that should leave generation alone (thread counts, a metric fix) or runs on two machines.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Iterator

import numpy as np


def psnr_lists(node: Any, path: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """Every list of numbers under a key path holding "psnr", with its path (list positions included)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from psnr_lists(value, f"{path}/{key}")
    elif isinstance(node, list) and node and all(isinstance(x, (int, float)) for x in node):
        if "psnr" in path:
            yield path, np.asarray(node, dtype=np.float64)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from psnr_lists(value, f"{path}[{i}]")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    new, old = (json.loads(open(p).read()) for p in args)
    for part in ("ground_truth", "self_consistency"):
        a, b = dict(psnr_lists(new.get(part))), dict(psnr_lists(old.get(part)))
        if not a and not b:
            print(f"{part}: in neither run")
        elif a.keys() != b.keys() or any(len(a[k]) != len(b[k]) for k in a):
            print(f"{part}: not the same frames in both runs (other episodes, probes or lengths)")
        else:
            worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
            print(f"{part}: largest per-frame PSNR difference {worst:.5f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
