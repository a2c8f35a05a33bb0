"""Carry a trained transformer home without its autoencoder, then pair it with that autoencoder again.

    python scripts/transport_far.py strip CHECKPOINT OUT      # on the GPU machine
    python scripts/transport_far.py join STRIPPED AUTOENCODER_CHECKPOINT OUT   # here

The device tool returns at most 64 MiB per call. A run started with `--ae-from` a shipped
checkpoint keeps that autoencoder bit for bit, so its 11 MB need not travel: `strip` writes
CHECKPOINT's config.json and its `far.*` tensors (as stored, e.g. bfloat16) to OUT, with the
SHA-256 of the autoencoder they were trained on. `join` rebuilds a full checkpoint from them and
the autoencoder of AUTOENCODER_CHECKPOINT, and refuses one whose autoencoder differs (its
latents would not be the ones the transformer learned). Both write their OUT atomically; OUT
must not exist yet.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from worldsim.checkpoint import (CONFIG_NAME, FAR_DTYPES, CheckpointError, check_tensors, load_checkpoint,
                                 read_config, release_temp_twin, save_checkpoint, save_tensors, stored_far_dtype,
                                 temp_twin)
from worldsim.cli import stops_on_sigterm
from worldsim.dataset import name_the_target, readable_like_any_file
from worldsim.latents import tensors_hash
from worldsim.model import FAR, FARConfig

FAR_FILE = "far.safetensors"


def _new_folder(out: Path) -> Path:
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new folder")
    return temp_twin(out)


def strip(checkpoint: Path, out: Path) -> Path:
    """Write CHECKPOINT's transformer tensors and config to OUT, without the autoencoder."""
    ck = load_checkpoint(checkpoint, device="cpu")
    stored = load_file(str(checkpoint / ck.config["weights"]["file"]))
    far = {k: v for k, v in stored.items() if k.startswith("far.")}
    tmp = _new_folder(out)
    try:
        save_tensors(far, tmp / FAR_FILE, {"autoencoder_sha256": tensors_hash(ck.autoencoder.state_dict())})
        shutil.copy2(checkpoint / CONFIG_NAME, tmp / CONFIG_NAME)
        readable_like_any_file(tmp)  # mkdtemp's 0700, safetensors' 0600
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk: name OUT, not the temp folder that is gone
            name_the_target(exc, out)
        raise
    finally:
        release_temp_twin(tmp)
    return out


def join(stripped: Path, autoencoder_checkpoint: Path, out: Path) -> Path:
    """Pair STRIPPED's transformer with AUTOENCODER_CHECKPOINT's autoencoder into the checkpoint OUT."""
    from safetensors import safe_open

    config = read_config(stripped)  # a stripped folder keeps its checkpoint's config.json
    far_file = stripped / FAR_FILE
    try:  # a copy cut short on its way home is the likely damage
        with safe_open(str(far_file), "pt") as f:
            wanted = (f.metadata() or {}).get("autoencoder_sha256")
        tensors = load_file(str(far_file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(far_file, f"unreadable transformer weights ({exc})") from None
    base = load_checkpoint(autoencoder_checkpoint, device="cpu")
    if base.config["autoencoder"] != config["autoencoder"] or tensors_hash(base.autoencoder.state_dict()) != wanted:
        raise CheckpointError(autoencoder_checkpoint, f"its autoencoder is not the one the transformer in {stripped} "
                                                      "was trained on (config or weights differ)")
    far = FAR(FARConfig.from_dict(config["far"]))
    unexpected = sorted(set(tensors) - {"far." + k for k in far.state_dict()})
    if unexpected:
        raise CheckpointError(far_file, f"unexpected tensor(s) {unexpected[:5]}")
    given = {k[len("far."):]: v for k, v in tensors.items()}
    check_tensors(far_file, far, given, prefix="far.", float_dtype=FAR_DTYPES[stored_far_dtype(config)])
    far.load_state_dict({k: v.float() for k, v in given.items()}, strict=True)
    tmp = _new_folder(out)
    try:
        save_checkpoint(tmp / "ck", base.autoencoder, far, action_names=config["action_names"],
                        resolution=config["resolution"], sampler=config["sampler"], simulator=config.get("simulator"),
                        data_summary=config.get("data"), step=config.get("step", 0), extra=config.get("extra"),
                        far_dtype=stored_far_dtype(config))
        os.replace(tmp / "ck", out)
    except OSError as exc:  # a full disk: name OUT, not the temp folder that is gone
        name_the_target(exc, out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        release_temp_twin(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("strip", help="checkpoint -> its transformer alone")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("join", help="a stripped transformer + the checkpoint holding its autoencoder -> a checkpoint")
    p.add_argument("stripped", type=Path)
    p.add_argument("autoencoder_checkpoint", type=Path)
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        with stops_on_sigterm():
            if args.command == "strip":
                strip(args.checkpoint, args.out)
            else:
                join(args.stripped, args.autoencoder_checkpoint, args.out)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the temp folder is gone, OUT never half-written
        print(f"transport_far: interrupted; {args.out} not written", file=sys.stderr)
        return 130
    except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
        print(f"transport_far: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
