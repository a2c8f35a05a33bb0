"""Fit the frame autoencoder and the FAR world model on recorded trajectories.

    worldsim train --data data/maze --preset small --out runs/small            # both stages
    worldsim train --data data/maze --stage ae --out runs/ae                    # autoencoder only
    worldsim train --data data/maze --stage far --ae-from runs/ae --out runs/far
    worldsim train --resume runs/small                                          # continue exactly
    worldsim train --resume runs/small --far-steps 20000                        # ... and train longer
    worldsim train --stream-env worldsim/Maze-v0 --stage far --ae-from checkpoints/maze-far-small --out runs/live
                                                                   # ... on fresh episodes from the simulator
    torchrun --nproc_per_node=8 train.py --data data/maze --preset base --out runs/base

Stages: `ae` trains the autoencoder on single frames; `far` encodes every frame once with the
frozen autoencoder (latent cache in RUN/latents/, keyed by the autoencoder's weights hash) and
trains FAR on random windows of `--seq-len` frames from random episodes (frames older than the
model's window W become coarse long-term context); `both` runs them in order.

Run folder:
    config.json            the whole configuration (training, autoencoder, FAR, objective)
    autoencoder/           the trained autoencoder (EMA weights + config.json)
    checkpoint/            the exported world model (EMA weights, DESIGN.md format) for play/eval
    state/                 the resumable training state: weights.safetensors (model, EMA,
                           optimizer tensors, RNG states) + state.json (step, optimizer
                           hyper-parameters, RNG states, ...); never pickles
    latents/               the latent cache (reused when valid; copy an earlier run's, e.g.
                           `cp -al OLD/latents NEW/latents`, to skip encoding the same data)
    frames/                while the autoencoder stage trains: its frames uncompressed (12 KiB a
                           64x64 frame), memory-mapped; removed when the stage finishes
    metrics.jsonl, loss.png, preview/step-XXXXXX.gif
                           (a validation row's `val_on` is "train" where the data held no
                           val episodes and the train ones stood in)

Saving: every `--checkpoint-every` steps, at the end of a stage and on Ctrl-C (SIGINT/SIGTERM:
the step in progress finishes, everything is saved, the command exits with 130). A save writes
a new folder beside the old one and swaps it in; a crash at any moment leaves the previous
state loadable. `--resume RUN` restores model, EMA, optimizer, schedule, step and RNG states;
the batch and noise of step s are a pure function of (seed, rank, s), so a resumed run
continues with exactly the same data order as an uninterrupted one. A run that diverges (a loss
or gradient norm that is not finite at a step, or a validation loss before a save) stops before
that step's update and save, exit 2, in one line naming the step and the save it kept.

Several GPUs or machines: launch the same command with torchrun (WORLD_SIZE/RANK/LOCAL_RANK
are read from the environment; nccl on CUDA, gloo on CPU). Every rank draws its own samples,
gradients are averaged by DDP, only rank 0 writes. `--far-batch` is per rank. Ctrl-C or SIGTERM
to torchrun saves as above, but torchrun itself then exits with 1 and prints a ChildFailedError
naming a rank that got the signal: the run is saved all the same (the log says "interrupted at step N;
saved").
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn

from worldsim import cliargs
from worldsim.checkpoint import CheckpointError, check_field_types, check_tensors
from worldsim.dataset import (DatasetError, atomic_write, caption_strip, file_in_the_way, name_the_target,
                              readable_like_any_file, sweep_dead_twins, try_lock, write_gif, write_json_atomic)
from worldsim.ddp import Dist, cpu_threads_per_rank
from worldsim.latents import (
    FRAMES_KEY, EpisodeReader, FrameStore, LatentStore, build_cache, check_compatible, holding_split, load_cached,
    names_for, read_episodes, split_source, tensors_hash,
)
from worldsim.model import DeviceError

STATE_FORMAT = "worldsim-train-state"
STATE_VERSION = 1
CONFIG_FORMAT = "worldsim-train-config"


class TrainError(RuntimeError):
    """The training cannot start or continue (message says what and where)."""


# ============================================================================ configuration


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list, metadata={
        "help": "dataset folder(s) or FAR/TECO DMLab .npz file(s); trains on split train, validates on val"})
    out: str = field(default="runs/train", metadata={"help": "run folder (checkpoints, state, logs, previews)"})
    stage: Literal["ae", "far", "both"] = field(default="both", metadata={"help": "what to train"})
    preset: str = field(default="small", metadata={"help": "named preset (tiny, small, base): model sizes and the hyper-parameters below"})
    ae_from: str | None = field(default=None, metadata={
        "help": "stage far: take the autoencoder from this run folder, autoencoder folder or exported checkpoint"})
    ae_init: str | None = field(default=None, metadata={
        "help": "stage ae: start from the autoencoder of this run folder, autoencoder folder or exported checkpoint "
                "(fresh optimizer; its shape replaces the --ae-* shape options)"})
    ae_train: Literal["all", "decoder"] = field(default="all", metadata={
        "help": "stage ae: what learns; `decoder` keeps the encoder and latent scale of --ae-init, so its latents, "
                "and any FAR trained on them, stay valid (an --ae-init checkpoint is re-exported with the new "
                "decoder in RUN/checkpoint)"})
    ae_loss: Literal["l1+mse", "mse"] = field(default="l1+mse", metadata={
        "help": "stage ae: pixel loss; `mse` alone is what PSNR scores, for fine-tuning a trained autoencoder "
                "or decoder (L1 + MSE is steadier from scratch)"})
    far_init: str | None = field(default=None, metadata={
        "help": "stage far: start from the FAR weights of this exported checkpoint or run folder (fresh optimizer; "
                "the FAR shape and the exported sampler defaults are taken from it), e.g. to continue training "
                "the shipped model; with a larger --far-depth the model is deepened: new blocks, spread between "
                "the given ones, start as identities (AdaLN-Zero), so training starts from the same predictions; "
                "--far-window may differ (no weight depends on it)"})
    # schedule
    ae_steps: int = field(default=3000, metadata={"help": "autoencoder optimisation steps"})
    far_steps: int = field(default=3000, metadata={"help": "FAR optimisation steps"})
    ae_time_limit: float = field(default=0.0, metadata={
        "help": "stage ae: also stop after this many seconds of the stage's wall time (0: no limit); the cosine "
                "decay follows steps or time, whichever is further along, so it reaches its floor by the limit"})
    far_time_limit: float = field(default=0.0, metadata={
        "help": "stage far: the same wall-clock limit for the transformer, e.g. 480 to use a lent GPU for "
                "8 minutes; the run ends with a full save and export, as if its steps were done"})
    ae_batch: int = field(default=32, metadata={"help": "autoencoder batch (frames per rank)"})
    far_batch: int = field(default=16, metadata={"help": "FAR batch (sequences per rank)"})
    seq_len: int = field(default=32, metadata={"help": "frames per FAR training sample (> window: the oldest become coarse context)"})
    ae_lr: float = field(default=1e-3, metadata={"help": "autoencoder peak learning rate (0 to 1)"})
    far_lr: float = field(default=3e-4, metadata={"help": "FAR peak learning rate (0 to 1)"})
    warmup: int = field(default=200, metadata={"help": "linear warm-up steps"})
    cosine: bool = field(default=True, metadata={"help": "cosine decay after warm-up"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr of the cosine decay"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0 disables)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the weights used for sampling and export"})
    precision: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={
        "help": "bf16 autocast or fp32. auto: bf16 on GPU; on a CPU with native bf16 (AVX512-BF16 or AMX) bf16 "
                 "for the transformer stage (measured: the same val loss per step at 1.2-1.35x the steps per second) "
                 "and fp32 for the autoencoder (its reconstructions are what the 30 dB bar scores); fp32 on other CPUs"})
    seed: int = field(default=0, metadata={"help": "seed (data order, noise, initialisation), 0 to 2**32 - 1"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    # None, not 0, for "all cores", as in play, eval, bench and record's --workers, which refuse 0
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads per rank, >= 1 (default: all cores / ranks on this machine)"})
    ddp_timeout: float = field(default=1800.0, metadata={
        "help": "seconds a DDP rank waits at a collective before giving up; raise it when rank 0's first "
                "encoding of a large dataset into the latent cache takes longer (the others wait for it)"})
    # bookkeeping
    checkpoint_every: int = field(default=500, metadata={"help": "save state and export every N steps"})
    far_save_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "how the exported checkpoint stores the transformer's weights: bfloat16 halves the file "
                 "(loading upcasts to float32; the autoencoder is always stored in float32)"})
    val_every: int = field(default=250, metadata={"help": "validation loss every N steps (0: only at the end)"})
    val_batches: int = field(default=4, metadata={"help": "batches per validation (fixed samples)"})
    log_every: int = field(default=10, metadata={"help": "metrics.jsonl line every N steps"})
    preview_every: int = field(default=1000, metadata={"help": "preview GIF every N FAR steps, drawn from the checkpoint exported then (0: only at the end; -1: never)"})
    preview_context: int = field(default=8, metadata={"help": "preview: ground-truth context frames"})
    preview_frames: int = field(default=16, metadata={"help": "preview: generated frames"})
    # None: 32 on a CPU, where 512 maze frames encoded in 1.3 CPU s against 2.0 at 256, to the same latents
    # (session 31: the shipped autoencoder's encode timed on data/maze-val, 1 thread); 256 on a GPU
    latent_batch: int | None = field(default=None, metadata={
        "help": "frames per autoencoder call when building the latent cache (default: 32 on a CPU, 256 on a GPU)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (on a terminal; never in a redirected log)"})
    # streaming
    stream_env: str | None = field(default=None, metadata={
        "help": "train the transformer on fresh episodes recorded in background workers from this simulator "
                "(e.g. worldsim/Maze-v0), instead of --data; needs --ae-from, an autoencoder trained on recorded data"})
    stream_env_arg: tuple[str, ...] = field(default=(), metadata={"help": "simulator settings key=value for --stream-env"})
    stream_workers: int = field(default=1, metadata={"help": "recording worker processes for --stream-env (the episodes a step samples depend on their timing: a streaming run is not reproducible)"})
    stream_length: int = field(default=128, metadata={"help": "frames per streamed episode"})
    stream_buffer: int = field(default=64, metadata={"help": "episodes kept for sampling (oldest dropped)"})
    stream_policy: Literal["random", "navigator", "mix"] = field(default="mix", metadata={"help": "policy of the streaming workers"})


# Presets: model presets from the model files plus training hyper-parameters.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {  # tests: seconds on a CPU
        "ae": "tiny", "far": "tiny",
        "train": dict(ae_steps=20, far_steps=20, ae_batch=8, far_batch=2, seq_len=6, warmup=5,
                      checkpoint_every=10, val_every=10, val_batches=1, log_every=1, preview_every=0,
                      preview_context=3, preview_frames=3, ema_decay=0.99),
    },
    "small": {  # what trains on 2 CPU cores (shared/notes/cpu-training-calibration.md)
        "ae": "small", "far": "small",
        "train": dict(ae_steps=3000, far_steps=3000, ae_batch=32, far_batch=16, seq_len=32),
    },
    "base": {  # the paper's FAR-B-Long on a GPU
        "ae": "base", "far": "far-b-long",
        "train": dict(ae_steps=20000, far_steps=100000, ae_batch=64, far_batch=32, seq_len=64,
                      far_lr=1e-4, warmup=2000, checkpoint_every=2000, val_every=1000, preview_every=5000,
                      ema_decay=0.9999),
    },
}

# fields derived from the data / the autoencoder, not set by hand
_DERIVED_AE = ("resolution",)
_DERIVED_FAR = ("latent_channels", "latent_size", "num_actions")


def _model_modules():
    from worldsim import autoencoder as ae_mod
    from worldsim import model as far_mod
    from worldsim import objective as obj_mod

    return ae_mod, far_mod, obj_mod


def _prefixed_dataclass(cls: type, prefix: str, skip: tuple[str, ...]) -> type:
    """A copy of `cls` whose fields are `prefix_field`, all optional with default None."""
    import typing

    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        fields.append((f"{prefix}_{f.name}", tp | None, field(default=None, metadata=dict(f.metadata))))
    return dataclasses.make_dataclass(f"{prefix.capitalize()}Overrides", fields)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ae_mod, far_mod, obj_mod = _model_modules()
    parser.add_argument("--resume", metavar="RUN", default=None,
                        help="continue the run in this folder exactly (its config.json; options given here override; "
                             "more --far-steps/--ae-steps stretch the cosine schedule: the rate rises at once to "
                             "the longer schedule's, no second warm-up)")
    before = len(parser._actions)
    cliargs.add_dataclass_arguments(parser, TrainConfig)
    for action in parser._actions[before:]:
        action.default = argparse.SUPPRESS  # only what is given on the command line overrides the preset
    import textwrap

    lines = ["presets (model presets from autoencoder.AE_PRESETS / model.PRESETS + training options):"]
    for k, v in TRAIN_PRESETS.items():
        text = f"{k}: ae={v['ae']} far={v['far']} " + " ".join(f"{a}={b}" for a, b in v["train"].items())
        lines += textwrap.wrap(text, 96, initial_indent="  ", subsequent_indent="      ")
    lines += ["", *textwrap.wrap(
        "Options without a preset value keep the defaults shown. Model options --ae-*, --far-*, --obj-* default "
        "to the preset's AutoencoderConfig / FARConfig / ObjectiveConfig; the resolution and the number of actions "
        "follow the data, and the transformer's latent size and channels the autoencoder's (--ae-down-factor, "
        "--ae-latent-channels). On --resume, given options override the "
        "stored config (e.g. more --far-steps); the model shape cannot change.", 96)]
    parser.epilog = "\n".join(lines)
    for cls, prefix, skip in ((ae_mod.AutoencoderConfig, "ae", _DERIVED_AE),
                              (far_mod.FARConfig, "far", _DERIVED_FAR),
                              (obj_mod.ObjectiveConfig, "obj", ())):
        before = len(parser._actions)
        # None there only means "not given: the preset's value"
        cliargs.add_dataclass_arguments(parser, _prefixed_dataclass(cls, prefix, skip), none_word=False)
        defaults = {f"{prefix}_{f.name}": f.default for f in dataclasses.fields(cls)} if prefix == "obj" else {}
        for action in parser._actions[before:]:
            action.default = argparse.SUPPRESS
            text = f"(default: {defaults[action.dest]})" if action.dest in defaults else "(default: from the preset)"
            action.help = (action.help or "").replace("(default: none)", text)


@dataclass
class RunConfig:
    """Everything a run needs, stored as RUN/config.json."""

    train: TrainConfig
    autoencoder: Any  # AutoencoderConfig
    far: Any  # FARConfig
    objective: Any  # ObjectiveConfig

    def to_dict(self) -> dict:
        t = dataclasses.asdict(self.train)
        t["stream_env_arg"] = list(self.train.stream_env_arg)
        return {"format": CONFIG_FORMAT, "version": 1, "train": t, "autoencoder": self.autoencoder.to_dict(),
                "far": self.far.to_dict(), "objective": dataclasses.asdict(self.objective)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        ae_mod, far_mod, obj_mod = _model_modules()
        # a hand-edited value of the wrong type, or a model key deleted, named here rather than mid-run
        # (or never: a run without far.window resumed with the default 16 and exported it). Options
        # added since a run started may be absent (their defaults), as may the model keys whose
        # absence older runs' configs give a meaning to (FARConfig.from_dict, MAY_BE_ABSENT).
        sections = (("train", TrainConfig, None), ("objective", obj_mod.ObjectiveConfig, None),
                    ("autoencoder", ae_mod.AutoencoderConfig, ("decoder_blocks_per_level",)),
                    ("far", far_mod.FARConfig, ("clean_t", "long_context_t", "memory_span")))
        for what, kind, absent_ok in sections:
            try:
                check_field_types(kind, d[what], what, "", [f.name for f in dataclasses.fields(kind)]
                                  if absent_ok is None else absent_ok)
            except CheckpointError as exc:
                raise TypeError(exc.problem.removeprefix("config.json: ")) from None
        t = dict(d["train"])
        t["stream_env_arg"] = tuple(t.get("stream_env_arg", ()))
        if t.get("threads") == 0:  # written before 0 was refused, where it meant what None means now
            t["threads"] = None
        return cls(TrainConfig(**t), ae_mod.AutoencoderConfig.from_dict(d["autoencoder"]),
                   far_mod.FARConfig.from_dict(d["far"]), obj_mod.ObjectiveConfig(**d["objective"]))


def _given(args: argparse.Namespace, prefix: str | None = None) -> dict[str, Any]:
    out = {}
    for k, v in vars(args).items():
        if prefix is None:
            if k in {f.name for f in dataclasses.fields(TrainConfig)}:
                out[k] = tuple(v) if k == "stream_env_arg" else v
        elif k.startswith(prefix + "_"):
            out[k[len(prefix) + 1:]] = tuple(v) if isinstance(v, list) else v
    return out


# The largest peak learning rate a run takes. AdamW's step moves each weight by about the rate whatever
# the gradients' scale (m / sqrt(v) is of order 1), and these weights are of order 0.01 to 1: a rate above
# 1 rewrites every weight each step, so it is a typo (1e3 for 1e-3), not a setting. Past about 3e37 its
# bias-corrected step (rate / (1 - beta1)) no longer fits a float32 and AdamW stopped with a traceback
# ("value cannot be converted to type float without overflow") after the run folder was written; below 1
# it fits for any --beta1 < 1.
MAX_LR = 1.0


def check_numbers(train: TrainConfig, new_run: bool = True, new_seed: bool = False) -> None:
    """Values no run can use, refused by option name before the run folder is written (a bad
    override on --resume would otherwise be stored and fail every later resume). `new_seed`: a
    resume given another --seed than the run's, checked as a new run's."""
    at_least = {1: ("ae_batch", "far_batch", "seq_len", "checkpoint_every", "val_batches", "log_every",
                    "preview_frames", "latent_batch", "stream_workers", "stream_length", "stream_buffer", "threads"),
                0: ("ae_steps", "far_steps", "warmup", "val_every", "preview_context")}
    for low, names in at_least.items():
        for name in names:
            if getattr(train, name) is not None and getattr(train, name) < low:  # None: the device's default
                raise TrainError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(train, name)}")
    # New runs take 32-bit seeds: step_rng keeps a seed's low 32 bits and torch's CPU generator does too,
    # so --seed 2**32 trained exactly the run of --seed 0. A run started before this check (with a
    # negative or a larger seed) still resumes; torch seeds with seed + 1 too: 64 bits.
    if (new_run or new_seed) and not 0 <= train.seed < 2**32:
        raise TrainError(f"--seed must be from 0 to 2**32 - 1, got {train.seed}")
    if not -2**63 <= train.seed < 2**63 - 1:
        raise TrainError(f"--seed must be from 0 to 2**32 - 1, got {train.seed}")
    if not 0 < train.ddp_timeout < float("inf"):
        raise TrainError(f"--ddp-timeout must be a finite number > 0, got {train.ddp_timeout}")
    for name in ("ae_lr", "far_lr"):
        value = getattr(train, name)
        if not 0 <= value <= MAX_LR:  # NaN too; 0 is a run that changes nothing (tests use it)
            raise TrainError(f"--{name.replace('_', '-')} must be a number from 0 to {MAX_LR:g} (AdamW moves each "
                             f"weight by about the rate every step), got {value}")
    for name in ("weight_decay", "grad_clip", "ae_time_limit", "far_time_limit"):
        value = getattr(train, name)
        if not 0 <= value < float("inf"):
            raise TrainError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not (0 <= train.beta1 < 1 and 0 <= train.beta2 < 1):
        raise TrainError(f"--beta1 and --beta2 must be in [0, 1), got {train.beta1} and {train.beta2}")
    if train.stage != "ae" and train.seq_len < 2:  # one frame has no context and no action to learn from
        raise TrainError(f"--seq-len must be >= 2 for the far stage (a context frame and the frame after it), "
                         f"got {train.seq_len}")
    if not 0 <= train.ema_decay < 1 or not 0 <= train.min_lr_ratio <= 1:
        raise TrainError(f"--ema-decay must be in [0, 1) and --min-lr-ratio in [0, 1], got {train.ema_decay} "
                         f"and {train.min_lr_ratio}")
    if train.stage == "both" and train.ae_steps == 0 and not train.ae_from:
        # the far stage would then stop for want of an autoencoder, saying to train one with --stage both
        raise TrainError("--ae-steps 0 trains no autoencoder for the far stage of --stage both: give --ae-steps "
                         "N >= 1, or train only the transformer with --stage far --ae-from RUN_OR_CHECKPOINT")
    if train.preview_every < -1:
        raise TrainError(f"--preview-every must be >= -1 (-1: never), got {train.preview_every}")
    if train.ae_train == "decoder" and train.stage == "both" and not train.far_init:
        # the far stage would train a new transformer from scratch over the checkpoint the decoder was paired with
        raise TrainError("--ae-train decoder fine-tunes the decoder of an exported checkpoint: give --stage ae "
                         "(the default stage, both, would then train a new transformer over the result)")


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, bool]:
    """(config, resuming). A new run: preset + overrides; a resumed run: its config + overrides."""
    ae_mod, far_mod, obj_mod = _model_modules()
    train_over = _given(args)
    ae_over, far_over, obj_over = _given(args, "ae"), _given(args, "far"), _given(args, "obj")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for prefix, over in (("ae", ae_over), ("far", far_over)):  # --ae-init, --ae-loss, --far-lr, ...: TrainConfig fields
        for k in [k for k in over if f"{prefix}_{k}" in train_fields]:
            over.pop(k)
    resume = getattr(args, "resume", None)
    if resume:
        path = Path(resume) / "config.json"
        if not path.is_file():
            raise TrainError(f"{resume}: not a training run folder (no config.json)")
        if _read_json_object(path).get("format") == "worldsim-checkpoint":
            raise TrainError(f"--resume {resume}: an exported checkpoint, not a training run; to train on from it, "
                             f"start a new run with --far-init {resume} --ae-from {resume}")
        try:
            stored_dict = json.loads(path.read_text())
            if isinstance(stored_dict, dict) and isinstance(stored_dict.get("objective"), dict):
                # the objective options given now apply before its checks: a run that recorded a
                # combination refused since (rollout_aug without rollout_prob) resumes with the fix given
                stored_dict["objective"] = {**stored_dict["objective"], **obj_over}
            run = RunConfig.from_dict(stored_dict)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            hint = "; objective options given with --resume replace the stored ones" if "objective" in str(exc) else ""
            raise TrainError(f"{path}: unreadable training config ({exc}){hint}") from None
        stored = {**dataclasses.asdict(run.autoencoder), "decoder_blocks_per_level": run.autoencoder.decoder_blocks}
        changed = [f"--ae-{k}" for k, v in ae_over.items() if stored[k] != v] + \
                  [f"--far-{k}" for k, v in far_over.items() if getattr(run.far, k) != v]
        if changed:  # the stored values given again are fine
            raise TrainError(f"--resume {resume}: the model shape cannot change on resume "
                             f"(got {', '.join(k.replace('_', '-') for k in changed)})")
        if "out" in train_over and Path(train_over["out"]).resolve() != Path(resume).resolve():
            raise TrainError("--resume continues in the run folder itself; do not pass a different --out")
        # stream_env too: added to a run trained on --data, it dropped that data from the run's record
        fixed = [k for k in ("preset", "ae_init", "ae_train", "far_init", "stream_env")
                 if k in train_over and train_over[k] != getattr(run.train, k)]
        if fixed:
            raise TrainError(f"--resume {resume}: {', '.join('--' + k.replace('_', '-') for k in fixed)} cannot change "
                             f"on resume (the run started from its stored value); start a new run instead")
        train_over["out"] = str(resume)
        stored_seed = run.train.seed
        run.train = dataclasses.replace(run.train, **train_over)
        check_numbers(run.train, new_run=False, new_seed=run.train.seed != stored_seed)
        run.objective = dataclasses.replace(run.objective, **obj_over)
        check_objective(run)
        return run, True
    preset_name = train_over.get("preset", TrainConfig.preset)
    if preset_name not in TRAIN_PRESETS:
        raise TrainError(f"unknown preset {preset_name!r} (known: {', '.join(TRAIN_PRESETS)})")
    preset = TRAIN_PRESETS[preset_name]
    train = dataclasses.replace(TrainConfig(), **{**preset["train"], **train_over})
    check_numbers(train)
    ae_base = ae_mod.AE_PRESETS[preset["ae"]]
    if train.ae_init:
        ae_base = load_autoencoder(train.ae_init)[0].config
        changed = {k: v for k, v in ae_over.items() if getattr(ae_base, k) != v}
        if train.ae_train == "decoder" and "decoder_blocks_per_level" in changed:
            if changed.pop("decoder_blocks_per_level") < ae_base.decoder_blocks:
                raise TrainError(f"--ae-decoder-blocks-per-level {ae_over['decoder_blocks_per_level']}: the decoder of "
                                 f"--ae-init {train.ae_init} has {ae_base.decoder_blocks} blocks per level; it can "
                                 "only be deepened")
        if changed:
            raise TrainError(f"--ae-init {train.ae_init}: the autoencoder shape comes from it; drop "
                             f"{', '.join('--ae-' + k.replace('_', '-') for k in changed)}")
    elif train.ae_train != "all":
        raise TrainError(f"--ae-train {train.ae_train} fine-tunes an existing autoencoder: give --ae-init")
    if (train.ae_init or train.ae_train != "all") and train.stage == "far":
        raise TrainError("--ae-init / --ae-train belong to stage ae (or both); for stage far give --ae-from")
    ae_cfg = dataclasses.replace(ae_base, **ae_over)
    far_base = far_mod.PRESETS[preset["far"]]
    if train.far_init:
        from worldsim.checkpoint import CheckpointError, read_config

        try:
            far_base = far_mod.FARConfig.from_dict(read_config(_init_far_dir(train.far_init))["far"])
        except CheckpointError as exc:
            raise TrainError(f"--far-init: {exc}") from None
        # checked here, before the run folder is written: the shape comes from it, except a greater depth,
        # the window and the memory span (which no weight depends on)
        changed = {k: v for k, v in far_over.items() if getattr(far_base, k) != v}
        if changed.get("depth", far_base.depth) > far_base.depth:
            changed.pop("depth")
        changed.pop("window", None)
        changed.pop("memory_span", None)
        if changed:
            learned = [k for k in changed if k in ("clean_t", "long_context_t", "rope_theta")]
            why = (f"; {', '.join(learned)} must stay as the weights were trained with" if learned else "")
            raise TrainError(f"--far-init {train.far_init}: its FAR settings differ from this run's (checkpoint vs run): "
                             f"{ {k: (getattr(far_base, k), v) for k, v in changed.items()} }; they come from "
                             f"it{why}: drop {', '.join('--far-' + k.replace('_', '-') for k in changed)} (only "
                             f"--far-depth may grow it, and --far-window and --far-memory-span may change)")
    far_cfg = dataclasses.replace(far_base, **far_over)
    obj_cfg = dataclasses.replace(obj_mod.ObjectiveConfig(), **obj_over)
    run = RunConfig(train, ae_cfg, far_cfg, obj_cfg)
    check_objective(run)
    return run, False


def check_objective(run: RunConfig) -> None:
    """Objective options this run's samples can never use, refused by name: they trained exactly
    as without them, while the run's config said otherwise."""
    t, o, window = run.train, run.objective, run.far.window
    if t.stage == "ae":
        return
    if o.blind_window_prob > 0 and (t.seq_len <= window or o.short_context_prob == 1):
        raise TrainError(f"--obj-blind-window-prob hides the window so that the long-term context must tell the "
                         f"frames: it needs samples longer than the window (--seq-len > {window}, got {t.seq_len}) "
                         "that keep their long-term context (--obj-short-context-prob < 1)")
    if o.rollout_prob > 0 and t.seq_len < 3:
        raise TrainError(f"--obj-rollout-prob predicts a frame after the model's own rollout of the frames before it: "
                         f"it needs --seq-len >= 3 (a context frame, a rolled-out frame and the last), got {t.seq_len}")


# ============================================================================ small utilities


def step_rng(seed: int, rank: int, step: int, stream: int = 0) -> tuple[np.random.Generator, int]:
    """numpy generator + torch seed for (seed, rank, step): the data and noise of every step are
    a pure function of these, so a resumed run draws exactly what an uninterrupted one would."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), int(step), int(stream)])
    np_ss, torch_ss = ss.spawn(2)
    # int() before the shift: NumPy 1.x refuses np.uint64 >> a Python int (uint64 with int64 has no
    # integer type in common); the value is the same as NumPy 2's
    return np.random.default_rng(np_ss), int(torch_ss.generate_state(1, dtype=np.uint64)[0]) >> 1


def lr_at(step: int, total: int, peak: float, warmup: int, cosine: bool, min_ratio: float,
          time_fraction: float = 0.0, warmup_end_fraction: float = 0.0) -> float:
    """Linear warm-up to `peak`, then constant or cosine decay to `min_ratio * peak`.

    `time_fraction` (elapsed / time limit) moves the decay on when the wall clock is further
    along than the step count, so a time-limited stage still ends at the floor: the decay spans
    the time from the end of the warm-up (`warmup_end_fraction` of the limit) to the limit."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if not cosine or total <= warmup:
        return peak
    by_time = (time_fraction - warmup_end_fraction) / max(1e-9, 1.0 - warmup_end_fraction) if time_fraction > 0 else 0.0
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), by_time))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))
    ema_p = [p for p in ema.parameters()]
    src_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def params_sha256(model: nn.Module) -> str:
    return tensors_hash({k: v for k, v in unwrap(model).state_dict().items()})


def autocast_ctx(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def stage_precision(precision: str, device: torch.device, stage: str) -> str:
    """--precision for a stage ("ae" or "far"): auto is inference's auto (world.resolve_precision),
    except that the autoencoder trains in fp32 on CPU, and so does everything where inference's
    auto is bf16-kv (a bfloat16 KV cache: training keeps none, so its arithmetic is fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cpu" and stage == "ae":
        return "fp32"
    from worldsim.world import resolve_precision

    resolved = resolve_precision("auto", device)
    return "fp32" if resolved == "bf16-kv" else resolved


def precision_note(precision: dict[str, str], stage: str) -> str:
    stages = ("ae", "far") if stage == "both" else (stage,)
    values = {precision[s] for s in stages}
    return values.pop() if len(values) == 1 else ", ".join(f"{s} {precision[s]}" for s in stages)


def peak_rss_mib() -> float | None:
    """This process's peak resident memory in MiB; None where the platform does not say (Windows has
    no `resource` module)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # macOS: bytes; Linux: KiB


def machine_memory_bytes(device: torch.device) -> int | None:
    """Memory one rank on `device` can hope for: the GPU's, or the machine's RAM (shared by the
    ranks on it); None where the platform does not say (Windows has no sysconf)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def memory_floor(run: RunConfig) -> list[tuple[int, str, str]]:
    """A lower bound on each stage's memory per rank, with what it counts and the options that set
    it: fp32 weights, gradients and AdamW's two moments (16 bytes a parameter), and one batch held
    once (frames for the autoencoder; latents and one bf16 residual stream per block for the
    transformer). Real runs need several times more; a bound this low refuses only sizes no machine
    could train (a --far-width of 10**6 asked for 4 TB in a traceback), never one that might fit."""
    from worldsim.autoencoder import Autoencoder
    from worldsim.model import FAR

    cfg, floors = run.train, []
    with torch.device("meta"):  # parameter counts without memory
        if cfg.stage in ("ae", "both") and not cfg.stream_env:
            n = sum(p.numel() for p in Autoencoder(run.autoencoder).parameters())
            r = run.autoencoder.resolution
            floors.append((16 * n + cfg.ae_batch * run.autoencoder.in_channels * r * r * 4,
                           f"the autoencoder stage ({n:,} parameters, --ae-batch {cfg.ae_batch} frames of {r}x{r})",
                           "--ae-batch / --ae-channels"))
        if cfg.stage in ("far", "both"):
            f = run.far
            # blocks are alike: from one- and two-block shells (building 10**5 empty blocks takes minutes)
            one, two = (sum(p.numel() for p in FAR(dataclasses.replace(f, depth=d)).parameters()) for d in (1, 2))
            n = one + (f.depth - 1) * (two - one)
            tokens = tokens_per_sample(f, cfg.seq_len)["long_short"]
            floors.append((16 * n + cfg.far_batch * cfg.seq_len * f.latent_channels * f.latent_size ** 2 * 4
                           + cfg.far_batch * tokens * f.width * f.depth * 2,
                           f"the far stage ({n:,} parameters; --far-batch {cfg.far_batch} x --seq-len {cfg.seq_len}: "
                           f"{tokens} tokens a sample, width {f.width}, depth {f.depth})",
                           "--far-batch / --seq-len / --far-width / --far-depth"))
    return floors


def check_memory_floor(run: RunConfig, dist: Dist) -> None:
    """Refuse, before any data is encoded, a run whose sizes cannot fit this machine (memory_floor).
    All ranks refuse together: machines of one run may hold different memory, and a rank whose own
    machine fits went on to the next collective, where the refused rank's exit was a gloo traceback
    (and rank 0 had made the run folder)."""
    problem = None
    have = machine_memory_bytes(dist.device)
    ranks_sharing = dist.local_world_size if dist.device.type == "cpu" else 1
    for need, what, options in memory_floor(run) if have is not None else ():
        if need * ranks_sharing > have:
            where = f"{dist.device.type.upper()} memory" if dist.device.type == "cuda" else "memory"
            problem = (f"{what} needs at least {need * ranks_sharing / 2**30:,.1f} GiB"
                       + (f" ({ranks_sharing} ranks)" if ranks_sharing > 1 else "")
                       + f", but this machine has {have / 2**30:,.1f} GiB of {where}: lower {options}")
            break
    (refused,) = dist.any_flags(problem is not None)
    if refused:
        raise TrainError(problem or f"rank {dist.rank}: another rank's machine has too little memory for this "
                                    "run's sizes (its error says which and how much)")


def tokens_per_sample(far_cfg: Any, seq_len: int) -> dict[str, int]:
    """Transformer tokens of one training sample with and without the long-short context."""
    fine = far_cfg.tokens_per_frame
    coarse = far_cfg.context_tokens_per_frame
    w = min(far_cfg.window, seq_len)
    return {"long_short": w * fine + (seq_len - w) * coarse, "all_fine": seq_len * fine,
            "fine_per_frame": fine, "coarse_per_frame": coarse, "window": far_cfg.window, "frames": seq_len}


# ============================================================================ atomic folders and state


def swap_dir_atomic(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder via `write(tmp)` then swap it in; `final` or `final.old` is always complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(final.name + ".old")
    if old.exists() and not final.exists():  # an earlier save was killed between its renames
        os.replace(old, final)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):  # folders of saves killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as exc:
        name_the_target(exc, final)
        raise
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "r+b") as fh:  # Windows flushes only handles open for writing
                os.fsync(fh.fileno())
        readable_like_any_file(tmp)  # mkdtemp made it 0700
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)  # the previous one stays complete until the new one is in place
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        try:
            dfd = os.open(final.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:  # pragma: no cover
            pass
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk or the like: name the folder, not its temp twin
            name_the_target(exc, final)
        raise


def readable_dir(final: Path, marker: str) -> Path | None:
    """`final`, or `final.old` left by a save interrupted between its two renames."""
    for p in (Path(final), Path(str(final) + ".old")):
        if (p / marker).is_file():
            return p
    return None


def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.state.{pid}.{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{pid}.{k}"] = v
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        g["betas"] = list(g["betas"]) if "betas" in g else None
        groups.append(g)
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    head = prefix + ".state."
    for key, t in tensors.items():
        if key.startswith(head):
            pid, name = key[len(head):].split(".", 1)
            state.setdefault(int(pid), {})[name] = t
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if g.get("betas") is not None:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_states() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    npst = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, meta


def set_rng_states(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    if meta.get("python"):
        v, st, g = meta["python"]
        random.setstate((v, tuple(st), g))
    if meta.get("numpy"):
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _module_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous().clone() for k, v in unwrap(module).state_dict().items()}


def _load_module(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, where: Path) -> None:
    head = prefix + "."
    sd = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
    own = unwrap(module).state_dict()
    missing = sorted(set(own) - set(sd))
    if missing:
        raise TrainError(f"{where}: training state lacks {prefix} tensors {missing[:3]} (different model?)")
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise TrainError(f"{where}: {prefix}.{k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
    unwrap(module).load_state_dict(sd, strict=True)


# ============================================================================ autoencoder folder


AE_DIR = "autoencoder"
AE_WEIGHTS = "autoencoder.safetensors"


def save_autoencoder(path: Path, ae: nn.Module, extra: dict) -> None:
    from worldsim.checkpoint import save_tensors

    ae = unwrap(ae)

    def write(tmp: Path) -> None:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in ae.state_dict().items()}
        save_tensors(tensors, tmp / AE_WEIGHTS, {"format": "worldsim-autoencoder"})
        meta = {"format": "worldsim-autoencoder", "version": 1, "autoencoder": ae.config.to_dict(),
                "weights_sha256": tensors_hash(tensors), **extra}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    swap_dir_atomic(path, write)


def load_autoencoder(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """An autoencoder from a run folder, an autoencoder folder or an exported checkpoint."""
    from safetensors.torch import load_file

    ae_mod, _, _ = _model_modules()
    p = Path(path)
    candidates = [p / AE_DIR, p] if (p / AE_DIR).exists() or (p / (AE_DIR + ".old")).exists() else [p]
    for c in candidates:
        d = readable_dir(c, "config.json")
        if d is None:
            continue
        meta = _read_json_object(d / "config.json")
        if meta.get("format") == "worldsim-autoencoder":
            from safetensors import SafetensorError

            try:
                check_field_types(ae_mod.AutoencoderConfig, meta.get("autoencoder"), "autoencoder", d)
                ae = ae_mod.Autoencoder(ae_mod.AutoencoderConfig.from_dict(meta["autoencoder"]))
                tensors = load_file(str(d / AE_WEIGHTS))
                if meta.get("weights_sha256") not in (None, tensors_hash(tensors)):
                    raise TrainError(f"{d / AE_WEIGHTS}: its tensors are not those config.json records "
                                     "(weights_sha256): a torn or foreign file")
                check_tensors(d, ae, tensors)
            except CheckpointError as exc:  # the shared checks speak of checkpoints: this is an autoencoder folder
                raise TrainError(f"autoencoder {d}: {exc.problem}") from None
            except (TypeError, ValueError, ArithmeticError, SafetensorError) as exc:
                raise TrainError(f"{d}: unreadable autoencoder ({exc})") from None
            unexpected = sorted(set(tensors) - set(ae.state_dict()))
            if unexpected:
                raise TrainError(f"{d / AE_WEIGHTS}: unexpected tensor(s) {unexpected[:5]}")
            ae.load_state_dict(tensors)
            return ae, meta
        if meta.get("format") == "worldsim-checkpoint":
            from worldsim.checkpoint import load_checkpoint

            ck = load_checkpoint(d, device="cpu")
            return ck.autoencoder, {"action_names": list(ck.action_names), "resolution": list(ck.resolution),
                                   "simulator": ck.simulator, "from_checkpoint": str(d)}
    raise TrainError(f"{path}: no autoencoder found (expected RUN/{AE_DIR}/, an autoencoder folder or an exported checkpoint)")


def export_with_decoder(path: Path, source: Path, ae: nn.Module, step: int | None, final: bool,
                        ae_source: str | None = None) -> None:
    """`source` (an exported checkpoint) with `ae` in place of its autoencoder; the encoders must match.
    step: the decoder steps `ae` was trained for, None where unknown (an autoencoder taken from a checkpoint)."""
    from worldsim.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(source, device="cpu")
    ae = unwrap(ae)
    if not _same_encoder(ck.autoencoder, ae):
        raise TrainError(f"{source}: its encoder differs from that of the fine-tuned autoencoder "
                         f"({ae_source or 'given'}); cannot pair them")
    extra = dict(ck.config.get("extra") or {})
    prior = extra.get("decoder_fine_tune")
    if Path(path).resolve() == Path(source).resolve() and isinstance(prior, dict) and prior.get("from"):
        source = Path(prior["from"])  # paired again in place (a resumed run): its world model's origin stays
    extra["decoder_fine_tune"] = {"from": str(source), "autoencoder": ae_source, "ae_step": step, "final": final}
    save_checkpoint(path, copy.deepcopy(ae).cpu(), ck.far, action_names=ck.action_names, resolution=ck.resolution,
                    sampler=ck.sampler, simulator=ck.simulator, data_summary=ck.config.get("data"), step=ck.step,
                    extra=extra, far_dtype=ck.far_dtype)
    card = ["# worldsim FAR checkpoint: a fine-tuned decoder", "",
            f"The world model (transformer, encoder, sampler settings) of `{source}`, with the decoder of "
            f"`{ae_source or 'the fine-tuned autoencoder'}`"
            + (f" after {step} decoder steps{'' if final else ' (not the last step)'}" if step is not None else "")
            + ". The encoder is unchanged, so the transformer's latents are.",
            "", "Memory-consistency metrics: run `worldsim eval` on this folder.", ""]
    atomic_write(Path(path) / "README.md", lambda tmp: tmp.write_text("\n".join(card)))


def _same_encoder(a: nn.Module, b: nn.Module) -> bool:
    """Whether two autoencoders map frames to the same latents (encoder weights and latent scale)."""
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith("encoder.") or k == "latent_scale"]
    return all(k in sb and sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in keys) \
        and set(keys) == {k for k in sb if k.startswith("encoder.") or k == "latent_scale"}


def _read_json_object(file: Path) -> dict:
    """A config.json (or state.json) as a dict; TrainError names the file when it is not one."""
    try:
        data = json.loads(file.read_text())
    except PermissionError:  # the file system's refusal, not a bad file: exit 1 naming it, as in every command
        raise
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or UTF-8, a number of over 4,300 digits
        raise TrainError(f"{file}: unreadable ({exc})") from None
    except RecursionError:  # "[[[[..." nested thousands deep (a checkpoint made by someone else)
        raise TrainError(f"{file}: unreadable (JSON nested too deeply)") from None
    if not isinstance(data, dict):
        raise TrainError(f"{file}: not a JSON object")
    return data


def _ae_step(ae_dir: Path, default: int) -> int:
    """The steps the autoencoder in `ae_dir` was trained for, from its config.json."""
    step = _read_json_object(ae_dir / "config.json").get("step", default)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise TrainError(f"{ae_dir / 'config.json'}: step must be an integer >= 0, got {step!r}")
    return step


def _init_far_dir(path: str | os.PathLike) -> Path:
    """The exported checkpoint that --far-init names: the folder itself or a run folder's checkpoint/."""
    p = Path(path)
    for d in (p, p / "checkpoint"):
        if (d / "config.json").is_file() and _read_json_object(d / "config.json").get("format") == "worldsim-checkpoint":
            return d
    raise TrainError(f"--far-init {path}: no exported checkpoint there (expected config.json of format "
                     f"worldsim-checkpoint in it or in its checkpoint/ folder)")


# ============================================================================ data


class WindowSampler:
    """Random windows of `length` frames from random episodes (uniform over all valid windows)."""

    def __init__(self, lengths: np.ndarray, length: int, what: str):
        self.length = length
        counts = np.maximum(np.asarray(lengths, dtype=np.int64) - length + 1, 0)
        if counts.sum() == 0:
            raise TrainError(f"{what}: no episode has {length} frames (longest: {int(max(lengths, default=0))}); "
                             f"lower --seq-len or record longer episodes")
        self.cum = np.cumsum(counts)

    def draw(self, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
        k = rng.integers(0, int(self.cum[-1]), size=n)
        eps = np.searchsorted(self.cum, k, side="right")
        starts = k - np.concatenate([[0], self.cum[:-1]])[eps]
        return [(int(e), int(s)) for e, s in zip(eps, starts)]


def latent_batch(store: LatentStore, picks: list[tuple[int, int]], length: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lat = np.stack([np.asarray(store.latents[e][s:s + length], dtype=np.float32) for e, s in picks])
    act = np.stack([store.actions[e][s:s + length] for e, s in picks])
    return torch.from_numpy(lat).to(device, non_blocking=True), torch.from_numpy(act).to(device, non_blocking=True)


def frame_batch(store: FrameStore, picks: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    from worldsim.autoencoder import frames_to_tensor

    frames = np.stack([store.videos[e][s] for e, s in picks])
    return frames_to_tensor(torch.from_numpy(frames).to(device))


# ============================================================================ the trainer


class Interrupt:
    """SIGINT/SIGTERM -> finish the step, save, stop. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.flag = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self) -> "Interrupt":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class StageSpec:
    name: str  # "ae" | "far"
    model: nn.Module
    total_steps: int
    lr: float
    loss_fn: Callable[[nn.Module, int, np.random.Generator, torch.Generator], tuple[torch.Tensor, dict]]
    val_fn: Callable[[nn.Module], dict]
    units_per_step: dict[str, float]  # e.g. frames / tokens per optimisation step (all ranks)
    on_save: Callable[[nn.Module, int, bool], None]  # (ema, step, final) -> export
    extra_state: dict = field(default_factory=dict)
    time_limit: float = 0.0  # seconds of stage wall time (resumes included); 0: steps alone end it
    save_also_every: int = 0  # also save and export every N steps, for work on_save does then (previews)
    # the step its export (autoencoder/, checkpoint/) holds, None where there is none: a resume of a
    # finished stage redoes an export that a full disk or a kill cut after the state was saved
    exported_step: Callable[[], int | None] | None = None
    # validation falls back to the train episodes (the dataset holds no val ones): its metrics.jsonl
    # rows then say `"val_on": "train"`, and loss.png's legend says so
    val_on_train: bool = False


def exported_step_in(folder: Path, *keys: str) -> int | None:
    """The step an export folder's config.json holds under `keys` (None: no readable export)."""
    found = readable_dir(folder, "config.json")
    try:
        value: Any = json.loads((found / "config.json").read_text()) if found is not None else None
        for key in keys:
            value = value[key]
        return int(value)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


class Trainer:
    def __init__(self, run: RunConfig, dist: Dist, log: Callable[[str], None]):
        self.run = run
        self.cfg = run.train
        self.dist = dist
        self.device = dist.device
        self.precision = {stage: stage_precision(self.cfg.precision, self.device, stage) for stage in ("ae", "far")}
        self.out = Path(self.cfg.out)
        self.log = log
        self.interrupt = Interrupt()
        self.interrupted = False
        self.metrics_path = self.out / "metrics.jsonl"
        self.plotted: tuple[int, int] | None = None  # (mtime_ns, size) of the metrics loss.png last drew

    # -- metrics

    def write_metrics(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        try:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk: name the file (a torn last line is dropped on --resume)
            raise TrainError(f"{self.metrics_path}: cannot append the metrics ({exc.strerror or exc})") from None

    def trim_metrics(self, stage: str, step: int) -> None:
        """On resume: drop the lines logged after the saved step (they are trained again); a torn
        last line is already gone (`repair_metrics_tail`, before the run starts)."""
        if not self.dist.is_main or not self.metrics_path.is_file():
            return
        rows = _read_metrics(self.metrics_path)
        keep = [r for r in rows if not (r.get("stage") == stage and r.get("step", 0) > step)]
        if len(keep) != len(rows):
            atomic_write(self.metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in keep)))

    def plot(self) -> None:
        if self.dist.is_main and self.metrics_path.is_file():  # a save before the first log line has none
            try:
                stat = self.metrics_path.stat()
                rows = (stat.st_mtime_ns, stat.st_size)
                if rows == self.plotted and (self.out / "loss.png").is_file():
                    return  # the end of a run: its last save drew these same rows
                plot_metrics(self.metrics_path, self.out / "loss.png", ae_loss=self.run.train.ae_loss)
                self.plotted = rows
            except Exception as exc:  # a plot must never stop a training
                self.log(f"loss plot failed: {exc}")

    # -- state

    def save_state(self, spec: StageSpec, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, step: int,
                   elapsed: float, warmup_end_s: float | None) -> None:
        from worldsim.checkpoint import save_tensors

        tensors = {**_module_tensors(model, "model"), **_module_tensors(ema, "ema")}
        opt_t, opt_meta = _flatten_optimizer(opt, "optim")
        rng_t, rng_meta = rng_states()
        tensors.update(opt_t)
        tensors.update(rng_t)
        meta = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "stage": spec.name, "step": step,
            "total_steps": spec.total_steps, "time_limit": spec.time_limit, "finished": step >= spec.total_steps,
            "warmup_end_seconds": warmup_end_s,  # of stage time; None: still warming up
            "optimizer": opt_meta, "rng": rng_meta, "world_size": self.dist.world_size,
            # per rank: a resume on another number of ranks says what batch a step had (--*-batch may change too)
            "batch": self.cfg.ae_batch if spec.name == "ae" else self.cfg.far_batch,
            "seconds": elapsed, "schedule": {"lr": spec.lr, "warmup": self.cfg.warmup, "cosine": self.cfg.cosine,
                                             "min_lr_ratio": self.cfg.min_lr_ratio},
            **spec.extra_state,
        }

        def write(tmp: Path) -> None:
            save_tensors(tensors, tmp / "weights.safetensors", {"format": STATE_FORMAT})
            (tmp / "state.json").write_text(json.dumps(meta) + "\n")

        swap_dir_atomic(self.out / "state", write)

    def load_state(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        from safetensors.torch import load_file

        d = readable_dir(self.out / "state", "state.json")
        if d is None:
            return None
        try:
            meta = json.loads((d / "state.json").read_text())
            tensors = load_file(str(d / "weights.safetensors"))
        except Exception as exc:
            raise TrainError(f"{d}: unreadable training state ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise TrainError(f"{d}: not a worldsim training state")
        for key, kind in (("step", int), ("optimizer", dict), ("rng", dict)):
            if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
                raise TrainError(f"{d}/state.json: damaged training state ({key!r} must be {kind.__name__}, "
                                 f"got {meta.get(key)!r})")
        for name, t in tensors.items():
            # a diverged run saved by a worldsim before the gradient check: resumed, its first step's loss
            # is NaN and the message would blame the learning rate, which no lower rate mends
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise TrainError(f"{d}: tensor {name} of the training state holds NaN or infinite values (a diverged "
                                 "run saved it); it cannot be resumed: start again in a new --out")
        return meta, tensors

    # -- the loop

    def _note_learning_rate_rise(self, spec: StageSpec, meta: dict, step: int, elapsed: float,
                                 warmup_end_s: float | None) -> None:
        """A resume with more steps or time, or without the time limit, stretches the cosine: the
        learning rate climbs back from where the saved schedule had it. Say so rather than let the
        loss jump (a resume of the same schedule, even in its warm-up, says nothing)."""
        cfg = self.cfg
        if not self.dist.is_main:
            return
        saved = meta.get("schedule") or {}

        def rate(at: int, total: int, limit: float, lr: float, warmup: int, cosine: bool, min_ratio: float) -> float:
            fraction = elapsed / limit if limit > 0 else 0.0
            return lr_at(at, total, lr, warmup, cosine, min_ratio, fraction,
                         (warmup_end_s or 0.0) / limit if limit > 0 else 0.0)

        now = rate(step, spec.total_steps, spec.time_limit, spec.lr, cfg.warmup, cfg.cosine, cfg.min_lr_ratio)
        old = (int(meta.get("total_steps", spec.total_steps)), float(meta.get("time_limit", spec.time_limit)),
               float(saved.get("lr", spec.lr)), int(saved.get("warmup", cfg.warmup)),
               bool(saved.get("cosine", cfg.cosine)), float(saved.get("min_lr_ratio", cfg.min_lr_ratio)))
        # the saved schedule's rate here, or that of its last step trained (a finished run's is higher)
        before = max(rate(step, *old), rate(max(step - 1, 0), *old))
        if now > 1.5 * before:
            span = f"{spec.total_steps} steps" + (f" or {spec.time_limit:g} s" if spec.time_limit > 0 else "")
            self.log(f"note: {spec.name}: the learning rate rises from {before:.2e} (the saved schedule's at step "
                     f"{step}) to {now:.2e}: the schedule now spans {span} from the stage's start")

    def fit(self, spec: StageSpec, resume_state: tuple[dict, dict] | None) -> bool:
        """Train one stage; returns False if interrupted."""
        cfg, dist, device = self.cfg, self.dist, self.device
        model = spec.model.to(device)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        opt = make_optimizer(model, spec.lr, cfg)
        step, elapsed = 0, 0.0
        # the stage seconds at which the warm-up ended: a time-limited decay starts there
        warmup_end_s: float | None = None
        if resume_state is None:  # the stage starts over: rows of a start killed before its first save go
            self.trim_metrics(spec.name, -1)
        else:
            meta, tensors = resume_state
            where = self.out / "state"
            _load_module(model, tensors, "model", where)
            _load_module(ema, tensors, "ema", where)
            # loading restores each group's saved settings: this run's config.json says what applies now
            fresh = [{k: g[k] for k in ("weight_decay", "betas")} for g in opt.param_groups]
            try:
                _unflatten_optimizer(opt, tensors, meta["optimizer"], "optim")
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise TrainError(f"{where}: damaged optimizer state ({type(exc).__name__}: {exc})") from None
            partial = [i for i, st in enumerate(opt.state.values()) if not {"step", "exp_avg", "exp_avg_sq"} <= set(st)]
            if partial:  # AdamW would fail at its first step with a bare KeyError
                raise TrainError(f"{where}: damaged optimizer state (parameter(s) {partial[:5]} lack Adam's moments)")
            for group, settings in zip(opt.param_groups, fresh):
                group.update(settings)
            try:
                set_rng_states(tensors, meta["rng"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise TrainError(f"{where}: damaged random-number state ({type(exc).__name__}: {exc})") from None
            step, elapsed = int(meta["step"]), float(meta.get("seconds", 0.0))
            warmup_end_s = meta.get("warmup_end_seconds", 0.0 if step >= cfg.warmup else None)
            self.trim_metrics(spec.name, step)
            if meta.get("world_size", 1) != dist.world_size:
                # the batch options are per rank, so the batch of a step changes with the ranks (the
                # learning rate does not): say so, with the option that keeps it where it divides evenly
                option = f"--{spec.name}-batch"
                per_rank = cfg.ae_batch if spec.name == "ae" else cfg.far_batch
                saved_ranks = int(meta.get("world_size", 1))
                # the saved per-rank batch, not this run's: a resume may give the option that keeps the
                # batch (states saved before it was recorded: this run's)
                keep = int(meta.get("batch", per_rank)) * saved_ranks
                now = per_rank * dist.world_size
                self.log(f"note: resumed with {dist.world_size} rank(s), saved with {saved_ranks}: same weights, "
                         f"a different data order from here on, and a step's batch "
                         + (f"stays {now} ({dist.world_size} x {option} {per_rank})" if now == keep else
                            f"is now {dist.world_size} x {option} {per_rank} = {now} ({option} is per rank: on "
                            f"{saved_ranks} rank(s) it made {keep}"
                            + (f", which {option} {keep // dist.world_size} keeps" if keep % dist.world_size == 0 else "")
                            + ")"))
            self.log(f"{spec.name}: resumed at step {step}/{spec.total_steps}")
        if step >= spec.total_steps:
            if resume_state is not None and step > spec.total_steps:
                # a lower --*-steps cannot undo steps: say so rather than "done" in silence
                self.log(f"{spec.name}: stopped at step {step}, already past the {spec.total_steps} steps now asked "
                         "for; nothing more to train in this stage")
            if resume_state is not None:
                self.finish_export(spec, ema, step)
            return True
        train_model: nn.Module = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # every parameter reaches the loss on every step: batches without coarse frames add
            # the coarse-token projections with a zero term (objective.py), so DDP needs no
            # find_unused_parameters (with it, that zero term marks them ready twice and fails)
            train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        model.train()
        bar = None
        if dist.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=spec.total_steps, initial=step, desc=f"train {spec.name}", unit="step",
                       dynamic_ncols=True, smoothing=0.1, disable=None)  # None: a log file gets the log lines only
        smooth = None
        t_last, steps_last = time.perf_counter(), step
        t_stage = time.perf_counter() - elapsed
        last_save = step if resume_state is not None else None  # the step of this stage's newest save
        try:
            with self.interrupt:
                # the slowest rank's clock, so every rank uses the same rate and stops together
                time_fraction = dist.max(elapsed / spec.time_limit) if spec.time_limit > 0 else 0.0
                if time_fraction >= 1.0:  # resumed after its time ran out: done, as with all steps done
                    self.log(f"{spec.name}: its time limit of {spec.time_limit:g} s was already reached at step {step}; "
                             f"raise --{spec.name}-time-limit (or set it to 0 to go by --{spec.name}-steps) to train "
                             f"on; the learning rate then follows the longer schedule")
                    self.finish_export(spec, ema, step)
                    return True
                if resume_state is not None:
                    self._note_learning_rate_rise(spec, resume_state[0], step, elapsed, warmup_end_s)
                while step < spec.total_steps:
                    rng, torch_seed = step_rng(cfg.seed, dist.rank, step)
                    torch.manual_seed(torch_seed)
                    gen = torch.Generator(device=device).manual_seed(torch_seed)
                    if warmup_end_s is None and step >= cfg.warmup:
                        warmup_end_s = time_fraction * spec.time_limit  # the same on every rank
                    lr = lr_at(step, spec.total_steps, spec.lr, cfg.warmup, cfg.cosine, cfg.min_lr_ratio, time_fraction,
                               (warmup_end_s or 0.0) / spec.time_limit if spec.time_limit > 0 else 0.0)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    with autocast_ctx(self.precision[spec.name], device):
                        loss, stats = spec.loss_fn(train_model, step, rng, gen)
                    loss_v = float(loss.detach())
                    # every rank stops together: before a bad step reaches the (averaged) weights, and
                    # on Ctrl-C after this step (one collective for both)
                    bad, stop = dist.any_flags(not math.isfinite(loss_v), self.interrupt.flag)
                    if bad:
                        where = f" (on rank {dist.rank}, or another rank's is not finite)" if dist.enabled else ""
                        raise self.diverged(spec, f"loss is {loss_v} at step {step + 1}{where}", last_save)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                    else:
                        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
                    if not math.isfinite(gnorm):
                        # a finite loss can still overflow in the backward pass: clipping then scales every
                        # gradient by max_norm / nan, and the step would write NaN into the weights, the EMA
                        # and the next save. Under DDP the gradients are already averaged, so every rank
                        # sees the same norm and stops here together.
                        raise self.diverged(spec, f"gradient norm is {gnorm} at step {step + 1} (its loss, "
                                                  f"{loss_v:.4g}, was finite)", last_save)
                    opt.step()
                    ema_update(ema, model, cfg.ema_decay, step)
                    step += 1
                    smooth = loss_v if smooth is None else 0.9 * smooth + 0.1 * loss_v
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.2e}", refresh=False)
                    if step % max(1, cfg.log_every) == 0 or step == spec.total_steps:
                        now = time.perf_counter()
                        sps = (step - steps_last) / max(1e-9, now - t_last)
                        t_last, steps_last = now, step
                        # the row's statistics (psnr, noisy_frames, ...) are of every rank's batch, as its
                        # loss is: they were rank 0's alone, beside a loss averaged over the ranks
                        names = [k for k in stats if k != "loss"]  # the same keys on every rank (the config's)
                        means = dist.means([loss_v, *(float(stats[k]) for k in names)])
                        rec = {"stage": spec.name, "step": step, "loss": means[0], "lr": lr,
                               "grad_norm": gnorm, "steps_per_s": sps,
                               **{f"{k}_per_s": v * sps for k, v in spec.units_per_step.items()},
                               **dict(zip(names, means[1:]))}
                        self.write_metrics(rec)
                    if spec.time_limit > 0:
                        time_fraction = dist.max((time.perf_counter() - t_stage) / spec.time_limit)
                    final = step >= spec.total_steps or time_fraction >= 1.0
                    if final and step < spec.total_steps:
                        self.log(f"{spec.name}: time limit of {spec.time_limit:g} s reached at step {step}/"
                                 f"{spec.total_steps}")
                        if step < cfg.warmup:
                            self.log(f"{spec.name}: warning: the time ran out during the warm-up ({step} of "
                                     f"{cfg.warmup} steps), so the learning rate never decayed; use a smaller --warmup")
                    if (cfg.val_every > 0 and step % cfg.val_every == 0) or final:
                        diverged = self.validate(spec, ema, step, last_save)
                        # rank 0 validates alone: every rank stops with it, here, rather than wait for it
                        # at the save's barrier (until --ddp-timeout where torchrun does not end them)
                        if dist.any_flags(diverged is not None)[0]:
                            raise diverged or self.diverged(spec, f"validation loss of the EMA weights (on rank 0) "
                                                                  f"is not finite at step {step}", last_save)
                    if stop or final or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or \
                            (spec.save_also_every > 0 and step % spec.save_also_every == 0):
                        if dist.is_main:
                            self.save_state(spec, model, ema, opt, step, time.perf_counter() - t_stage, warmup_end_s)
                            spec.on_save(ema, step, final)
                            self.plot()
                        dist.barrier()
                        last_save = step
                    if stop:  # before `final`: a Ctrl-C at a stage's last step must not start the next stage
                        self.interrupted = True
                        self.log(f"\n{spec.name}: interrupted at step {step}; saved. Continue with "
                                 f"`worldsim train --resume {self.out}`")
                        return False
                    if final:
                        break
        finally:
            if bar is not None:
                bar.close()
        if dist.enabled:
            print(f"[rank {dist.rank}] {spec.name} weights sha256 {params_sha256(model)}", flush=True)
        return True

    def finish_export(self, spec: StageSpec, ema: nn.Module, step: int) -> None:
        """A resumed stage with nothing left to train: its state is saved, but the export written after
        it may not be (a full disk, a second Ctrl-C, a kill): write it again where it lags."""
        if self.dist.is_main and spec.exported_step is not None:
            held = spec.exported_step()
            if held != step:
                self.log(f"{spec.name}: the export of step {step} did not complete (it holds "
                         f"{'nothing' if held is None else f'step {held}'}); writing it again")
                spec.on_save(ema, step, True)
        self.dist.barrier()

    def diverged(self, spec: StageSpec, what: str, last_save: int | None) -> TrainError:
        """The one line that stops a stage whose numbers stopped being finite, raised before the step's
        optimizer update and save: the last save (the run's state and export) stays as it was."""
        rate = f"at a lower learning rate (--{spec.name}-lr was {spec.lr:g}) with " \
               f"`worldsim train --resume {self.out} --{spec.name}-lr LR`" + \
               (" (or add --precision fp32: it trained in bf16)" if self.precision[spec.name] == "bf16" else "")
        if last_save is None:
            return TrainError(f"{spec.name}: {what}: training diverged before this stage's first save; start it "
                              f"again {rate}")
        # the weights of the last save may already be far off (a loss climbing to 1e9 is still finite)
        return TrainError(f"{spec.name}: {what}: training diverged; nothing was saved after step {last_save}. "
                          f"Continue from that save {rate}, or start again in a new --out if metrics.jsonl shows "
                          f"its loss already climbing by step {last_save}")

    def validate(self, spec: StageSpec, ema: nn.Module, step: int, last_save: int | None = None) -> TrainError | None:
        """Rank 0's validation row; the divergence error to raise (on every rank) when its loss is not finite."""
        if not self.dist.is_main:
            return None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            with autocast_ctx(self.precision[spec.name], self.device), torch.no_grad():
                stats = spec.val_fn(ema)
        val_loss = stats.get("loss")
        if val_loss is not None and not math.isfinite(val_loss):
            # the EMA weights that the save after it would export: stop before that save
            return self.diverged(spec, f"validation loss of the EMA weights is {val_loss} at step {step}", last_save)
        self.write_metrics({"stage": spec.name, "step": step, **{f"val_{k}": float(v) for k, v in stats.items()},
                            "val_on": "train" if spec.val_on_train else "val"})
        return None


# ============================================================================ plotting


def plot_metrics(metrics_path: Path, png: Path, ae_loss: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = loss_figure(_read_metrics(Path(metrics_path)), ae_loss=ae_loss)
    if fig is None:
        return
    try:  # a failed save (a full disk) removes its temp file and names loss.png
        atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100), suffix=".tmp.png")
    finally:
        plt.close(fig)


def _plain_log_formatter(minor: bool) -> Any:
    """Log-axis tick labels as plain numbers (0.4, 1.5, 2): matplotlib's own choice of which ticks to
    label, without its 4 x 10^-1 notation, which made a loss inside one decade hard to read."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(labelOnlyBase=not minor)


# what each stage minimises, for loss.png's y axes: the autoencoder's pixel loss (--ae-loss; frames in
# [-1, 1]) and the far stage's flow-matching loss (objective.training_loss)
AE_LOSS_LABELS = {"l1+mse": "L1 + MSE of pixels in [-1, 1]", "mse": "MSE of pixels in [-1, 1]"}
FAR_LOSS_LABEL = "flow-matching velocity MSE"


def loss_figure(rows: list[dict], ae_loss: str | None = None) -> Any:
    """loss.png's figure from metrics.jsonl's rows (None when no stage has logged yet): one panel per
    stage, train (raw and a running mean) and validation loss against the step. `ae_loss` is the run's
    --ae-loss, which names the autoencoder's loss on its y axis (None: left unnamed). Validation rows
    with `"val_on": "train"` (a dataset without val episodes) are labelled as such."""
    import matplotlib.pyplot as plt

    stages = [s for s in ("ae", "far") if any(r.get("stage") == s for r in rows)]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, s in zip(axes[0], stages):
        tr = [(r["step"], r["loss"]) for r in rows if r.get("stage") == s and "loss" in r]
        va = [(r["step"], r["val_loss"]) for r in rows if r.get("stage") == s and "val_loss" in r]
        if tr:
            x, y = zip(*tr)
            ax.plot(x, y, lw=0.8, alpha=0.5, label="train")
            if len(y) >= 10:
                k = max(2, len(y) // 30)
                ys = np.convolve(y, np.ones(k) / k, mode="valid")
                ax.plot(x[k - 1:], ys, lw=1.5, label=f"train (mean of {k} logged steps)")
        if va:
            x, y = zip(*va)
            on = [r.get("val_on") for r in rows if r.get("stage") == s and "val_loss" in r]
            where = (", on train episodes" if all(o == "train" for o in on)
                     else ", partly on train episodes" if "train" in on else "")
            ax.plot(x, y, "o-", lw=1.5, label=f"val (EMA{where})")
        ax.set_title({"ae": "autoencoder: reconstruction loss", "far": "FAR: flow-matching loss"}[s])
        ax.set_xlabel("step")
        ax.set_ylabel({"ae": AE_LOSS_LABELS.get(ae_loss or "", "reconstruction loss"), "far": FAR_LOSS_LABEL}[s])
        if all(v > 0 for _, v in tr + va):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_plain_log_formatter(minor=False))
            ax.yaxis.set_minor_formatter(_plain_log_formatter(minor=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


# ============================================================================ preview


def write_preview(checkpoint_dir: Path, video: np.ndarray, actions: np.ndarray, context: int, frames: int,
                  gif: Path, seed: int = 0, device: torch.device | None = None) -> None:
    """Context + generated frames beside the ground truth: GIF rows [ground truth | model], captioned
    (panels above, frame and whether it is context or generated below; blue: context, red: generated)."""
    from worldsim.world import WorldModel

    world = WorldModel.load(checkpoint_dir, device=device)
    context = max(1, min(context, len(video) - 1))
    frames = max(1, min(frames, len(video) - context))
    # a run resumed from before seeds were bounded may hold any 64-bit one: its low 32 bits are what
    # torch's CPU generator always took
    session = world.new_session(video[:context], actions[:context], seed=seed % 2**32)
    generated = [session.step(int(a)) for a in actions[context:context + frames]]
    out = []
    for t in range(context + frames):
        gt = video[t]
        gen = video[t] if t < context else generated[t - context]
        pad = np.zeros((gt.shape[0], 2, 3), np.uint8)
        row = np.concatenate([gt, pad, gen], axis=1).copy()
        color = (0, 160, 255) if t < context else (255, 64, 64)  # blue: context, red: generated
        row[:2, gt.shape[1] + 2:] = color
        row[-2:, gt.shape[1] + 2:] = color
        scale = max(1, 128 // gt.shape[0])
        row = np.repeat(np.repeat(row, scale, axis=0), scale, axis=1)
        # captions: which panel is the recording and which the model, and whether the model's panel
        # shows a context frame (the ground truth it is given) or one it generated
        panel = (gt.shape[1] + 2) * scale
        right = "context (given)" if t < context else "generated"
        header = caption_strip(row.shape[1], [(0, "ground truth", (255, 255, 255)),
                                              (panel, ["model: " + right, "model: " + right.split(" ")[0], "model"],
                                               color)], height=14)
        note = (f"frame {t}: context {t + 1} of {context}" if t < context  # 0-based, as eval's videos
                else f"frame {t}: generated {t - context + 1} of {frames}")
        footer = caption_strip(row.shape[1], [(0, note, color)], height=14)
        out.append(np.concatenate([header, row, footer], axis=0))
    gif.parent.mkdir(parents=True, exist_ok=True)
    # a run killed while it wrote an earlier step's preview (SIGKILL) left that GIF's temp twin; the
    # resume goes on after the saved step and never writes that name again, so its own write would not sweep it
    for twin in gif.parent.glob(".*.gif.*.tmp.gif"):
        sweep_dead_twins(gif.parent / twin.name[1:twin.name.index(".gif.") + 4], ".tmp.gif")
    # a failed preview (a full disk) removes its temp file and names the GIF in its error
    atomic_write(gif, lambda tmp: write_gif(tmp, out, duration=120), suffix=".tmp.gif")  # milliseconds


def write_model_card(checkpoint_dir: Path, run: RunConfig, summary: dict, val: dict | None) -> None:
    t = run.train
    lines = [
        "# worldsim FAR checkpoint", "",
        f"Trained with `worldsim train` (preset `{t.preset}`), step {summary.get('far_step')} of the FAR stage "
        f"and {summary.get('ae_steps')} autoencoder steps.", "",
        f"- data: {', '.join(summary.get('datasets', [])) or t.stream_env}",
        f"- train episodes / frames: {summary.get('train_episodes')} / {summary.get('train_frames')}"
        + ((" (recorded as it trained" + (f"; rank 0's, of {summary.get('world_size')} ranks"
                                         if summary.get("world_size", 1) > 1 else "") + ")")
           if summary.get("stream_env") else ""),
        f"- resolution {summary.get('resolution')}, actions {summary.get('action_names')}",
        f"- FAR: depth {run.far.depth}, width {run.far.width}, window {run.far.window}, "
        f"{run.far.tokens_per_frame} tokens/frame fine, {run.far.context_tokens_per_frame} coarse",
        f"- training samples: {t.seq_len} frames, batch {t.far_batch} x {summary.get('world_size', 1)} rank(s), "
        f"lr {t.far_lr}, precision {summary.get('precision')}, EMA {t.ema_decay} (these weights)",
    ]
    if val:
        # an interrupted run exports weights newer than its last validation: say which step was measured
        lines.append(f"- validation flow-matching loss (EMA, step {val.get('step')}): "
                     f"{val.get('val_loss', float('nan')):.4f}")
    lines += ["", "Memory-consistency metrics: run `worldsim eval` on this folder.", ""]
    atomic_write(checkpoint_dir / "README.md", lambda tmp: tmp.write_text("\n".join(lines)))


# ============================================================================ stages


@dataclass
class DataInfo:
    action_names: tuple[str, ...]
    resolution: tuple[int, int]
    simulator: dict | None


def probe_data(paths: list[str], want: DataInfo | None, what: str) -> DataInfo:
    """Action names, resolution and simulator of the datasets; they must agree with each other and `want`."""
    from worldsim.dataset import default_action_names
    from worldsim.latents import open_split

    info = want
    if info is None:
        first, _, _ = open_split(paths[0], "train")
        names = tuple(first.action_names)
        if names == default_action_names(len(names)):
            # index-less (DMLab) files name their actions by the largest one each holds: take the widest,
            # so that the order of --data does not matter
            for p in paths[1:]:
                other = tuple(open_split(p, "train")[0].action_names)
                if other == default_action_names(len(other)) and len(other) > len(names):
                    names = other
        info = DataInfo(names, tuple(first.resolution), first.simulator)  # type: ignore[arg-type]
    for p in paths:
        ds, _, _ = open_split(p, "train", action_names=names_for(p, info.action_names if info else None))
        check_compatible(p, ds.action_names, ds.resolution, info.action_names, info.resolution,
                         what if want is not None else paths[0])
    return info


def _progress(dist: Dist, cfg: TrainConfig, desc: str):
    def wrap(it):
        if not (dist.is_main and cfg.progress):
            return it
        from tqdm import tqdm

        return tqdm(it, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # only on a terminal

    return wrap


def _no_train_split_hint(paths: list[str]) -> str:
    """What to do about datasets without train episodes: FAR/TECO files of a test or val folder (TECO's
    dmlab/test) are held out from training by their folder, so recording more would not help."""
    from worldsim.dataset import Dataset

    for path in paths:
        try:
            episodes = Dataset(path).episodes
        except DatasetError:
            continue
        if episodes and all(e.folder_split in ("test", "val") for e in episodes):
            return (f"the files of {path} lie in a {episodes[0].folder_split} folder, which never trains; give "
                    "TECO's train folder or the folder above both")
    return "record some with `worldsim record --split train`"


FRAMES_DIR = "frames"


def open_frames(trainer: Trainer, readers: list[EpisodeReader], split: str, together: bool) -> FrameStore:
    """The `split` frames of the datasets `readers` read, memory-mapped from RUN/frames/: an
    uncompressed copy written one episode at a time on first use (the episode files are compressed,
    so a frame cannot be read from them without inflating its whole episode). Held in memory, every
    frame of a dataset made the stage's memory grow with it (12 KiB a 64x64 frame, more with
    allocator slack: TECO's DMLab set is ~147 GB of frames); mapped, the pages are the page cache's,
    shared by the ranks of a machine. `together`: every rank calls this (rank 0 writes, the others
    wait for it); else rank 0 alone does (a resumed stage's export needs calibration frames)."""
    dist, cache_dir = trainer.dist, trainer.out / FRAMES_DIR
    store = FrameStore()
    for reader in readers:
        if not reader.indices:
            continue
        cached = load_cached(cache_dir, reader.path, split, FRAMES_KEY, dtype="|u1")
        (missing,) = dist.any_flags(cached is None) if together else (cached is None,)
        if missing:
            if dist.is_main and cached is None:
                # asked before a byte is written: the copy is ~3.5 times the episode files, and a disk
                # that runs full half-way stops other programs too (and only then this one, named)
                need = int(reader.lengths.sum()) * int(np.prod(reader.dataset.resolution)) * 3
                cache_dir.mkdir(parents=True, exist_ok=True)
                free = shutil.disk_usage(cache_dir).free
                if free < need:
                    size = lambda n: f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"  # noqa: E731
                    raise TrainError(f"{cache_dir}: the autoencoder stage copies the {split} frames of {reader.path} "
                                     f"uncompressed here ({size(need)}) and the disk has {size(free)} free; free some "
                                     "space, or train in an --out on a larger disk")
                trainer.log(f"ae: copying the {split} frames of {reader.path} uncompressed into {cache_dir} "
                            "(read from there memory-mapped; removed when the stage finishes)")
                build_cache(cache_dir, reader.path, split, FRAMES_KEY, reader, lambda video: video,
                            progress=_progress(dist, trainer.cfg, f"copy {split}"), dtype="|u1")
            if together:
                dist.barrier()
            cached = load_cached(cache_dir, reader.path, split, FRAMES_KEY, dtype="|u1")
            if cached is None:  # pragma: no cover - rank 0 has just written it
                raise TrainError(f"{cache_dir}: the frame cache of {reader.path} is unreadable right after writing it")
        store.videos += cached.latents
        store.actions += cached.actions
        store.sources += cached.sources
    return store


def run_ae_stage(trainer: Trainer, run: RunConfig, data: DataInfo, resume_state: tuple[dict, dict] | None) -> bool:
    ae_mod, _, _ = _model_modules()
    cfg, dist, device = run.train, trainer.dist, trainer.device
    # the episode lists and lengths only: which frames a step samples follows from them, so no frame
    # is read before one is needed (a resumed stage that is finished needs none)
    readers = {"train": [read_episodes(p, "train", data.action_names, data.resolution, True, "the first dataset",
                                       trainer.log) for p in cfg.data]}
    if holding_split(cfg.data, "val", data.action_names):
        readers["val"] = [read_episodes(p, "val", data.action_names, data.resolution, False, "the first dataset",
                                        trainer.log) for p in cfg.data]
    else:  # the fallback would copy the train frames a second time
        trainer.log("note: no val episodes; validating the autoencoder on train frames")
    val_on_train = "val" not in readers
    train_lengths = np.concatenate([r.lengths for r in readers["train"]])
    val_lengths = train_lengths if val_on_train else np.concatenate([r.lengths for r in readers["val"]])
    if int(train_lengths.sum()) == 0:
        raise TrainError(f"{', '.join(cfg.data)}: no training frames (training reads the episodes of the train "
                         f"split; these hold none: {_no_train_split_hint(cfg.data)})")
    stores: dict[str, FrameStore] = {}

    def frames(split: str, together: bool = False) -> FrameStore:
        split = "train" if val_on_train else split
        if split not in stores:
            stores[split] = open_frames(trainer, readers[split], split, together)
        return stores[split]

    saved = resume_state[0] if resume_state is not None else {}
    trains = resume_state is None or (int(saved["step"]) < cfg.ae_steps and not (
        cfg.ae_time_limit > 0 and float(saved.get("seconds", 0.0)) >= cfg.ae_time_limit))
    if trains:  # every rank, before the first step (fit's test of what is left to train, made early)
        trainer.log(f"ae: opening the frames of {len(cfg.data)} dataset(s)")
        frames("train", together=True)
        frames("val", together=True)
    torch.manual_seed(cfg.seed)
    ae = ae_mod.Autoencoder(run.autoencoder)
    if cfg.ae_init and resume_state is None:  # a resume has the weights in its state: the init may be gone
        init, _ = load_autoencoder(cfg.ae_init)
        try:
            state = ae_mod.deepen_state_dict(init.state_dict(), init.config, ae.config)
        except ValueError:
            raise TrainError(f"--ae-init {cfg.ae_init}: its shape {init.config.to_dict()} differs from this run's "
                             f"{ae.config.to_dict()}") from None
        missing, unexpected = ae.load_state_dict(state, strict=False)
        # only the blocks that deepening adds may be absent; they start as identities
        assert not unexpected and all(k.startswith("decoder.layers.") for k in missing), (missing, unexpected)
        grown = (f"; decoder deepened from {init.config.decoder_blocks} to {ae.config.decoder_blocks} blocks "
                 f"per level, the new ones identities" if missing else "")
        trainer.log(f"ae: weights initialised from {cfg.ae_init} (fresh optimizer; training {cfg.ae_train}{grown})")
    paired = None  # an exported checkpoint whose world model the fine-tuned decoder joins
    if cfg.ae_train == "decoder":
        # the optimizer only sees parameters that require grad; the latent scale buffer stays the init's
        ae.encoder.requires_grad_(False)
        d = readable_dir(Path(cfg.ae_init), "config.json") if cfg.ae_init else None
        own = readable_dir(trainer.out / "checkpoint", "config.json")
        if resume_state is not None and own is not None:
            paired = own  # the world model paired at the last save (the --ae-init folder may have moved since)
        elif d is not None and json.loads((d / "config.json").read_text()).get("format") == "worldsim-checkpoint":
            paired = d  # the encoder came from it; export_with_decoder checks it is still the same at each save
        else:
            trainer.log(f"note: --ae-init {cfg.ae_init} is not an exported checkpoint: only {trainer.out / AE_DIR} "
                        "is written (pair it with scripts/pair_decoder.py)")
    frames_sampler = WindowSampler(train_lengths, 1, "train frames")
    val_sampler = WindowSampler(val_lengths, 1, "val frames")
    val_picks = [val_sampler.draw(step_rng(cfg.seed, 10_000 + b, 0)[0], cfg.ae_batch) for b in range(max(1, cfg.val_batches))]
    calib_picks = frames_sampler.draw(step_rng(cfg.seed, 20_000, 0)[0], min(512, int(train_lengths.sum())))

    def loss_fn(m, step, rng, gen):
        x = frame_batch(frames("train"), frames_sampler.draw(rng, cfg.ae_batch), device)
        loss, stats = unwrap(m).reconstruction_loss(x, m(x), cfg.ae_loss)
        return loss, {"psnr": stats["psnr"]}

    def val_fn(ema):
        losses, psnrs = [], []
        for picks in val_picks:
            x = frame_batch(frames("val"), picks, device)
            loss, stats = ema.reconstruction_loss(x, kind=cfg.ae_loss)
            losses.append(float(loss))
            psnrs.append(float(stats["psnr"]))
        return {"loss": float(np.mean(losses)), "psnr": float(np.mean(psnrs))}

    @torch.no_grad()
    def on_save(ema, step, final):
        if cfg.ae_train == "decoder":
            scale = float(ema.latent_scale)  # recalibrating would change the latents
        else:
            train = frames("train")
            raw = torch.cat([ema.encode(frame_batch(train, calib_picks[i:i + 128], device), normalize=False).float()
                             for i in range(0, len(calib_picks), 128)])
            try:
                scale = ema.calibrate_scale(raw)
            except ValueError as exc:  # weights so far off that the encoder overflows: a traceback before
                # fit's checks stop a diverged run at its next step, or at a save's validation
                raise TrainError(f"ae: {exc} at step {step}: training diverged, and the training state of this "
                                 f"step is saved; start again in a new --out with a lower learning rate (--ae-lr, "
                                 f"it was {cfg.ae_lr:g}), with --val-every a divisor of --checkpoint-every to stop "
                                 "such a run before it saves") from None
        save_autoencoder(trainer.out / AE_DIR, ema, {
            "step": step, "final": final, "latent_scale": scale, "action_names": list(data.action_names),
            "resolution": list(data.resolution), "simulator": data.simulator, "datasets": list(cfg.data),
            "init": cfg.ae_init, "trained": cfg.ae_train})
        if paired is not None:
            export_with_decoder(trainer.out / "checkpoint", paired, ema, step, final, str(trainer.out / AE_DIR))

    def exported_step() -> int | None:
        step = exported_step_in(trainer.out / AE_DIR, "step")
        if paired is not None and exported_step_in(trainer.out / "checkpoint", "extra", "decoder_fine_tune",
                                                   "ae_step") != step:
            return None
        return step

    spec = StageSpec("ae", ae, cfg.ae_steps, cfg.ae_lr, loss_fn, val_fn,
                     {"frames": cfg.ae_batch * dist.world_size}, on_save, time_limit=cfg.ae_time_limit,
                     exported_step=exported_step, val_on_train=val_on_train)
    finished = trainer.fit(spec, resume_state)
    stores.clear()
    if finished and dist.is_main:  # every rank is past fit's last barrier: none reads the copy again
        # disk the run no longer needs; a resume with more --ae-steps writes it again
        shutil.rmtree(trainer.out / FRAMES_DIR, ignore_errors=True)
    return finished


def _ensure_autoencoder(trainer: Trainer, run: RunConfig, data: DataInfo) -> nn.Module:
    """The frozen autoencoder of the far stage: RUN/autoencoder, else --ae-from (copied into the run)."""
    cfg = run.train
    own = trainer.out / AE_DIR
    # decided together: a rank that looked after rank 0 wrote the copy would skip the barrier below,
    # and every later collective would pair with the wrong one (a crash, or a hang to --ddp-timeout)
    (missing,) = trainer.dist.any_flags(readable_dir(own, "config.json") is None)
    if missing:
        if not cfg.ae_from and cfg.stream_env:
            raise TrainError(f"--stream-env {cfg.stream_env} trains only the transformer: give --ae-from "
                             "RUN_OR_CHECKPOINT, an autoencoder trained on a recorded dataset")
        if not cfg.ae_from:
            raise TrainError(f"{own}: no trained autoencoder in this run; train stage ae first "
                             f"(--stage both / ae) or pass --ae-from RUN_OR_CHECKPOINT")
        ae, meta = load_autoencoder(cfg.ae_from)
        if trainer.dist.is_main:
            save_autoencoder(own, ae, {k: v for k, v in meta.items() if k not in ("format", "version", "autoencoder", "weights_sha256")}
                             | {"copied_from": str(cfg.ae_from)})
        trainer.dist.barrier()
    ae, meta = load_autoencoder(trainer.out)
    if ae.config.resolution != data.resolution[0] or data.resolution[0] != data.resolution[1]:
        raise TrainError(f"{own}: the autoencoder takes {ae.config.resolution}x{ae.config.resolution} frames, "
                         f"the data is {data.resolution[0]}x{data.resolution[1]}")
    if not meta.get("final", True):
        trainer.log(f"note: {own} is from an unfinished autoencoder stage (step {meta.get('step')})")
    return ae.requires_grad_(False).eval()


def build_latents(trainer: Trainer, run: RunConfig, data: DataInfo, ae: nn.Module, split: str) -> LatentStore:
    from worldsim.autoencoder import frames_to_tensor

    cfg, dist, device = run.train, trainer.dist, trainer.device
    ae = ae.to(device)
    ae_hash = tensors_hash(ae.state_dict())
    cache_dir = trainer.out / "latents"

    @torch.no_grad()
    def encode(frames: np.ndarray) -> np.ndarray:
        x = frames_to_tensor(torch.from_numpy(np.ascontiguousarray(frames)).to(device))
        return ae.encode(x).float().cpu().numpy()

    store = LatentStore()
    # a val dataset beside train-only datasets: each split comes from the datasets that hold it
    # (for val the others would fall back to their training episodes; for train they add nothing)
    paths = list(cfg.data)
    holding = holding_split(paths, split, data.action_names)
    if split != "train" and not holding:  # it would be the train episodes, encoded a second time: the
        return store                      # caller validates on the train store itself
    paths = holding or paths
    for path in paths:
        cached = load_cached(cache_dir, path, split, ae_hash)
        (missing,) = dist.any_flags(cached is None)  # decided together, as in _ensure_autoencoder
        if missing:
            if dist.is_main and cached is None:
                trainer.log(f"far: encoding {split} frames of {path} once (latent cache in {cache_dir})")
                # read one episode at a time: a dataset larger than memory encodes in one pass
                episodes = read_episodes(path, split, data.action_names, data.resolution,
                                         fallback=split == "train", what="the first dataset",
                                         warn=trainer.log)
                if int(episodes.lengths.sum()):
                    batch = cfg.latent_batch or (32 if device.type == "cpu" else 256)
                    build_cache(cache_dir, path, split, ae_hash, episodes, encode, batch,
                                progress=_progress(dist, cfg, f"encode {split}"))
            dist.barrier()
            cached = load_cached(cache_dir, path, split, ae_hash)
        if cached is not None:
            store.extend(cached)
    if split == "train" and not store.latents:
        raise TrainError(f"no train frames to train on in {', '.join(map(str, cfg.data))} (training reads the "
                         f"episodes of the train split: {_no_train_split_hint(cfg.data)})")
    return store


def run_far_stage(trainer: Trainer, run: RunConfig, data: DataInfo, resume_state: tuple[dict, dict] | None,
                  ae_steps_done: int) -> bool:
    _, far_mod, obj_mod = _model_modules()
    cfg, dist, device = run.train, trainer.dist, trainer.device
    ae = _ensure_autoencoder(trainer, run, data)
    trained_on = resume_state[0].get("ae_sha256") if resume_state is not None else None
    if trained_on is not None and trained_on != tensors_hash(ae.state_dict()):
        # the latents would be re-encoded with another autoencoder, and the transformer go on with them
        raise TrainError(f"--resume {trainer.out}: its transformer was trained on the latents of another "
                         f"autoencoder than {trainer.out / AE_DIR} holds now (weights sha256 {trained_on[:12]}... in "
                         "state/); put that autoencoder back, or start a new run with --far-init RUN/checkpoint")
    far_cfg = dataclasses.replace(run.far, latent_channels=ae.config.latent_channels,
                                  latent_size=ae.config.latent_size, num_actions=len(data.action_names))
    if far_cfg != run.far or ae.config != run.autoencoder:
        run.far, run.autoencoder = far_cfg, ae.config
        if dist.is_main:
            stored = json.loads((trainer.out / "config.json").read_text())
            write_json_atomic(trainer.out / "config.json", {**stored, **run.to_dict()})
    stream = None
    if cfg.stream_env:
        stream = StreamingData(run, ae, device, trainer.out / "stream", trainer.log,
                               start_step=int(resume_state[0]["step"]) if resume_state is not None else 0)
        train_store, val_store = stream.store, stream.val_store
    else:
        train_store = build_latents(trainer, run, data, ae, "train")
        val_store = build_latents(trainer, run, data, ae, "val")
        if not val_store.latents:
            trainer.log("note: no val frames; validating on train episodes")
            val_store = train_store
    tps = tokens_per_sample(far_cfg, cfg.seq_len)
    trainer.log(f"far: {tps['long_short']} tokens per {cfg.seq_len}-frame sample with the long-short context "
                f"({tps['all_fine']} if every frame were fine); batch {cfg.far_batch} x {dist.world_size} rank(s)")
    torch.manual_seed(cfg.seed + 1)
    far = far_mod.FAR(far_cfg)
    if cfg.far_init and resume_state is None:
        from worldsim.checkpoint import CheckpointError, load_checkpoint

        where = _init_far_dir(cfg.far_init)
        try:
            init_ck = load_checkpoint(where, device="cpu")
        except CheckpointError as exc:
            raise TrainError(f"--far-init: {exc}") from None
        init = init_ck.far
        try:  # the same shape, or deeper (--far-depth): the new blocks start as identities
            state = far_mod.deepen_far_state_dict(init.state_dict(), init.config, far_cfg)
        except ValueError:
            diff = {k: (v, getattr(far_cfg, k)) for k, v in init.config.to_dict().items() if getattr(far_cfg, k) != v}
            raise TrainError(f"--far-init {where}: its FAR shape differs from this run's (checkpoint vs run): {diff}; "
                             f"take the autoencoder from the same checkpoint (--ae-from) and drop --far-* options "
                             f"(only --far-depth may grow it, and --far-window may change)") from None
        missing, unexpected = far.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("blocks.") for k in missing), (missing, unexpected)
        grown = ""
        if far_cfg.depth > init.config.depth:
            sources = far_mod.deepened_block_sources(init.config.depth, far_cfg.depth)
            grown = (f"; deepened from {init.config.depth} to {far_cfg.depth} blocks, new identity blocks at "
                     f"{[i for i, s in enumerate(sources) if s is None]}")
        trainer.log(f"far: weights initialised from {where} (fresh optimizer{grown})")
        if not _same_encoder(init_ck.autoencoder, ae):
            trainer.log(f"note: the autoencoder's encoder differs from {where}'s: the FAR weights adapt to new latents")
    # A fine-tune exports the sampling defaults (steps, CFG, still frames, ...) its starting checkpoint ships with: they were
    # chosen for those weights, and the trainer's generic defaults would silently change how it plays.
    # On --resume the run's own export already carries them, and the --far-init folder may be gone.
    init_sampler = None
    if cfg.far_init:
        from worldsim.checkpoint import CheckpointError, read_config

        sources = ([trainer.out / "checkpoint"] if resume_state is not None else []) + [Path(cfg.far_init)]
        for source in sources:
            try:
                init_sampler = read_config(_init_far_dir(source))["sampler"]
                break
            except (TrainError, CheckpointError):
                continue
        else:
            trainer.log(f"note: no exported checkpoint in {' or '.join(map(str, sources))} to take the sampler "
                        f"defaults from; the exported checkpoint gets the trainer's")
    if run.objective.rollout_aug > 0:  # the model learnt to see its own frames at this level: play must match
        from worldsim.checkpoint import DEFAULT_SAMPLER

        init_sampler = {**DEFAULT_SAMPLER, **(init_sampler or {}), "generated_noise": run.objective.rollout_aug}
    L = cfg.seq_len
    sampler = WindowSampler(train_store.lengths, L, "train episodes") if stream is None else None
    val_len = min(L, int(max(val_store.lengths)))
    val_sampler = WindowSampler(val_store.lengths, val_len, "val episodes") if stream is None else None
    val_batches = []
    if val_sampler is not None:
        for b in range(max(1, cfg.val_batches)):
            rng, seed = step_rng(cfg.seed, 10_000 + b, 0)
            val_batches.append((val_sampler.draw(rng, cfg.far_batch), seed))

    def loss_fn(m, step, rng, gen):
        if stream is not None:
            store, smp = stream.poll(step)
        else:
            store, smp = train_store, sampler
        lat, act = latent_batch(store, smp.draw(rng, cfg.far_batch), L, device)
        return obj_mod.training_loss(m, lat, act, generator=gen, cfg=run.objective)

    # validation sees ground-truth context, the usual window and its long-term part, so its loss
    # compares across self-context, blind-window, rollout and short-context settings
    val_objective = dataclasses.replace(run.objective, self_context_prob=0.0, blind_window_prob=0.0, rollout_prob=0.0,
                                        rollout_aug=0.0, short_context_prob=0.0)

    def val_fn(ema):
        store, batches, length = (val_store, val_batches, val_len) if stream is None else (*stream.val_batches(cfg), L)
        losses = []
        for picks, seed in batches:
            lat, act = latent_batch(store, picks, length, device)
            gen = torch.Generator(device=device).manual_seed(seed)
            loss, _ = obj_mod.training_loss(ema, lat, act, generator=gen, cfg=val_objective)
            losses.append(float(loss))
        return {"loss": float(np.mean(losses)) if losses else float("nan")}

    summary = {
        "datasets": list(cfg.data), "stream_env": cfg.stream_env, "action_names": list(data.action_names),
        "resolution": list(data.resolution), "train_episodes": len(train_store.latents),
        "train_frames": int(train_store.lengths.sum()) if train_store.latents else 0,
        "ae_steps": ae_steps_done, "world_size": dist.world_size, "precision": trainer.precision["far"],
        "seq_len": L, "tokens_per_sample": tps,
    }
    last_val: dict = {}
    streamed_before = (0, 0)  # what a streaming run's earlier starts trained on, from the checkpoint they saved
    if stream is not None and resume_state is not None:
        earlier = readable_dir(trainer.out / "checkpoint", "config.json")
        with contextlib.suppress(OSError, ValueError, AttributeError):
            saved_data = json.loads((earlier / "config.json").read_text()).get("data") if earlier else None
            if isinstance(saved_data, dict) and saved_data.get("stream_env") == cfg.stream_env:
                streamed_before = (int(saved_data.get("train_episodes") or 0), int(saved_data.get("train_frames") or 0))

    def summary_at(step: int) -> dict:
        if stream is None:
            return {**summary, "far_step": step}
        # the episodes training has drawn from so far, not the buffer's first fill
        return {**summary, "train_episodes": streamed_before[0] + stream.episodes_seen,
                "train_frames": streamed_before[1] + stream.frames_seen, "far_step": step}

    def on_save(ema, step, final):
        from worldsim.checkpoint import save_checkpoint

        ck = trainer.out / "checkpoint"
        rows = _read_metrics(trainer.metrics_path)
        vals = [r for r in rows if r.get("stage") == "far" and "val_loss" in r]
        last_val.clear()
        last_val.update(vals[-1] if vals else {})
        save_checkpoint(ck, ae, ema, action_names=data.action_names, resolution=data.resolution,
                        sampler=init_sampler, simulator=data.simulator,
                        data_summary=summary_at(step), step=step,
                        extra={"train": run.to_dict(), "val_loss": last_val.get("val_loss"),
                               "val_step": last_val.get("step")}, far_dtype=cfg.far_save_dtype)
        write_model_card(ck, run, summary_at(step), last_val)
        due = cfg.preview_every >= 0 and (final or trainer.interrupt.flag or
                                          (cfg.preview_every > 0 and step % cfg.preview_every == 0))
        if due:
            try:
                video, actions = preview_episode(run, data, val_store, stream)
                write_preview(ck, video, actions, cfg.preview_context, cfg.preview_frames,
                              trainer.out / "preview" / f"step-{step:06d}.gif", seed=cfg.seed, device=device)
            except Exception as exc:  # a preview must never stop a training
                trainer.log(f"preview failed: {type(exc).__name__}: {exc}")

    spec = StageSpec("far", far, cfg.far_steps, cfg.far_lr, loss_fn, val_fn,
                     {"frames": cfg.far_batch * L * dist.world_size,
                      "tokens": cfg.far_batch * tps["long_short"] * dist.world_size}, on_save,
                     extra_state={"ae_sha256": tensors_hash(ae.state_dict())}, time_limit=cfg.far_time_limit,
                     save_also_every=max(cfg.preview_every, 0),  # a preview draws from the checkpoint it exports
                     exported_step=lambda: exported_step_in(trainer.out / "checkpoint", "step"),
                     val_on_train=stream is None and val_store is train_store)
    try:
        return trainer.fit(spec, resume_state)
    finally:
        if stream is not None:
            stream.close()


def preview_episode(run: RunConfig, data: DataInfo, val_store: LatentStore,
                    stream: StreamingData | None) -> tuple[np.ndarray, np.ndarray]:
    """Frames and actions of the longest validation episode (ground truth for the preview)."""
    if stream is not None:
        return stream.preview_episode()
    from worldsim.dataset import Dataset

    e = int(np.argmax(val_store.lengths))
    path, eid = split_source(val_store.sources[e], run.train.data)
    ds = Dataset(path, action_names=names_for(path, data.action_names))
    ep = ds[eid]
    return ep.video, ep.actions


def repair_metrics_tail(path: Path) -> str:
    """Before a resume appends to metrics.jsonl: a last line cut by a full disk or a kill is removed,
    and a whole last line that lost its newline gets it back, so the next record starts a line of its
    own. Rewritten atomically; returns what was repaired ("" when nothing was)."""
    if not path.is_file():
        return ""
    text = path.read_text()
    if not text or text.endswith("\n"):
        return ""
    head, _, last = text.rpartition("\n")
    try:
        json.loads(last)
        fixed, what = text + "\n", "its last line had lost its newline; added"
    except ValueError:
        fixed, what = (head + "\n" if head else ""), "its last line was cut short; removed"
    atomic_write(path, lambda tmp: tmp.write_text(fixed))
    return what


def _read_metrics(path: Path) -> list[dict]:
    """The logged rows; a line that does not parse is named (a torn last one is repaired on resume)."""
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise TrainError(f"{path}: line {n + 1} is not JSON; fix or remove it (the run's state is kept "
                                 "separately, in state/)") from None
    return rows


# ============================================================================ streaming


STREAM_RESTARTS = 3  # times a stopped recording worker is started again before the run stops


class StreamingData:
    """Fresh episodes from background recording processes, encoded once as they arrive.

    Workers write finished episodes to RUN/stream/ (atomic .npz, no pickles); the trainer moves
    them into a rolling buffer of `--stream-buffer` episodes (the oldest dropped). Mazes of the
    val split go to a small validation buffer. The data order depends on worker timing, so a
    resumed streaming run is not bit-identical to an uninterrupted one.
    """

    def __init__(self, run: RunConfig, ae: nn.Module, device: torch.device, spool: Path,
                 log: Callable[[str], None], start_step: int = 0):
        import multiprocessing as mp

        from envs.recorder import parse_env_args

        cfg = run.train
        self.cfg, self.ae, self.device, self.log = cfg, ae.to(device), device, log
        self.spool = spool / f"rank{int(os.environ.get('RANK', '0'))}"
        self.spool.mkdir(parents=True, exist_ok=True)
        for f in self.spool.glob("*"):
            f.unlink()
        self._settings = parse_env_args(cfg.stream_env_arg)
        self._ctx = mp.get_context("spawn")
        self.procs = [self._start_worker(w, start_step) for w in range(max(1, cfg.stream_workers))]
        self.restarts = [0] * len(self.procs)
        self.episodes_seen, self.frames_seen = 0, 0  # training episodes ingested by this process
        self.store, self.val_store = LatentStore(), LatentStore()
        self.sampler: WindowSampler | None = None
        self._preview: tuple[np.ndarray, np.ndarray] | None = None
        self._val_batches = None
        log(f"stream: {len(self.procs)} worker(s) recording {cfg.stream_env} episodes into {self.spool}")
        try:
            while not self.store.latents or not self.val_store.latents:
                self._ingest(wait=True)
        except BaseException:
            self.close()
            raise

    def _start_worker(self, w: int, start_step: int):
        # the worker's function is in envs.recorder, which imports no torch: a spawned worker that
        # unpickled one from this module imported torch for nothing (seconds at every start and
        # restart, and its memory in every worker)
        from envs.recorder import stream_worker

        cfg = self.cfg
        rank = int(os.environ.get("RANK", "0"))
        proc = self._ctx.Process(target=stream_worker, daemon=True,
                                 args=(str(self.spool), cfg.stream_env, self._settings, cfg.stream_policy,
                                       cfg.stream_length, rank * 1000 + w, cfg.seed, 4 * max(1, cfg.stream_workers),
                                       start_step, os.getpid()))
        proc.start()
        return proc

    def _restart_stopped_workers(self, step: int) -> None:
        """A worker that stopped mid-run (the out-of-memory killer, an error while recording) is
        started again, from this step's mazes: else training went on, to the end and exit 0, on the
        few buffered episodes. One that keeps stopping ends the run with its exit code."""
        for w, proc in enumerate(self.procs):
            if proc.is_alive():
                continue
            code = proc.exitcode
            if self.restarts[w] >= STREAM_RESTARTS:
                raise TrainError(
                    f"stream: recording worker {w} stopped {self.restarts[w] + 1} "
                    f"time{'s' if self.restarts[w] else ''}, the last with exit code "
                    f"{code} (a negative code is the signal that ended it: -9 is SIGKILL, as the out-of-memory "
                    f"killer sends; an error prints its traceback above). The state saved last is kept; continue "
                    f"with --resume {self.cfg.out}")
            self.restarts[w] += 1
            self.log(f"stream: recording worker {w} stopped (exit code {code}); starting it again "
                     f"(restart {self.restarts[w]} of {STREAM_RESTARTS})")
            self.procs[w] = self._start_worker(w, step)

    def _ingest(self, wait: bool = False) -> bool:
        from worldsim.autoencoder import frames_to_tensor

        files = sorted(self.spool.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        if not files:
            if wait:
                if not any(p.is_alive() for p in self.procs):
                    raise TrainError(f"stream: every recording worker died ({self.cfg.stream_env})")
                time.sleep(0.2)
            return False
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                video, actions = z["video"], z["actions"].astype(np.int64)
            f.unlink()
            if len(video) < self.cfg.seq_len:
                cause = ("raise --stream-length" if len(video) >= self.cfg.stream_length else
                         f"the simulator ended them before --stream-length {self.cfg.stream_length} (its max_steps, or "
                         "a level's time limit)")
                raise TrainError(f"stream: episodes of {len(video)} frames are shorter than --seq-len {self.cfg.seq_len}; "
                                 f"{cause}")
            with torch.no_grad():
                lat = torch.cat([self.ae.encode(frames_to_tensor(torch.from_numpy(video[i:i + 256]).to(self.device))).float()
                                 for i in range(0, len(video), 256)]).cpu().numpy().astype(np.float16)
            target = self.val_store if f.name.startswith("val-") else self.store
            cap = self.cfg.stream_buffer if target is self.store else max(2, self.cfg.stream_buffer // 8)
            target.latents.append(lat)
            target.actions.append(actions)
            target.sources.append(f.name)
            if target is self.store:
                self.episodes_seen, self.frames_seen = self.episodes_seen + 1, self.frames_seen + len(video)
            if target is self.val_store and self._preview is None:
                self._preview = (video, actions)
            if len(target.latents) > cap:
                del target.latents[0], target.actions[0], target.sources[0]
        self.sampler = WindowSampler(self.store.lengths, self.cfg.seq_len, "stream")
        return True

    def poll(self, step: int) -> tuple[LatentStore, WindowSampler]:
        self._restart_stopped_workers(step)
        self._ingest()
        assert self.sampler is not None
        return self.store, self.sampler

    def val_batches(self, cfg: TrainConfig) -> tuple[LatentStore, list[tuple[list[tuple[int, int]], int]]]:
        """The validation episodes as they were at the first call, and the batches drawn from them:
        (picks, seed) each, the same at every validation."""
        if self._val_batches is None:
            smp = WindowSampler(self.val_store.lengths, cfg.seq_len, "stream val")
            self._val_batches = []
            for b in range(max(1, cfg.val_batches)):
                rng, seed = step_rng(cfg.seed, 10_000 + b, 0)
                self._val_batches.append((smp.draw(rng, cfg.far_batch), seed))
            self._val_frozen = LatentStore(list(self.val_store.latents), list(self.val_store.actions), list(self.val_store.sources))
        return self._val_frozen, self._val_batches

    def preview_episode(self) -> tuple[np.ndarray, np.ndarray]:
        assert self._preview is not None
        return self._preview

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
        shutil.rmtree(self.spool, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.spool.parent.rmdir()  # only if no other rank's spool is left


# ============================================================================ entry


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: Python's, numpy's (a MemoryError) or torch's (its CPU
    allocator raises a plain RuntimeError; CUDA an OutOfMemoryError, a RuntimeError too)."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


# what a collective says when the other end is gone or silent (gloo: "Connection closed by peer",
# "Read error ...: Connection reset by peer", "Timed out waiting 10000ms for recv operation";
# nccl: "remote process exited or there was a network error", "timeout", a communicator aborted)
_PEER_GONE = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "remote process",
              "network error", "aborted")


def lost_peer(exc: BaseException) -> str | None:
    """What the process group said when another rank stopped answering, its first sentence without
    the C++ source path; None for any other exception. Only gloo's transport (its source path in the
    message) or torch.distributed's own errors, and of those only the ones that say a peer is gone or
    silent: "gloo" anywhere in a message (a dataset under /data/igloo) or nccl's own failure on this
    rank ("unhandled cuda error", "invalid usage") is this rank's error, its traceback kept."""
    import torch.distributed as tdist

    full = str(exc)
    if isinstance(exc, (tdist.DistNetworkError, tdist.DistStoreError)):
        pass  # the rendezvous store or the network: the others, not this rank's work
    elif not ((isinstance(exc, tdist.DistError) or (isinstance(exc, RuntimeError)
                                                     and re.search(r"gloo[\\/]+transport[\\/]", full)))
              and any(p in full.lower() for p in _PEER_GONE)):
        return None
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and "] " in text:  # "[/__w/pytorch/.../pair.cc:553] Connection closed ..."
        text = text.split("] ", 1)[1]
    return text.split(". ")[0][:200]


def _drop_traceback_frames(exc: BaseException | None) -> None:
    """The locals of the frames an exception passed through: the DDP wrapper (so the process group)
    among them outlived Dist.close() while the exception was alive, and gloo's threads could then
    abort the interpreter's exit ("terminate called without an active exception", SIGABRT)."""
    while exc is not None:
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def main(args: argparse.Namespace) -> int:
    try:
        run, resuming = config_from_args(args)
    except (TrainError, ValueError, TypeError) as exc:
        print(f"worldsim train: {exc}", file=sys.stderr)
        return 2
    cfg = run.train
    if not cfg.data and not cfg.stream_env:
        print("worldsim train: give --data DIR [DIR ...] (or --stream-env ENV_ID, or --resume RUN)", file=sys.stderr)
        return 2
    if cfg.data and cfg.stream_env and resuming:  # a streaming run started before --data was refused beside it
        print(f"worldsim train: note: this run streams its episodes; its --data ({', '.join(cfg.data)}) was "
              "never read and is dropped", file=sys.stderr)
        run.train = cfg = dataclasses.replace(cfg, data=())
    elif cfg.data and cfg.stream_env:
        print(f"worldsim train: --stream-env trains on the episodes it records, not on --data "
              f"({', '.join(cfg.data)}); give one of the two", file=sys.stderr)
        return 2
    if cfg.stream_env_arg and not cfg.stream_env and resuming:  # recorded by a run from before this was refused
        print(f"worldsim train: note: this run does not stream; its --stream-env-arg "
              f"({' '.join(cfg.stream_env_arg)}) did nothing and is dropped", file=sys.stderr)
        run.train = cfg = dataclasses.replace(cfg, stream_env_arg=())
    elif cfg.stream_env_arg and not cfg.stream_env:  # it did nothing, yet the run's config recorded it
        print(f"worldsim train: --stream-env-arg {' '.join(cfg.stream_env_arg)} sets the simulator of --stream-env, "
              "which this run does not stream from", file=sys.stderr)
        return 2
    try:
        dist = Dist.from_env(cfg.device, timeout_s=cfg.ddp_timeout)
    except (DeviceError, RuntimeError) as exc:  # no such device; more ranks than GPUs
        print(f"worldsim train: {exc}", file=sys.stderr)
        return 2
    if dist.device.type == "cpu":
        torch.set_num_threads(cfg.threads if cfg.threads is not None else cpu_threads_per_rank(dist.local_world_size))
    elif cfg.precision != "fp32":  # on a GPU the fp32 work left (the latent encoding) runs in TF32 and
        torch.backends.cuda.matmul.allow_tf32 = True  # convolutions are autotuned
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:  # --precision fp32 is fp32 arithmetic: torch starts with cuDNN's convolutions (the autoencoder's)
        torch.backends.cuda.matmul.allow_tf32 = False  # in TF32 (cudnn.allow_tf32 = True), a 10-bit mantissa,
        torch.backends.cudnn.allow_tf32 = False  # and a caller of main() may have turned the matmuls' on

    def log(msg: str) -> None:
        if dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    try:
        return _main(run, resuming, dist, log)
    except (TrainError, DatasetError, CheckpointError) as exc:
        print(f"worldsim train: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:  # one handler: a `raise` in an earlier sibling skipped this one's cleanup
        saved = Path(cfg.out) / "state"
        if out_of_memory(exc):
            # past memory_floor's check: a size that fits the bound but not the machine. Saved states and
            # checkpoints are renamed into place whole, so the last one stands
            print(f"worldsim train: {f'rank {dist.rank}: ' if dist.enabled else ''}out of memory ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200] if str(exc) else 'no details'}); "
                  f"lower --far-batch / --seq-len (the far stage) or --ae-batch (the autoencoder stage)"
                  + (f"; {saved} holds the last saved step: --resume {cfg.out} with the smaller sizes" if saved.is_dir() else ""),
                  file=sys.stderr)
            _drop_traceback_frames(exc)
            return 1
        said = lost_peer(exc) if dist.enabled else None
        if said is not None:
            # the rank that stopped said why (or torchrun names the signal that ended it); this rank's
            # own traceback, 30 lines of gloo under the real message, only told where it was waiting
            if "timed out" in said.lower() or "timeout" in said.lower():
                waited = (f"did not answer within --ddp-timeout {cfg.ddp_timeout:g} s (stuck, or much slower: "
                          "raise --ddp-timeout for long saves, encodings or frame copies on rank 0)")
            else:
                waited = "stopped (its message, or torchrun's line naming the signal that ended it, is in the log)"
            print(f"worldsim train: rank {dist.rank}: another rank {waited} ({said}); "
                  + (f"{saved} holds the last saved step: continue with --resume {cfg.out}" if saved.is_dir()
                     else "nothing was saved yet"), file=sys.stderr)
            _drop_traceback_frames(exc)
            return 1
        # Ctrl-C twice, a full disk, a bug: passed on, after close(), with its frames' locals gone first
        _drop_traceback_frames(exc)
        raise
    finally:
        dist.close()


class RunFolderLock:
    """An exclusive lock on RUN/.lock, held by rank 0 while it trains: a second `worldsim train` on
    the same folder (a resume typed in two terminals) would interleave their states, metrics and
    checkpoints. Taken once the folder exists; released when the process ends, also on SIGKILL."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out, self.enabled, self.fh = out, enabled, None

    def acquire(self, dist: Dist) -> None:
        """Take the lock on rank 0; every rank raises the refusal together (a rank left waiting at
        the next collective would bury the message under gloo's traceback)."""
        busy = False
        if self.enabled and self.fh is None and self.out.is_dir():
            self.fh = try_lock(self.out / ".lock")
            busy = self.fh is None
        (busy,) = dist.any_flags(busy)
        if busy:
            raise TrainError(f"{self.out}: another `worldsim train` is training in this folder (locked "
                             f"{self.out / '.lock'}); wait for it, or stop it first")

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _main(run: RunConfig, resuming: bool, dist: Dist, log: Callable[[str], None]) -> int:
    lock = RunFolderLock(Path(run.train.out), dist.is_main)
    try:
        return _train(run, resuming, dist, log, lock)
    finally:
        lock.release()


def _train(run: RunConfig, resuming: bool, dist: Dist, log: Callable[[str], None], lock: RunFolderLock) -> int:
    cfg = run.train
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out}: exists and is not a folder")
    if resuming:  # before the state is read: a run training there now would change it under us
        lock.acquire(dist)  # (a new run takes it once its folder is made: a user's other folder gets no .lock)
    trainer = Trainer(run, dist, log)
    state = trainer.load_state() if (out / "state").exists() or (out / "state.old").exists() else None
    # a folder holding only config.json is a run that failed before its first step (bad data, say):
    # nothing of value is in it, so a corrected command may start over there. The latent cache
    # (latents/, keyed by dataset and encoder) may be there too: left by such a run, or copied in
    # from an earlier run on the same data to skip the encoding. So may the copy of this command's
    # --ae-from that such a run made (the same source, so this run would make the same copy)
    def is_run_config(p: Path) -> bool:
        try:
            return json.loads(p.read_text()).get("format") == CONFIG_FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    def left_by_a_failed_start(p: Path) -> bool:
        if p.name in ("latents", FRAMES_DIR, ".lock"):
            return True
        if p.name == "config.json":  # a config.json of something else is the user's, not ours to replace
            return is_run_config(p)
        if p.name != AE_DIR or not cfg.ae_from or not (p / "config.json").is_file():
            return False
        try:
            return json.loads((p / "config.json").read_text()).get("copied_from") == str(cfg.ae_from)
        except (OSError, ValueError, AttributeError):
            return False

    if resuming and state is not None:  # a --stage that leaves out the saved stage would lose or skip it
        saved = state[0]
        if saved["stage"] == "far" and cfg.stage == "ae":
            raise TrainError(f"--resume {out}: its saved state is in the far stage (step {saved.get('step')}), which "
                             "--stage ae leaves out, so nothing would train; resume with --stage far or both")
        stored_train = _read_json_object(out / "config.json").get("train", {})
        def same(name: str, now: Any, then: Any) -> bool:  # --ae-from X/ is the stored X
            if name in ("ae_from", "ae_init") and isinstance(now, str) and isinstance(then, str):
                return Path(now).resolve() == Path(then).resolve()
            return now == then

        ae_changed = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)} (it had {stored_train[f.name]})"
                      for f in dataclasses.fields(TrainConfig)
                      if f.name.startswith("ae_") and f.name in stored_train
                      and not same(f.name, getattr(cfg, f.name), stored_train[f.name])]
        if saved["stage"] == "far" and ae_changed:
            # the run would record the new settings and train nothing more of the autoencoder
            raise TrainError(f"--resume {out}: its transformer trains on the latents of its autoencoder (far step "
                             f"{saved.get('step')}), so that autoencoder is fixed now and {', '.join(ae_changed)} "
                             "would change nothing; drop the option, or fine-tune the autoencoder in a new run "
                             "with --stage ae --ae-init RUN/checkpoint")
        # the saved stage's fixed validation batches are drawn from these: a curve across such a
        # resume would show a step that is the val set's, not the model's
        drawn_from, stage_name = {"far": (("seq_len", "far_batch", "val_batches", "seed"), "far stage"),
                                  "ae": (("ae_batch", "val_batches", "seed"), "autoencoder stage")}.get(saved["stage"], ((), ""))
        val_changed = [f"--{name.replace('_', '-')} {getattr(cfg, name)} (it had {stored_train[name]})"
                       for name in drawn_from if name in stored_train and getattr(cfg, name) != stored_train[name]]
        # only a stage that trains on validates again: a finished autoencoder stage that this resume
        # leaves for the far stage (--stage far, or all its --ae-steps done) adds no val point to compare
        steps, limit = (cfg.ae_steps, cfg.ae_time_limit) if saved["stage"] == "ae" else (cfg.far_steps, cfg.far_time_limit)
        trains_on = (cfg.stage != "far" if saved["stage"] == "ae" else cfg.stage != "ae") \
            and int(saved.get("step", 0)) < steps and not (limit > 0 and float(saved.get("seconds", 0)) >= limit)
        if val_changed and trains_on and dist.is_main:
            log(f"note: {', '.join(val_changed)} changes the {stage_name}'s validation batches: its val loss "
                "from here on is not comparable with the run's earlier val points")
        ae_done = saved.get("finished") or (cfg.ae_time_limit > 0 and saved.get("seconds", 0) >= cfg.ae_time_limit)
        if saved["stage"] == "ae" and cfg.stage == "far" and not ae_done:
            raise TrainError(f"--resume {out}: its autoencoder stage is unfinished (step {saved.get('step')} of "
                             f"{saved.get('total_steps')}), which --stage far would drop; resume with --stage ae "
                             "or both (or start a far run with --ae-from)")
    started = out.is_dir() and not all(left_by_a_failed_start(p) for p in out.iterdir())
    if not resuming and (state is not None or started):
        if state is None and not is_run_config(out / "config.json"):
            held = sorted(p.name for p in out.iterdir())
            raise TrainError(f"--out {out}: exists and is not a worldsim run folder (it holds "
                             f"{', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); choose a new or empty folder")
        raise TrainError(f"{out}: already holds a training run; continue it with --resume {out} or choose another --out")
    if resuming and state is None and (out / "checkpoint").exists():
        # its state/ was deleted (to save space, say): starting over would overwrite what it trained
        raise TrainError(f"{out}: has an exported checkpoint but no saved training state ({out / 'state'}), so "
                         f"--resume cannot continue it; to train on from its weights use --far-init {out / 'checkpoint'} "
                         "(and --ae-from) with another --out")
    if resuming and state is None and not (out / AE_DIR).exists():
        log(f"{out}: no saved training state yet; starting from step 0 with its config")
    if resuming and dist.is_main:
        repaired = repair_metrics_tail(out / "metrics.jsonl")
        if repaired:
            log(f"{out / 'metrics.jsonl'}: {repaired} (a full disk or a kill)")
    # every rank has looked at the folder before rank 0 writes into it: a rank slower to get here
    # used to find rank 0's first files and refuse the run as "already holds a training run"
    dist.barrier()

    # data: names, resolution and simulator, checked against each other and the run's config
    stored = None
    if resuming and (out / "config.json").is_file():
        d = _read_json_object(out / "config.json").get("data")
        if d:
            try:
                stored = DataInfo(tuple(d["action_names"]), tuple(d["resolution"]), d.get("simulator"))
            except (KeyError, TypeError, AttributeError) as exc:
                raise TrainError(f"{out / 'config.json'}: damaged 'data' entry ({type(exc).__name__}: {exc})") from None
    if cfg.stream_env:
        data = stream_data_info(cfg)
        if stored is not None:
            check_compatible(f"--stream-env {cfg.stream_env}", data.action_names, data.resolution,
                             stored.action_names, stored.resolution, f"run {out}")
    else:
        data = probe_data(cfg.data, stored, f"run {out}")
        if cfg.stage in ("far", "both"):  # known from the index alone: say so before an autoencoder stage runs
            from worldsim.latents import names_for, open_split

            longest = 0
            for path in cfg.data:
                ds, idx, _ = open_split(path, "train", names_for(path, data.action_names), fallback=False)
                longest = max([longest, *(ds.episodes[i].length for i in idx)])
            if longest and longest < cfg.seq_len:
                raise TrainError(f"{', '.join(cfg.data)}: no train episode has --seq-len {cfg.seq_len} frames "
                                 f"(longest: {longest}); lower --seq-len or record longer episodes")
    if cfg.ae_from and (cfg.stage == "far" or cfg.stream_env):
        # the run's own copy when there is one (a resumed run, or a start that failed after copying)
        own = readable_dir(out / AE_DIR, "config.json")
        ae, meta = load_autoencoder(own if own is not None else cfg.ae_from)
        run.autoencoder = ae.config
        if own is None and meta.get("action_names") and list(meta["action_names"]) != list(data.action_names):
            log(f"note: the autoencoder from {cfg.ae_from} was trained on actions {meta['action_names']}")
    if run.autoencoder.resolution != data.resolution[0]:
        if data.resolution[0] != data.resolution[1]:
            raise TrainError(f"{cfg.data[0] if cfg.data else cfg.stream_env}: frames are {data.resolution[0]}x"
                             f"{data.resolution[1]}; the autoencoder needs square frames")
        if resuming or cfg.ae_init or (cfg.ae_from and (cfg.stage == "far" or cfg.stream_env)):
            raise TrainError(f"{cfg.data[0] if cfg.data else cfg.stream_env}: resolution {data.resolution[0]}x{data.resolution[1]} "
                             f"differs from the autoencoder's {run.autoencoder.resolution}x{run.autoencoder.resolution}")
        try:
            run.autoencoder = dataclasses.replace(run.autoencoder, resolution=data.resolution[0])
        except ValueError as exc:
            raise TrainError(f"{cfg.data[0] if cfg.data else cfg.stream_env}: {exc} "
                             "(choose --ae-down-factor to fit the frames)") from None
    try:
        run.far = dataclasses.replace(run.far, latent_channels=run.autoencoder.latent_channels,
                                      latent_size=run.autoencoder.latent_size, num_actions=len(data.action_names))
    except ValueError as exc:
        raise TrainError(f"{cfg.data[0] if cfg.data else cfg.stream_env}: {exc} "
                         "(choose --far-patch-size / --far-context-patch-size to fit the latent grid)") from None
    check_memory_floor(run, dist)  # before the folder is made and the data encoded
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except NotADirectoryError:  # a file in the way is a problem to explain (exit 2), as export, play and eval do
            if (blocker := file_in_the_way(out)) is None:
                raise
            raise TrainError(f"--out {out}: {blocker} is a file, not a folder") from None
    lock.acquire(dist)
    if dist.is_main:
        cfg_dict = run.to_dict()
        cfg_dict["data"] = {"action_names": list(data.action_names), "resolution": list(data.resolution),
                            "simulator": data.simulator}
        write_json_atomic(out / "config.json", cfg_dict)
    dist.barrier()
    log(f"worldsim train: {out} | stage {cfg.stage} | preset {cfg.preset} | device {dist.device} x {dist.world_size} | "
        f"precision {precision_note(trainer.precision, cfg.stage)} | actions {list(data.action_names)} | {data.resolution[0]}x{data.resolution[1]}")

    state_stage = state[0]["stage"] if state else None
    ae_steps_done = 0
    if cfg.stream_env and cfg.stage == "ae":
        raise TrainError("--stream-env trains the far stage; train the autoencoder on a dataset first (--stage ae)")
    # a finished autoencoder stage whose export was cut (a full disk, a kill) runs again with
    # --stage far too: it only writes the export, which the far stage needs
    (ae_export_cut,) = dist.any_flags(state_stage == "ae" and
                                      exported_step_in(out / AE_DIR, "step") != int(state[0]["step"]))
    if (cfg.stage in ("ae", "both") and state_stage != "far" and not cfg.stream_env) or ae_export_cut:
        if not run_ae_stage(trainer, run, data, state if state_stage == "ae" else None):
            return 130
        ae_dir = readable_dir(out / AE_DIR, "config.json")  # its step: fewer than asked when --ae-time-limit hit
        ae_steps_done = _ae_step(ae_dir, cfg.ae_steps) if ae_dir else cfg.ae_steps
    else:
        ae_dir = readable_dir(out / AE_DIR, "config.json")
        ae_steps_done = _ae_step(ae_dir, 0) if ae_dir else 0
    if cfg.stage in ("far", "both"):
        if not run_far_stage(trainer, run, data, state if state_stage == "far" else None, ae_steps_done):
            return 130
    trainer.plot()
    if dist.is_main:
        peak = peak_rss_mib()
        log(f"done: {out}" + (f" (peak memory {peak:.0f} MiB)" if peak is not None else "")
            + (f"; world model in {out / 'checkpoint'}" if cfg.stage != "ae" and (out / "checkpoint").is_dir()
               else f"; autoencoder in {out / AE_DIR}, its decoder paired with "
                    + (f"{cfg.ae_init}'s world model" if cfg.ae_init else "the run's world model")
                    + f" in {out / 'checkpoint'}" if (out / AE_DIR).is_dir() and (out / "checkpoint").is_dir()
               else f"; autoencoder in {out / AE_DIR}" if (out / AE_DIR).is_dir() else "; nothing to export (0 steps)"))
    # every rank leaves together. (The gloo abort this barrier was first added for, "terminate called
    # without an active exception" at a rank's exit, came from a process group that outlived
    # Dist.close(): see Dist.from_env.)
    dist.barrier()
    return 0


def stream_data_info(cfg: TrainConfig) -> DataInfo:
    import gymnasium as gym

    import envs  # noqa: F401
    from envs.recorder import parse_env_args

    try:
        settings = parse_env_args(cfg.stream_env_arg)
        env = gym.make(cfg.stream_env, **settings)
    except Exception as exc:  # an unknown id (gymnasium's NameNotFound), a setting the simulator does not take
        given = " ".join(["--stream-env", cfg.stream_env, *(["--stream-env-arg", *cfg.stream_env_arg] if cfg.stream_env_arg else [])])
        raise TrainError(f"{given}: cannot create the simulator ({type(exc).__name__}: {exc})") from None
    try:
        obs, _ = env.reset(seed=0)
        base = env.unwrapped
        sim_settings = base.simulator_settings() if hasattr(base, "simulator_settings") else settings
        return DataInfo(tuple(base.action_names), tuple(np.asarray(obs).shape[:2]),  # type: ignore[arg-type]
                        {"id": cfg.stream_env, "settings": sim_settings})
    finally:
        env.close()
