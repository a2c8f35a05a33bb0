"""Put a fine-tuned decoder into an exported checkpoint, keeping its world model.

    python scripts/pair_decoder.py CHECKPOINT AUTOENCODER OUT

AUTOENCODER is a run folder (or its autoencoder/ folder) of
`worldsim train --stage ae --ae-init CHECKPOINT --ae-train decoder`, which learned only the
decoder: the encoder and latent scale are CHECKPOINT's, so its FAR weights read the same
latents. That run already writes RUN/checkpoint; this script pairs them afterwards, e.g. when
the decoder was trained elsewhere and only its autoencoder/ folder came back. It refuses an
autoencoder whose encoder differs. OUT must be a new folder; it is written whole into a temporary
folder beside it and renamed, so an interruption leaves nothing half-written (copy its files over
a checkpoint afterwards to replace that one's).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from worldsim.checkpoint import CheckpointError
from worldsim.dataset import name_the_target, readable_like_any_file
from worldsim.train import TrainError, export_with_decoder, load_autoencoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("checkpoint", help="exported checkpoint whose world model is kept")
    parser.add_argument("autoencoder", help="run folder or autoencoder folder with the fine-tuned decoder")
    parser.add_argument("out", help="folder for the paired checkpoint")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"pair_decoder: {out}: already exists; choose a new folder (then copy its files where you want them)",
              file=sys.stderr)
        return 1
    tmp = None
    try:
        ae, meta = load_autoencoder(args.autoencoder)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        # an exported checkpoint's autoencoder has no step count of its own decoder training
        step = int(meta["step"]) if "step" in meta else None
        export_with_decoder(tmp, Path(args.checkpoint), ae, step, bool(meta.get("final", True)), args.autoencoder)
        readable_like_any_file(tmp)  # mkdtemp's 0700
        os.replace(tmp, out)
        tmp = None
    except (TrainError, CheckpointError, OSError) as exc:
        if isinstance(exc, OSError):  # a full disk: name OUT, not the temp folder that is removed
            name_the_target(exc, out)
        print(f"pair_decoder: {exc}", file=sys.stderr)
        return 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out}: the world model of {args.checkpoint} with the autoencoder of {args.autoencoder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
