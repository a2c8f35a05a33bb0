"""Checkpoint folders: `config.json` + `model.safetensors` (never pickles).

API
    save_checkpoint(path, autoencoder, far, *, action_names, resolution=(64, 64), sampler=None,
                    simulator=None, data_summary=None, step=0, extra=None, far_dtype="float32") -> Path
    load_checkpoint(path, device=None, resolution=None, action_names=None) -> Checkpoint
    read_config(path) -> dict                        # config.json only, validated (keys and types)
    check_field_types(ConfigClass, d, what, path)    # d has every field (but MAY_BE_ABSENT's) with its type
    check_tensors(path, module, given, prefix="", float_dtype=float32)  # shapes, dtypes, finite values
    stored_far_dtype(config) -> "float32" | "bfloat16"  # how the file stores the transformer
    Checkpoint(autoencoder, far, config: dict, path)  # .action_names .resolution .sampler .simulator .step .far_dtype
    CheckpointError(ValueError)                      # message names the folder and the problem
    DEFAULT_SAMPLER = {"steps": 10, "cfg": 1.5, "shift": 1.0, "temperature": 1.0, "context_noise": 0.0,
                       "generated_noise": 0.0}

config.json keys: format, version, autoencoder (AutoencoderConfig), far (FARConfig), sampler
(steps, cfg, shift, temperature, context_noise, generated_noise: the defaults of play, eval and
Dream-v0; a config without shift samples with 1.0, the uniform grid, and one without temperature
with 1.0, plain sampling; optional still_frames, default 0: how many standstill copies of a
world's first frame Dream-v0 and play put before its start; eval ignores it), action_names,
resolution [H, W], simulator ({"id", "settings"} or null), data (training data summary), step,
weights {file, bytes, dtypes, tensors_sha256}, extra.
model.safetensors keys: "autoencoder.<name>" and "far.<name>" (the modules' state_dict keys); its
header's metadata holds the same tensors_sha256 as config.json.

The transformer's floating-point tensors may be stored in bfloat16 (`far_dtype="bfloat16"`),
which halves the file: a 2x transformer then fits the 100 MB budget of `checkpoints/` with room
to spare. The autoencoder always stays float32 (its reconstructions are what the 30 dB bar
scores). Loading upcasts: the modules are built in float32 and `load_state_dict` copies into them.

Saving is atomic: a new folder is written as a temp folder and renamed into place; an existing
folder (which may hold a model card or other files) gets both files written in full to temp names
before either is os.replace'd (weights first, config.json last; dataset.atomic_write_all), and
config.json records the weights' size so that a torn save is detected on load.

A reader between those two renames (play or eval reading a run's checkpoint while `worldsim train`
re-saves it) would get the old config.json (its step, data, val loss) with the new weights, of the
same size. So both files carry the SHA-256 of the tensors (worldsim.latents.tensors_hash, taken at
save time; a load compares the two copies and does not hash again): load_checkpoint reads the weights
once, from one open file, and reads both files again (a few times, under a second in all) until
the two agree, else fails naming the folder. Weights without the hash (checkpoints from before it,
or weights converted by a tool that drops the header's metadata) load unchecked, as before. Temp files and folders are flocked by their writer until renamed, and only unlocked
ones (a killed save's) are swept, so two savers never remove each other's.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save, save_file

from worldsim.autoencoder import Autoencoder, AutoencoderConfig
from worldsim.dataset import _lock_nb, atomic_write_all, name_the_target, readable_like_any_file, sweep_dead_twins
from worldsim.latents import tensors_hash
from worldsim.model import FAR, FARConfig
from worldsim.sampler import MAX_STEPS, MAX_STILL_FRAMES, setting_problem

FORMAT = "worldsim-checkpoint"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_SAMPLER: dict[str, Any] = {"steps": 10, "cfg": 1.5, "shift": 1.0, "temperature": 1.0, "context_noise": 0.0,
                                   "generated_noise": 0.0}
FAR_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PAIR_KEY = "tensors_sha256"  # in config.json's weights and the safetensors header: the two files are one save's
# pauses (s) between reads of a folder whose two files are from two saves: a save replaces config.json
# right after the weights, so the first re-read finds them paired unless the saver was stalled
PAIR_RETRY_PAUSES = (0.01, 0.05, 0.1, 0.25, 0.5)


class CheckpointError(ValueError):
    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"checkpoint {path}: {problem}")


@dataclass
class Checkpoint:
    autoencoder: Autoencoder
    far: FAR
    config: dict
    path: Path

    @property
    def action_names(self) -> tuple[str, ...]:
        return tuple(self.config["action_names"])

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.config["resolution"])  # type: ignore[return-value]

    @property
    def sampler(self) -> dict:
        return dict(self.config["sampler"])

    @property
    def simulator(self) -> dict | None:
        return self.config.get("simulator")

    @property
    def step(self) -> int:
        return int(self.config.get("step", 0))

    @property
    def far_dtype(self) -> str:
        return stored_far_dtype(self.config)


def stored_far_dtype(config: dict) -> str:
    """How a checkpoint config's file stores the transformer's weights ("float32" or "bfloat16")."""
    return ((config.get("weights") or {}).get("dtypes") or {}).get("far", "float32")


def _state_tensors(autoencoder: Autoencoder, far: FAR, far_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for prefix, module, dtype in (("autoencoder.", autoencoder, torch.float32), ("far.", far, far_dtype)):
        for name, t in module.state_dict().items():
            t = t.detach().to("cpu")
            if t.is_floating_point():
                t = t.to(dtype)
            # safetensors wants contiguous CPU tensors that share no storage
            tensors[prefix + name] = t.contiguous().clone()
    return tensors


def _depth_hint(prefix: str, module: torch.nn.Module, given: dict[str, torch.Tensor]) -> str:
    """Why tensors are missing when config.json's transformer depth is not the weights' (the names
    alone mislead: the last block has no coarse-output projection, so block depth-1 shows up)."""
    if prefix != "far.":
        return ""
    blocks_in_file = {int(k.split(".")[1]) for k in given if k.startswith("blocks.")}
    depth = len(module.blocks)
    if blocks_in_file and max(blocks_in_file) + 1 != depth:
        return f": {CONFIG_NAME} says far.depth {depth}, the weights hold {max(blocks_in_file) + 1} blocks"
    return ""


def save_tensors(tensors: dict[str, torch.Tensor], target: str | os.PathLike, metadata: dict[str, str],
                 into: bool = False) -> None:
    """safetensors' save_file, with its I/O failures (a full disk) raised as the OSError they are.

    into: write into the file `target` (an atomic write's flocked temp file) instead: save_file
    (safetensors 0.8) writes a new file and renames it over `target`, which left the lock on the
    unlinked old one, so another save's sweep took the live temp file for a killed save's and
    removed it. Costs a copy of the file in memory while it is written."""
    if into:
        data = save(tensors, metadata=metadata)
        with open(target, "wb") as f:
            f.write(data)
        return
    try:
        save_file(tensors, str(target), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"(?:os error |code: )(\d+)", str(exc))  # "... (os error 28)"
        if code:
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(target)) from exc
        raise  # not an I/O error: a bug to see in full


def sweep_temp_twins(path: Path) -> None:
    """Remove the `.NAME.<random>.tmp` twin folders of `path` that saves killed mid-way left (SIGKILL,
    a power cut; full-size, owned by no one): dataset.sweep_dead_twins, which takes a twin's flock
    first, so a live save's (temp_twin holds it until the rename) stays. (An unlocked sweep removed a
    concurrent save's folder under it, and `.ck.*.tmp` also matched the twin of a save into `ck.v2`.)"""
    sweep_dead_twins(path, ".tmp")


_twin_locks: dict[Path, int] = {}  # temp_twin's folders -> their flocked descriptors, until release_temp_twin


def temp_twin(path: str | os.PathLike) -> Path:
    """A new empty folder `.NAME.<random>.tmp` beside `path`, to write in and rename to `path`.

    The twins that saves killed mid-way left are removed first, and an error names `path`, not the
    twin. The folder is flocked (so that no other save's sweep removes it) until
    release_temp_twin(twin) or the end of the process."""
    path = Path(path)
    sweep_temp_twins(path)
    try:
        if path.parent.exists() and not path.parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of its folder", str(path.parent))
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkdtemp and the lock are two calls: another save's sweep may take the still unlocked folder for
        # a dead one in between, so a folder not locked at its name is left to that sweep (as _locked_temp)
        for _ in range(100):
            twin = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            try:
                fd = os.open(twin, os.O_RDONLY)
            except FileNotFoundError:
                continue
            except OSError:  # a folder cannot be opened here (Windows): unlocked, as where there is no flock
                return twin
            locked = _lock_nb(fd)
            if locked is None:  # no flock here (not POSIX): no twin is known dead, none is swept
                os.close(fd)
                return twin
            try:
                if locked and os.path.samestat(os.fstat(fd), os.stat(twin)):
                    _twin_locks[twin] = fd
                    return twin
            except FileNotFoundError:
                pass
            os.close(fd)
        raise OSError(errno.EAGAIN, "other processes' sweeps kept removing its temp folders", str(path))
    except FileExistsError as exc:  # a file further up the path: mkdir says "File exists"
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of its folder", exc.filename) from None
    except OSError as exc:
        name_the_target(exc, path)
        raise


def release_temp_twin(twin: Path) -> None:
    """Drop temp_twin's lock on `twin` (renamed into place, or removed)."""
    fd = _twin_locks.pop(Path(twin), None)
    if fd is not None:
        os.close(fd)


def save_checkpoint(
    path: str | os.PathLike,
    autoencoder: Autoencoder,
    far: FAR,
    *,
    action_names: Sequence[str],
    resolution: Sequence[int] = (64, 64),
    sampler: dict | None = None,
    simulator: dict | None = None,
    data_summary: dict | None = None,
    step: int = 0,
    extra: dict | None = None,
    far_dtype: str = "float32",
) -> Path:
    """Write a checkpoint folder atomically; returns its path.

    far_dtype: "float32" or "bfloat16", how the transformer's floating-point tensors are stored."""
    path = Path(path)
    if far_dtype not in FAR_DTYPES:
        raise ValueError(f"far_dtype must be one of {', '.join(FAR_DTYPES)}, got {far_dtype!r}")
    action_names = [str(a) for a in action_names]
    if len(action_names) != far.config.num_actions:
        raise ValueError(f"{len(action_names)} action names but the model has {far.config.num_actions} actions")
    res = [int(r) for r in resolution]
    if res != [autoencoder.config.resolution, autoencoder.config.resolution]:
        raise ValueError(f"resolution {res} does not match the autoencoder's {autoencoder.config.resolution}")
    tensors = _state_tensors(autoencoder, far, FAR_DTYPES[far_dtype])
    # of the tensors, not a random draw: config.json stays reproducible, and two saves of the same
    # weights may pair either way (it is the same checkpoint)
    pair = tensors_hash(tensors)
    config: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "autoencoder": autoencoder.config.to_dict(),
        "far": far.config.to_dict(),
        "sampler": {**DEFAULT_SAMPLER, **(sampler or {})},
        "action_names": action_names,
        "resolution": res,
        "simulator": simulator,
        "data": data_summary or {},
        "step": int(step),
        "weights": {"file": WEIGHTS_NAME, "bytes": None, "dtypes": {"autoencoder": "float32", "far": far_dtype},
                    PAIR_KEY: pair},
        "extra": extra or {},
    }

    def write_weights(target: str) -> None:
        save_tensors(tensors, target, {"format": FORMAT, PAIR_KEY: pair}, into=True)
        config["weights"]["bytes"] = os.path.getsize(target)

    def write_config(target: str) -> None:
        with open(target, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    # what saves killed mid-write (SIGKILL, a power cut) left: full-size temp twins no one else owns
    # (the temp files inside an existing folder are atomic_write_all's to sweep, as locked as these)
    sweep_temp_twins(path)
    if not path.exists():
        tmp_dir = temp_twin(path)
        try:
            write_weights(str(tmp_dir / WEIGHTS_NAME))
            write_config(str(tmp_dir / CONFIG_NAME))
            readable_like_any_file(tmp_dir)
            try:
                os.replace(tmp_dir, path)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not path.is_dir():
                    raise
                # another save made the folder meanwhile: replace its files as a re-save would (weights first)
                for name in (WEIGHTS_NAME, CONFIG_NAME):
                    os.replace(tmp_dir / name, path / name)
                shutil.rmtree(tmp_dir, ignore_errors=True)
        except BaseException as exc:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            if isinstance(exc, OSError):  # a full disk or the like: name the checkpoint, not its temp twin
                name_the_target(exc, path)
            raise
        finally:
            release_temp_twin(tmp_dir)
    else:
        if not path.is_dir():
            raise CheckpointError(path, "exists and is not a folder")
        # both files are written in full before either replaces its old one: a full disk (or a
        # Ctrl-C) while writing the second must not leave new weights beside the old config
        atomic_write_all([(path / WEIGHTS_NAME, write_weights), (path / CONFIG_NAME, write_config)])
    return path


# keys of config.json's objects that older versions did not write (the first checkpoints, before
# the decoder could be deepened): their defaults are what those versions meant; any other missing
# key would load as a default silently
MAY_BE_ABSENT = {"autoencoder": ("decoder_blocks_per_level",), "far": ("memory_span",)}


def check_field_types(cls: type, d: object, what: str, path: str | os.PathLike,
                      may_be_absent: Iterable[str] | None = None) -> None:
    """config.json's `what` object holds every field of `cls` (but those MAY_BE_ABSENT, or
    `may_be_absent` where given) with values of the fields' types (an int is not a bool or a float,
    a Literal one of its values): else the model would be built from strings, crash on its
    arithmetic, or take a default it was not trained with (a window of 16)."""
    if not isinstance(d, dict):
        raise CheckpointError(path, f"{CONFIG_NAME}: {what} must be an object, got {d!r}")
    absent_ok = set(MAY_BE_ABSENT.get(what, ()) if may_be_absent is None else may_be_absent)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.name not in absent_ok]
    if missing:
        raise CheckpointError(path, f"{CONFIG_NAME}: {what} lacks {', '.join(repr(k) for k in missing)} "
                                    "(a config edited by hand, or written by another tool?)")
    hints = typing.get_type_hints(cls)

    def fits(value: object, kind: object) -> bool:
        if kind is bool:
            return isinstance(value, bool)
        if kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if kind is float:  # JSON writes 2.0 as 2.0, but a hand-edited 2 means the same
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if typing.get_origin(kind) in (tuple, list):  # tuple[int, ...] / list[int]: JSON lists
            item = typing.get_args(kind)[0]
            return isinstance(value, (list, tuple)) and all(fits(v, item) for v in value)
        if typing.get_origin(kind) is typing.Literal:
            return any(value == v and type(value) is type(v) for v in typing.get_args(kind))
        if typing.get_args(kind):  # X | None
            return any(value is None if k is type(None) else fits(value, k) for k in typing.get_args(kind))
        return isinstance(value, kind) if isinstance(kind, type) else True

    def name(kind: object) -> str:
        words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
        if typing.get_origin(kind) in (tuple, list):
            return f"a list of {name(typing.get_args(kind)[0]).removeprefix('an ').removeprefix('a ')}s"
        if typing.get_origin(kind) is typing.Literal:
            return "one of " + ", ".join(map(repr, typing.get_args(kind)))
        if typing.get_args(kind):
            return " or ".join(name(k) for k in typing.get_args(kind))
        return words.get(kind, getattr(kind, "__name__", str(kind)))

    for key, value in d.items():
        if key in hints and not fits(value, hints[key]):
            raise CheckpointError(path, f"{CONFIG_NAME}: {what}.{key} must be {name(hints[key])}, got {value!r}")


def check_tensors(path: str | os.PathLike, module: torch.nn.Module, given: dict[str, torch.Tensor],
                  prefix: str = "", float_dtype: torch.dtype = torch.float32) -> None:
    """`given` fills every tensor of `module` with its shape, its dtype (floats stored as
    `float_dtype`) and finite values; CheckpointError(path) names the first that does not.
    (load_state_dict alone would cast silently: int64 weights become zeros, NaN plays black frames.)
    Tensors `module` lacks are the caller's to report."""
    own = module.state_dict()
    missing = sorted(set(own) - set(given))
    if missing:
        raise CheckpointError(path, f"missing tensor(s) {[prefix + k for k in missing[:5]]}"
                              + (" ..." if len(missing) > 5 else "") + _depth_hint(prefix, module, given))
    for k, v in sorted(given.items()):  # by name, as load_file gave them: load() of bytes gives file order
        if k not in own:
            continue
        if own[k].shape != v.shape:
            raise CheckpointError(path, f"shape mismatch for {prefix + k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}")
        expected = float_dtype if own[k].is_floating_point() else own[k].dtype
        if v.dtype != expected:
            raise CheckpointError(path, f"tensor {prefix + k} is {str(v.dtype).removeprefix('torch.')}, "
                                        f"expected {str(expected).removeprefix('torch.')}")
        # a finite sum means finite values (NaN and inf carry through a sum), at an eighth of the cost of
        # isfinite's mask on the shipped weights; a sum that overflows is checked value by value
        if v.is_floating_point() and not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
            raise CheckpointError(path, f"tensor {prefix + k} holds NaN or infinite values")


def read_config(path: str | os.PathLike) -> dict:
    """Read and validate config.json (no weights)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "no such checkpoint folder")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(path, f"missing {CONFIG_NAME}")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as e:  # bad JSON, bytes that are not UTF-8, a number of over 4,300 digits
        raise CheckpointError(path, f"corrupt {CONFIG_NAME}: {e}") from None
    except RecursionError:  # a few KB of "[[[[..." is a RecursionError traceback, not a JSONDecodeError
        raise CheckpointError(path, f"corrupt {CONFIG_NAME}: nested too deeply") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(path, f"{CONFIG_NAME} is not a {FORMAT} config (format={config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("version") != VERSION:
        raise CheckpointError(path, f"unsupported checkpoint version {config.get('version')!r} (expected {VERSION})")
    for key in ("autoencoder", "far", "action_names", "resolution", "sampler"):
        if key not in config:
            raise CheckpointError(path, f"{CONFIG_NAME} lacks the key {key!r}")
    check_field_types(AutoencoderConfig, config["autoencoder"], "autoencoder", path)
    check_field_types(FARConfig, config["far"], "far", path)
    names = config["action_names"]
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)):
        raise CheckpointError(path, f"{CONFIG_NAME}: action_names must be a list of distinct names, got {names!r}")
    res = config["resolution"]
    if not (isinstance(res, list) and len(res) == 2 and all(isinstance(r, int) and not isinstance(r, bool) and r > 0
                                                            for r in res)):
        raise CheckpointError(path, f"{CONFIG_NAME}: resolution must be [height, width] in pixels, got {res!r}")
    step = config.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(path, f"{CONFIG_NAME}: step must be an integer >= 0, got {step!r}")
    simulator = config.get("simulator")
    if simulator is not None and not (isinstance(simulator, dict) and isinstance(simulator.get("id"), str)
                                      and isinstance(simulator.get("settings") or {}, dict)):
        raise CheckpointError(path, f"{CONFIG_NAME}: simulator must be null or {{\"id\": ..., \"settings\": {{...}}}}, "
                                    f"got {simulator!r}")
    for key in ("data", "extra"):  # the training data's summary and free notes: read as objects (eval's table by age)
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CheckpointError(path, f"{CONFIG_NAME}: {key} must be an object or null, got {config[key]!r}")
    weights = config.get("weights")
    if weights is not None:
        size, dtypes = (weights.get("bytes"), weights.get("dtypes") or {}) if isinstance(weights, dict) else (None, None)
        if (not isinstance(weights, dict) or not (size is None or (isinstance(size, int) and not isinstance(size, bool)))
                or not isinstance(dtypes, dict) or dtypes.get("far", "float32") not in FAR_DTYPES
                or dtypes.get("autoencoder", "float32") != "float32"
                or not isinstance(weights.get(PAIR_KEY, ""), str)):
            raise CheckpointError(path, f"{CONFIG_NAME}: weights must be {{\"bytes\": N, \"dtypes\": {{\"autoencoder\": "
                                        f"\"float32\", \"far\": one of {', '.join(FAR_DTYPES)}}}, \"{PAIR_KEY}\": "
                                        f"\"...\"}}, got {weights!r}")
    sampler = config["sampler"]
    if not isinstance(sampler, dict):
        raise CheckpointError(path, f"{CONFIG_NAME}: sampler must be an object, got {sampler!r}")
    steps = sampler.get("steps", 1)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise CheckpointError(path, f"{CONFIG_NAME}: sampler.steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    for name in ("cfg", "shift", "temperature", "context_noise", "generated_noise"):
        if name in sampler and (problem := setting_problem(name, sampler[name])):
            raise CheckpointError(path, f"{CONFIG_NAME}: sampler.{name} {problem}")
    still = sampler.get("still_frames", 0)
    if not isinstance(still, int) or isinstance(still, bool) or not 0 <= still <= MAX_STILL_FRAMES:
        raise CheckpointError(path, f"{CONFIG_NAME}: sampler.still_frames must be an integer from 0 to "
                                    f"{MAX_STILL_FRAMES}, got {still!r}")
    return config


def _model_configs(path: Path, config: dict, resolution: Sequence[int] | None,
                   action_names: Sequence[str] | None) -> tuple[AutoencoderConfig, FARConfig]:
    """The modules' configs from a read_config'd config.json, checked against each other and the request."""
    if resolution is not None and [int(r) for r in resolution] != list(config["resolution"]):
        raise CheckpointError(
            path, f"resolution {list(config['resolution'])} differs from the requested {list(resolution)}"
        )
    if action_names is not None and list(action_names) != list(config["action_names"]):
        raise CheckpointError(
            path, f"action names {list(config['action_names'])} differ from the requested {list(action_names)}"
        )
    try:
        ae_cfg = AutoencoderConfig.from_dict(config["autoencoder"])
        far_cfg = FARConfig.from_dict(config["far"])
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(path, f"invalid model config in {CONFIG_NAME}: {e}") from None
    if list(config["resolution"]) != [ae_cfg.resolution] * 2:
        raise CheckpointError(path, f"{CONFIG_NAME}: resolution {config['resolution']} but the autoencoder makes "
                                    f"{ae_cfg.resolution}x{ae_cfg.resolution} frames")
    if len(config["action_names"]) != far_cfg.num_actions:
        raise CheckpointError(path, f"{len(config['action_names'])} action names but far.num_actions={far_cfg.num_actions}")
    if (far_cfg.latent_channels, far_cfg.latent_size) != (ae_cfg.latent_channels, ae_cfg.latent_size):
        raise CheckpointError(
            path, f"the transformer expects {far_cfg.latent_size}x{far_cfg.latent_size}x{far_cfg.latent_channels} latents "
                  f"but the autoencoder makes {ae_cfg.latent_size}x{ae_cfg.latent_size}x{ae_cfg.latent_channels}")
    return ae_cfg, far_cfg


def _read_weights(path: Path) -> bytes:
    """model.safetensors' bytes, read from one open file: its header and its tensors are one save's
    even while a save replaces the file (loading by name would open it twice)."""
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(path, f"missing {WEIGHTS_NAME}")
    try:
        with open(weights, "rb") as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(path, f"unreadable {WEIGHTS_NAME}: {e}") from None


def _header_metadata(data: bytes) -> dict | None:
    """The `__metadata__` of a safetensors file's header ({} if none); None if the header does not
    parse (safetensors' load then says what is wrong)."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        return None
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, RecursionError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def load_checkpoint(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    resolution: Sequence[int] | None = None,
    action_names: Sequence[str] | None = None,
) -> Checkpoint:
    """Rebuild autoencoder + FAR from a folder. `resolution` / `action_names`, when given, must match."""
    path = Path(path)
    # config.json, then the weights: a save (weights first, config.json last) that lands in between
    # pairs this config with the next save's weights, so both are read again until their hashes agree
    started = time.monotonic()
    for attempt, pause in enumerate((*PAIR_RETRY_PAUSES, None), start=1):
        config = read_config(path)
        ae_cfg, far_cfg = _model_configs(path, config, resolution, action_names)
        data = _read_weights(path)
        meta = _header_metadata(data)
        # one save's pair, or weights without the hash (a checkpoint from before the hashes, or weights
        # rewritten by a tool that drops the header's metadata: loaded, and their size checked, as they
        # always were; a save replaces the weights before config.json, so a hashed config.json beside
        # unhashed weights is never a save in progress, and waiting for it only delayed a misleading
        # refusal); a header that does not parse is safetensors' to name below
        if meta is None or PAIR_KEY not in meta or meta[PAIR_KEY] == (config.get("weights") or {}).get(PAIR_KEY):
            break
        if pause is None:
            raise CheckpointError(path, f"{CONFIG_NAME} and {WEIGHTS_NAME} are from two different saves (their "
                                        f"{PAIR_KEY} differ, {attempt} reads over {time.monotonic() - started:.1f} s): "
                                        "the folder is being rewritten (a training run saving into it?) or holds "
                                        "files of two saves")
        time.sleep(pause)
    expected_bytes = (config.get("weights") or {}).get("bytes")
    if expected_bytes is not None and len(data) != expected_bytes:
        raise CheckpointError(
            path, f"{WEIGHTS_NAME} has {len(data)} bytes, {CONFIG_NAME} expects {expected_bytes} (torn or foreign save?)"
        )
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"unreadable {WEIGHTS_NAME}: {e}") from None
    del data  # the tensors hold their own copy

    # config.json's sizes are checked against the weights before the modules get memory: a hand-edited
    # far.width of 10**6 allocated 4 TB (a RuntimeError traceback) and a depth of 10**5 ate memory for
    # minutes. The depth first, from the tensor names (building 10**5 empty blocks is slow too), then
    # every shape on storage-less ("meta") modules.
    blocks_in_file = {int(k.split(".")[2]) for k in tensors if re.match(r"far\.blocks\.\d+\.", k)}
    if blocks_in_file and max(blocks_in_file) + 1 != far_cfg.depth:
        raise CheckpointError(path, f"{CONFIG_NAME} says far.depth {far_cfg.depth}, the weights hold "
                                    f"{max(blocks_in_file) + 1} blocks")
    with torch.device("meta"):
        shells = {"autoencoder.": Autoencoder(ae_cfg), "far.": FAR(far_cfg)}
    givens = {}
    for prefix, shell in shells.items():
        givens[prefix] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        float_dtype = FAR_DTYPES[stored_far_dtype(config)] if prefix == "far." else torch.float32
        check_tensors(path, shell, givens[prefix], prefix, float_dtype)
    # Their random initial weights are all overwritten below: drawn from a fork of the global
    # generator, so that loading a model (gym.make("worldsim/Dream-v0")) leaves the caller's torch
    # random stream where it was instead of moving it on by every weight's draw
    with torch.random.fork_rng(devices=[]):
        autoencoder, far = Autoencoder(ae_cfg), FAR(far_cfg)
    for prefix, module in (("autoencoder.", autoencoder), ("far.", far)):
        module.load_state_dict(givens[prefix], strict=False)
    ae_keys, far_keys = autoencoder.state_dict().keys(), far.state_dict().keys()  # once, not per tensor
    unexpected = sorted(
        k for k in tensors
        if not (k.startswith("autoencoder.") and k[12:] in ae_keys)
        and not (k.startswith("far.") and k[4:] in far_keys)
    )
    if unexpected:
        given_far = {k[4:]: v for k, v in tensors.items() if k.startswith("far.")}
        raise CheckpointError(path, f"unexpected tensor(s) {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else "")
                              + _depth_hint("far.", far, given_far))

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autoencoder.to(dev).eval()
    far.to(dev).eval()
    return Checkpoint(autoencoder, far, config, path)
