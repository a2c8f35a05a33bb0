"""Rewrite an exported checkpoint with its transformer's weights stored in bfloat16 (or back).

    python scripts/store_far_bf16.py CHECKPOINT OUT
    python scripts/store_far_bf16.py CHECKPOINT OUT --far-dtype float32

bfloat16 halves the transformer's share of model.safetensors, so a transformer twice the
shipped size still fits the 100 MB budget of `checkpoints/` (and each shipped version adds
half as much to git). The autoencoder stays float32: its reconstructions are what the 30 dB
bar scores. Loading upcasts to float32, so every command reads the result as before; what
changes is that each transformer weight is rounded to bfloat16 once. Play in bf16 (its default
on a CPU with native bf16) rounds them the same way when it loads them, so there it plays the
same frames; measure the rest (the fp32 eval) with `worldsim eval`. Other files in CHECKPOINT (the model card) are
copied. OUT must not exist yet; it is written as a temp folder and renamed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from worldsim.checkpoint import (CONFIG_NAME, FAR_DTYPES, WEIGHTS_NAME, CheckpointError, load_checkpoint,
                                 release_temp_twin, save_checkpoint, temp_twin)
from worldsim.cli import stops_on_sigterm
from worldsim.dataset import name_the_target, readable_like_any_file


def store(checkpoint: Path, out: Path, far_dtype: str) -> Path:
    """Write `checkpoint` to the new folder `out` with the transformer stored in `far_dtype`."""
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new folder")
    ck = load_checkpoint(checkpoint, device="cpu")
    tmp = temp_twin(out)
    try:
        for item in checkpoint.iterdir():
            if item.is_file() and item.name not in (CONFIG_NAME, WEIGHTS_NAME):
                shutil.copy2(item, tmp / item.name)
        save_checkpoint(tmp, ck.autoencoder, ck.far, action_names=ck.action_names, resolution=ck.resolution,
                        sampler=ck.sampler, simulator=ck.simulator, data_summary=ck.config.get("data"),
                        step=ck.step, extra=ck.config.get("extra"), far_dtype=far_dtype)
        readable_like_any_file(tmp)
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            name_the_target(exc, out)
        raise
    finally:
        release_temp_twin(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoint", help="exported checkpoint folder")
    parser.add_argument("out", help="new folder for the rewritten checkpoint")
    parser.add_argument("--far-dtype", choices=sorted(FAR_DTYPES), default="bfloat16",
                        help="how to store the transformer's floating-point weights (default: bfloat16)")
    args = parser.parse_args(argv)
    src, out = Path(args.checkpoint), Path(args.out)
    try:
        with stops_on_sigterm():
            store(src, out, args.far_dtype)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the temp folder is gone, OUT never half-written
        print(f"store_far_bf16: interrupted; {out} not written", file=sys.stderr)
        return 130
    except (CheckpointError, OSError) as exc:
        print(f"store_far_bf16: {exc}", file=sys.stderr)
        return 1
    before = (src / WEIGHTS_NAME).stat().st_size
    after = (out / WEIGHTS_NAME).stat().st_size
    print(f"wrote {out}: transformer stored in {args.far_dtype}, {WEIGHTS_NAME} {before:,} -> {after:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
