"""WorldModel (autoencoder + FAR + sampler settings) and interactive generation Sessions.

API
    WorldModel(autoencoder, far, action_names, resolution=(64, 64), simulator=None, sampler=None,
               config=None, device=None, precision="fp32")
      WorldModel.load(path, device=None, resolution=None, action_names=None, precision="fp32") -> WorldModel
      .save(path, step=None, data_summary=None, extra=None, far_dtype=None) -> Path   (fp32 WorldModels only;
            far_dtype None keeps the loaded checkpoint's storage of the transformer, see checkpoint.py)
      .autoencoder, .far, .action_names, .resolution, .simulator, .sampler (dict), .config, .device,
      .precision ("fp32" | "bf16" | "bf16-kv": the transformer's arithmetic on CPU, see PRECISIONS)
      .encode(frames uint8 [...,H,W,3]) -> latents [...,C,h,w];  .decode(latents) -> uint8 frames
      .new_session(context_frames uint8 [K,H,W,3], context_actions int64 [K],
                   cache_mode="multilevel"|"multilevel-fast"|"kv"|"none"|"sliding" (or a GenerationContext,
                              which takes the world's precision: make_context(world.far, mode)),
                   steps=None, cfg=None, seed=None, context_noise=None, generated_noise=None,
                   shift=None, temperature=None, memory_frames=None) -> Session
    Session
      .predict(action) -> uint8 [H,W,3]      generate the next frame, do not append it
      .append(frame uint8 [H,W,3], action)   append a given (ground-truth) frame
      .step(action) -> uint8 [H,W,3]         predict + append the generated latent (on a CPU with a
                                             second core, decoded there while the cache takes it in)
      .predict_latent(action) -> [C,h,w];  .append_latent(latent [C,h,w], action);  .step_latent(action)
      .frame_index: int (frames so far = index of the next frame);  .stats() -> dict
      .precision: what the session runs: the world's, but fp32 for a bf16-kv world's mode none (no cache)

`actions[t]` produced frame t from frame t-1 (DESIGN.md), so predict(action) takes the action
leading to the new frame. `steps`, `cfg`, `shift` (the sampler's timestep shift) and
`temperature` (the scale of the initial noise; see worldsim.sampler for both) default to the
checkpoint's sampler settings. Randomness (initial noise, context noise augmentation) comes from a
torch.Generator seeded by `seed` (0 to 2**32 - 1): the same seed gives the same frames, on the same
torch threads and cores (at one thread, step's cache update runs in a pass of its own where a second
core decodes alongside, and shares the next frame's first pass where none does, as after
step_latent: the frames then differ in float rounding, as between thread counts). `context_noise` (default:
the checkpoint's sampler setting) noises appended context latents slightly, as in training;
`generated_noise` (default: the checkpoint's, 0 = off) instead noises and labels the frames the
model generates itself (step, step_latent) with its level, never the given ones, for a model
trained with `--obj-rollout-aug` to tell its own frames from real ones.
"""
from __future__ import annotations

import copy
import math
import numbers
import operator
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from worldsim.autoencoder import Autoencoder, frames_to_tensor, tensor_to_frames
from worldsim.cache import GenerationContext, UncachedContext, make_context
from worldsim.checkpoint import DEFAULT_SAMPLER, load_checkpoint, save_checkpoint, stored_far_dtype
from worldsim.model import FAR, autocast, autocast_for, cpu_has_native_bf16, pick_device, usable_cores
from worldsim.sampler import EulerSampler, setting_problem

# The transformer's arithmetic on CPU. fp32: exact and reproducible (eval's default). bf16:
# weights and KV cache stored in bfloat16, run under CPU bf16 autocast (kernels accumulate in
# fp32; RoPE and the sampler in fp32): half the bytes read per forward pass, which bounds a 2-core
# CPU's cached generation. bf16-kv: fp32 weights and matmuls, the KV cache stored and attended in
# bf16, for CPUs without native bf16 arithmetic, whose emulated bf16 matmuls are slower than fp32
# (the model card's HISTORY.md, "Session 36"). auto: bf16 where the CPU has native bf16
# arithmetic (cpu_has_native_bf16), else bf16-kv. The autoencoder stays fp32 either way. CUDA
# always runs the transformer under bf16 autocast (fp32 weights), as in training, so it reports
# bf16 whatever is asked; other devices run fp32.
PRECISIONS = ("fp32", "bf16", "bf16-kv", "auto")


_RAN_A_WORLD_MODEL = False  # set by WorldModel(): only then do forks of this process get one thread
_FORKED_WORKER = False  # this process was forked after a WorldModel ran: one of a pool of workers


def _one_thread_after_fork() -> None:
    # torch's OpenMP pool does not survive a fork: a child forked after the parent ran multi-threaded
    # (gymnasium's AsyncVectorEnv forks its workers after building a Dream-v0 in the parent) hung in
    # its first parallel op for good, and hangs again if it raises its threads. Workers that need
    # more threads start with spawn (vector_kwargs={"context": "spawn"}).
    global _FORKED_WORKER
    if _RAN_A_WORLD_MODEL:
        torch.set_num_threads(1)
        _FORKED_WORKER = True


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_one_thread_after_fork)


_DECODER_THREAD: ThreadPoolExecutor | None = None  # its one thread: see decode_alongside


def decode_alongside(device: torch.device) -> ThreadPoolExecutor | None:
    """The thread that decodes a generated frame while Session.step brings the cache up to date
    on the calling thread, or None where that does not pay: off the CPU, where torch already runs
    several threads (each thread's ops would fight for the cores), on one core, or in a forked
    worker (a pool of them keeps every core busy, and the cache update's own pass costs CPU time:
    ~130 against ~106 CPU ms a frame at frame 500). Two single-threaded jobs on two cores: the
    frame's decoder (~24 ms at frame 500 on the project's 2-core EPYC) no longer adds to the
    transformer's time: 7-17% faster frames (model card HISTORY, "Session 37"), but 4-7% slower
    beside another program busy on the second core. Not switched by the measured load: where a
    frame is decoded sets the float rounding of the frames after it, and a seed must give the same
    frames on the same threads and cores. (A forked child never uses the pool it inherits, whose
    thread it has not: work given to it would never run.)"""
    global _DECODER_THREAD
    if device.type != "cpu" or torch.get_num_threads() != 1 or _FORKED_WORKER:
        return None
    if usable_cores() < 2:
        return None
    if _DECODER_THREAD is None:
        _DECODER_THREAD = ThreadPoolExecutor(1, thread_name_prefix="worldsim-decode")
    return _DECODER_THREAD


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        return "bf16"
    if device.type != "cpu":
        return "fp32"
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "bf16-kv"
    return precision


def with_still_frames(frames: np.ndarray, actions: np.ndarray, still_frames: int,
                      noop: int) -> tuple[np.ndarray, np.ndarray]:
    """A context with `still_frames` copies of its first frame, action `noop`, in front: a player
    who stood still there. How Dream-v0 starts a game (the checkpoint's `sampler.still_frames`),
    and what `worldsim eval --still-frames` reproduces."""
    if not still_frames:
        return frames, actions
    frames = np.concatenate([np.repeat(frames[:1], still_frames, axis=0), frames])  # (P + K, H, W, 3)
    actions = np.concatenate([np.full(still_frames, noop, dtype=np.int64), np.asarray(actions, dtype=np.int64)])
    return frames, actions


def _context_action_indices(context_actions: object, action_names: Sequence[str]) -> np.ndarray:
    """int64 action indices of a context, or a ValueError naming the problem: np.asarray(...,
    dtype=int64) played 1.5 as action 1 and failed on names with "invalid literal for int()"."""
    raw = np.asarray(context_actions)
    if raw.dtype.kind in "iu":
        return raw.astype(np.int64)
    if raw.dtype.kind == "f" and np.isfinite(raw).all() and (raw == np.round(raw)).all():
        return raw.astype(np.int64)  # whole floats (an empty list is float64), as Session.step takes 1.0
    example = f"[world.action_names.index(name) for name in names], names from {list(action_names)}"
    if raw.dtype.kind in "USO":
        raise ValueError(f"context_actions must be action indices, not names or objects; e.g. {example}")
    raise ValueError(f"context_actions must be whole action indices 0..{len(action_names) - 1}, got {raw.dtype} "
                     f"values such as {raw.ravel()[:3].tolist()}")


class WorldModel:
    """An autoencoder, a FAR transformer and its sampler settings: load a checkpoint with
    `WorldModel.load(path)`, then generate with `new_session(context_frames, context_actions)`
    (the module docstring lists the API)."""

    def __init__(
        self,
        autoencoder: Autoencoder,
        far: FAR,
        action_names: Sequence[str],
        resolution: Sequence[int] = (64, 64),
        simulator: dict | None = None,
        sampler: dict | None = None,
        config: dict | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
    ):
        global _RAN_A_WORLD_MODEL
        _RAN_A_WORLD_MODEL = True
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.autoencoder = autoencoder.to(self.device).eval()
        if self.device.type == "cpu":
            # Channels-last (NHWC) convolutions decode a frame faster on CPU (scripts/time_decode.py:
            # 10-13 ms against 11-20 on a 2-core EPYC): PyTorch sends 19 of the decoder's 37 convs of
            # a batch-1 frame to its im2col fallback, which is quicker on NHWC, and the rest
            # to oneDNN. Same numbers to float rounding. Encoding (batches of frames) is unchanged.
            # In place: a caller's module shares the layout (its weights and outputs are the same).
            self.autoencoder.decoder.to(memory_format=torch.channels_last)
        self.far = far.to(self.device).eval()
        if self.precision == "bf16" and self.device.type == "cpu":
            # a rounded copy: the caller's module (fp32, maybe another WorldModel's) stays as it was
            self.far = copy.deepcopy(self.far).to(torch.bfloat16)
        self.action_names = tuple(action_names)
        if len(self.action_names) != far.config.num_actions:
            raise ValueError(f"{len(self.action_names)} action names for a model with {far.config.num_actions} actions")
        self.resolution = tuple(int(r) for r in resolution)
        self.simulator = simulator
        self.sampler = {**DEFAULT_SAMPLER, **(sampler or {})}
        self.config = dict(config) if config is not None else {
            "autoencoder": autoencoder.config.to_dict(),
            "far": far.config.to_dict(),
            "sampler": self.sampler,
            "action_names": list(self.action_names),
            "resolution": list(self.resolution),
            "simulator": simulator,
        }

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        resolution: Sequence[int] | None = None,
        action_names: Sequence[str] | None = None,
        precision: str = "fp32",
    ) -> "WorldModel":
        ck = load_checkpoint(path, device=pick_device(device), resolution=resolution, action_names=action_names)
        return cls(ck.autoencoder, ck.far, ck.action_names, ck.resolution, ck.simulator, ck.sampler, ck.config, device,
                   precision)

    def save(
        self, path: str | os.PathLike, step: int | None = None, data_summary: dict | None = None, extra: dict | None = None,
        far_dtype: str | None = None,
    ) -> Path:
        if next(self.far.parameters()).dtype != torch.float32:
            raise ValueError(f"this WorldModel holds its transformer in {self.precision} (rounded weights); "
                             "save from one loaded with precision='fp32'")
        return save_checkpoint(
            path, self.autoencoder, self.far, action_names=self.action_names, resolution=self.resolution,
            sampler=self.sampler, simulator=self.simulator,
            data_summary=data_summary if data_summary is not None else self.config.get("data"),
            step=step if step is not None else int(self.config.get("step", 0)),
            extra=extra if extra is not None else self.config.get("extra"),
            far_dtype=far_dtype or stored_far_dtype(self.config),
        )

    def __repr__(self) -> str:  # the default named only the class; modules' reprs run to pages
        far = self.far.config
        return (f"WorldModel(actions={list(self.action_names)}, resolution={self.resolution}, "
                f"far={far.depth}x{far.width}, step={self.config.get('step')}, device='{self.device}', "
                f"precision={self.precision!r})")

    encode_batch = 64  # frames per autoencoder call: bounds activation memory for long contexts

    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        if not isinstance(frames, torch.Tensor):
            frames = np.asarray(frames)
        if frames.ndim < 3 or tuple(frames.shape[-3:]) != (*self.resolution, 3):  # else latents of another size
            raise ValueError(f"frames must be [..., {self.resolution[0]}, {self.resolution[1]}, 3], got {tuple(frames.shape)}")
        lead = frames.shape[:-3]
        flat = frames.reshape(-1, *frames.shape[-3:])
        out = []
        for i in range(0, max(len(flat), 1), self.encode_batch):
            x = frames_to_tensor(flat[i : i + self.encode_batch]).to(self.device)
            with autocast(self.device):
                out.append(self.autoencoder.encode(x).float())
        z = out[0] if len(out) == 1 else torch.cat(out)
        return z.reshape(*lead, *z.shape[1:])

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor | np.ndarray) -> np.ndarray:
        # numpy latents failed on "'numpy.ndarray' object has no attribute 'to'", and latents of another
        # shape deep in a convolution ("expected input[1, 8, 8, 8] to have 16 channels")
        z = torch.as_tensor(latents).to(self.device, torch.float32)
        ae = self.autoencoder.config
        want = (ae.latent_channels, ae.resolution // ae.down_factor, ae.resolution // ae.down_factor)
        if z.ndim < 3 or tuple(z.shape[-3:]) != want:
            raise ValueError(f"latents must be [..., {', '.join(map(str, want))}] (what encode gives), "
                             f"got {tuple(z.shape)}")
        lead = z.shape[:-3]
        z = z.reshape(-1, *z.shape[-3:])  # (N, C, h, w)
        if self.device.type == "cpu":
            z = z.contiguous(memory_format=torch.channels_last)  # the decoder's layout (__init__)
        with autocast(self.device):
            frames = tensor_to_frames(self.autoencoder.decode(z))  # (N, H, W, 3)
        return frames.reshape(*lead, *frames.shape[1:])

    def new_session(
        self,
        context_frames: np.ndarray,
        context_actions: np.ndarray,
        cache_mode: str | GenerationContext = "multilevel",
        steps: int | None = None,
        cfg: float | None = None,
        seed: int | None = None,
        context_noise: float | None = None,
        generated_noise: float | None = None,
        shift: float | None = None,
        temperature: float | None = None,
        memory_frames: int | None = None,
    ) -> "Session":
        """memory_frames: keep at most this many frames in the multi-level modes' long-term memory
        (L2), the oldest forgotten (cache.py, "Bounded memory"); None: every frame, as in the paper."""
        frames = np.asarray(context_frames)
        actions = _context_action_indices(context_actions, self.action_names)
        if frames.ndim != 4 or frames.shape[1:3] != self.resolution or frames.shape[3] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"context_frames must be uint8 [K,{self.resolution[0]},{self.resolution[1]},3], got {frames.dtype} {frames.shape}")
        if actions.shape != (frames.shape[0],):
            raise ValueError(f"context_actions must have shape ({frames.shape[0]},), got {actions.shape}")
        bad = actions[(actions < 0) | (actions >= len(self.action_names))]
        if bad.size:  # the null class (CFG's) is not a context action, and others fail deep in torch
            raise ValueError(f"context action {int(bad[0])} out of range for {self.action_names}")
        # counts: int() made steps=2.5 two steps and seed=1.5 seed 1, and memory_frames=0 was refused
        # under its cache.py name, max_l2_frames
        for name, value, least in (("steps", steps, 1), ("memory_frames", memory_frames, 1), ("seed", seed, None)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or (least is not None and value < least)):
                rule = f"an integer >= {least}" if least is not None else "an integer"
                raise ValueError(f"{name} must be {rule} or None, got {value!r}")
        kv_dtype = torch.bfloat16 if self.precision == "bf16-kv" else None  # the cache's storage (PRECISIONS)
        if isinstance(cache_mode, str):
            context = make_context(self.far, cache_mode, memory_frames, kv_dtype)
        else:
            context = cache_mode
            if not isinstance(context, UncachedContext) and context.kv_dtype != kv_dtype:
                # A context made without kv_dtype (make_context's default, or a context class itself)
                # kept it: a bf16-kv world's session silently ran an fp32 cache, not the world's precision.
                # One with nothing cached yet takes the world's (set on it: the session owns it from here);
                # another dtype chosen, or frames already stored in one, would run a precision the world
                # does not say: refused.
                if context.kv_dtype is None and context.num_frames == 0:
                    context.kv_dtype = kv_dtype
                else:
                    def storage(dtype: torch.dtype | None) -> str:
                        return "the transformer's dtype" if dtype is None else str(dtype)

                    held = f" and already holds {context.num_frames} frames" if context.num_frames else ""
                    raise ValueError(
                        f"cache_mode: this context stores its cache in {storage(context.kv_dtype)}{held}, but this "
                        f"WorldModel's precision {self.precision} stores it in {storage(kv_dtype)}; pass the mode's "
                        f"name, or a new context from make_context(world.far, mode) (it takes the world's)")
        sampler = EulerSampler(
            steps=int(steps if steps is not None else self.sampler["steps"]),
            cfg_scale=float(cfg if cfg is not None else self.sampler["cfg"]),
            shift=float(shift if shift is not None else self.sampler.get("shift", 1.0)),
            temperature=float(temperature if temperature is not None else self.sampler.get("temperature", 1.0)),
        )
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        elif not 0 <= int(seed) < 2**32:  # torch's CPU generator keeps a seed's low 32 bits (and reads -1 as
            # 2**64 - 1): seed=2**32 gave the frames of seed=0, seed=-1 those of 2**32 - 1, on a GPU not
            raise ValueError(f"seed must be from 0 to 2**32 - 1, got {seed}")
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        noise_level = float(context_noise if context_noise is not None else self.sampler.get("context_noise", 0.0))
        generated_level = float(generated_noise if generated_noise is not None
                                else self.sampler.get("generated_noise", 0.0))
        for name, value in (("context_noise", noise_level), ("generated_noise", generated_level)):
            if problem := setting_problem(name, value):
                raise ValueError(f"{name} {problem}")
        session = Session(self, context, sampler, generator, noise_level, generated_level)
        if len(frames):
            latents = self.encode(frames)  # (K, C, h, w)
            session.extend_latents(latents, torch.as_tensor(actions, device=self.device))
        return session


class Session:
    """One generated world: a frame history (in the context's cache) and a random stream."""

    def __init__(
        self, world: WorldModel, context: GenerationContext, sampler: EulerSampler, generator: torch.Generator,
        context_noise: float = 0.0,
        generated_noise: float = 0.0,
    ):
        self.world = world
        self.context = context
        self.sampler = sampler
        self.generator = generator
        self.context_noise = context_noise
        # the model's own frames, when trained with --obj-rollout-aug: noised and labelled with this
        # level, so it can tell them from the real frames it starts from (0: as any appended frame)
        self.generated_noise = generated_noise

    @property
    def frame_index(self) -> int:
        return self.context.num_frames

    @property
    def precision(self) -> str:
        """What this session's transformer runs (the Dream env's info, play's benchmark line): the
        world's precision, except that bf16-kv's only bf16 is its KV cache, so a context that stores
        none (mode none) runs fp32, the fp32 world's frames bit for bit."""
        if self.world.precision == "bf16-kv" and (isinstance(self.context, UncachedContext)
                                                  or self.context.kv_dtype != torch.bfloat16):
            return "fp32"
        return self.world.precision

    def __repr__(self) -> str:
        return (f"Session(frame_index={self.frame_index}, context={type(self.context).__name__}, "
                f"steps={self.sampler.steps}, cfg={self.sampler.cfg_scale:g})")

    def _action(self, action: int) -> int:
        try:  # ints of any kind, a 0-d integer tensor or array (a torch policy's argmax) included, as Dream-v0
            if isinstance(action, bool):
                raise TypeError
            a = operator.index(action)
        except TypeError:
            if isinstance(action, bool) or not isinstance(action, (float, np.floating)) or \
                    not math.isfinite(float(action)) or float(action) != int(action):  # 1.9 was played as 1
                raise ValueError(f"action must be a whole number, got {action!r} (an index into action_names)") from None
            a = int(action)
        if not 0 <= a < len(self.world.action_names):
            raise ValueError(f"action {a} out of range for {self.world.action_names}")
        return a

    @torch.inference_mode()
    def extend_latents(self, latents: torch.Tensor, actions: torch.Tensor, level: float | None = None) -> None:
        """Append K clean latents (K,C,h,w) with their actions (K,), noise-augmented to `level`
        (default: the session's context_noise)."""
        cfg = self.world.far.config
        want = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != want or tuple(actions.shape) != (latents.shape[0],):
            # checked before anything is appended: a wrong one broke the session for good
            raise ValueError(f"latents must be [K, {', '.join(map(str, want))}] with K actions, got latents "
                             f"{tuple(latents.shape)} and actions {tuple(actions.shape)}")
        dev = self.world.device
        level = self.context_noise if level is None else level
        latents = latents.to(dev).float()[None]  # (1, K, C, h, w)
        aug = torch.zeros(latents.shape[:2], device=dev)
        if level > 0:
            noise = torch.randn(latents.shape, generator=self.generator, device=dev)
            latents = (1 - level) * latents + level * noise
            aug.fill_(level)
        with autocast_for(self.world.far):
            self.context.extend(latents, actions.to(dev).long()[None], aug)

    def append_latent(self, latent: torch.Tensor, action: int) -> None:
        self.extend_latents(latent[None], torch.tensor([self._action(action)]))

    def _append_generated(self, latent: torch.Tensor, action: int) -> None:
        level = self.generated_noise if self.generated_noise > 0 else None
        self.extend_latents(latent[None], torch.tensor([self._action(action)]), level)

    @torch.inference_mode()
    def predict_latent(self, action: int) -> torch.Tensor:
        a = self._action(action)
        dev, cfg = self.world.device, self.world.far.config
        shape = (1, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        noise = torch.randn(shape, generator=self.generator, device=dev)
        with autocast_for(self.world.far):
            z = self.sampler.sample(
                self.context.velocity, noise, torch.tensor([a], device=dev), self.world.far.null_action
            )
        return z[0].float()

    def step_latent(self, action: int) -> torch.Tensor:
        z = self.predict_latent(action)
        self._append_generated(z, action)
        return z

    def predict(self, action: int) -> np.ndarray:
        return self.world.decode(self.predict_latent(action)[None])[0]

    def append(self, frame: np.ndarray, action: int) -> None:
        frame = np.asarray(frame)
        if frame.shape != (*self.world.resolution, 3):  # one frame: a batch, or another size, broke the session
            raise ValueError(f"frame must be [{self.world.resolution[0]}, {self.world.resolution[1]}, 3], got {frame.shape}")
        self.append_latent(self.world.encode(frame[None])[0], action)

    def step(self, action: int) -> np.ndarray:
        z = self.predict_latent(action)
        self._append_generated(z, action)  # the generated latent itself, not a decode/encode round trip
        decoder = decode_alongside(self.world.device)
        decoded = None
        if decoder is not None:
            try:
                decoded = decoder.submit(self.world.decode, z[None])
            except RuntimeError:  # the interpreter is shutting down: it stopped its thread pools before
                pass  # waiting for this thread (a game loop still playing after the main thread ended)
        if decoded is None:  # the cache takes the frame in the next frame's first pass (fused, one pass fewer)
            return self.world.decode(z[None])[0]
        try:
            self.context.flush()  # the frame into the cache now, while another core decodes it
        finally:
            frame = decoded.result()[0]  # (a flush error is raised once the decoder is done)
        return frame

    def stats(self) -> dict:
        return {**self.context.stats(), "frame_index": self.frame_index}

    def fork(self) -> "Session":
        """An independent copy (same history, cache and random state), e.g. to try actions."""
        twin = copy.copy(self)
        twin.context = self.context.fork()  # copies the cache buffers, which are written in place
        twin.generator = torch.Generator(device=self.world.device)
        twin.generator.set_state(self.generator.get_state())
        return twin
