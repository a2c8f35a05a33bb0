"""Generation contexts: what the model remembers of the frames so far (the world's memory).

API
    CACHE_MODES = ("none", "kv", "multilevel", "sliding")
    make_context(far, mode) -> GenerationContext
    GenerationContext                 # common interface of every mode
      .extend(latents [B,K,C,h,w], actions [B,K], aug=None [B,K])  # append K clean frames
      .velocity(x_t [B',C,h,w], t [B'], action [B']) -> [B',C,h,w] # next frame; B' = B or 2B (CFG)
      .num_frames: int;  .stats() -> dict(l1_frames, l1_tokens, l2_frames, l2_tokens, cache_bytes)
    UncachedContext(far, layout="long-short" | "all-fine" | "window")   # recompute every call
    KVCacheContext(far)                                                 # plain KV cache, all fine
    MultiLevelCacheContext(far, use_l2=True)                            # L1 fine + L2 coarse

Modes
    none        recompute the long-short sequence (coarse old frames, fine last W) at every
                denoising step: the reference the multi-level cache must equal.
    kv          plain KV cache: every frame's fine keys/values, computed once when appended
                (the paper's baseline; frames older than W are presented fine, as in an all-fine
                sequence, so it equals UncachedContext(layout="all-fine"), not `none`).
    multilevel  L1 = fine keys/values of the frames in the short window, L2 = coarse keys/values
                of every frame that left it. A frame leaving the window is encoded into L2 once
                (its coarse tokens attend to L2 only, exactly as coarse tokens do in training).
    sliding     L1 only (no long-term memory): the sliding-window baseline for evaluation.

Exactness. In the long-short layout a fine frame attends to the coarse tokens of every frame
before the window; when the window slides, that set changes, so L1's keys/values (which depend
on what their frames attended to in earlier layers) change too. To equal `none` exactly, L1 is
recomputed once per generated frame when a frame leaves the window: one forward over the W-1
context frames against L2 - done once per frame, not per denoising step, and amortised over
the steps x (CFG) queries of the new frame. Before the window fills, frames are simply appended.
"""
from __future__ import annotations

from typing import Literal

import torch

from worldsim.model import FAR, KV, concat_kv

CACHE_MODES = ("none", "kv", "multilevel", "sliding")


def _kv_bytes(kv: KV | None) -> int:
    if kv is None:
        return 0
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def _expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x if x.shape[0] == batch else x.expand(batch, *x.shape[1:])


class GenerationContext:
    """History of clean frames (latents, actions, augmentation levels) + mode-specific cache."""

    def __init__(self, far: FAR):
        self.far = far
        self.latents: list[torch.Tensor] = []  # each (B, C, h, w)
        self.actions: list[torch.Tensor] = []  # each (B,)
        self.aug: list[torch.Tensor] = []  # each (B,)

    @property
    def num_frames(self) -> int:
        return len(self.latents)

    @property
    def window(self) -> int:
        return self.far.config.window

    def extend(self, latents: torch.Tensor, actions: torch.Tensor, aug: torch.Tensor | None = None) -> None:
        """Append K clean context frames: latents (B,K,C,h,w), actions (B,K), aug (B,K)."""
        if aug is None:
            aug = torch.zeros(latents.shape[:2], device=latents.device)
        for i in range(latents.shape[1]):
            self.latents.append(latents[:, i])
            self.actions.append(actions[:, i])
            self.aug.append(aug[:, i].float())
        self._sync()

    def _history(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frames lo..hi-1 stacked: (B,F,C,h,w), (B,F), (B,F)."""
        return (
            torch.stack(self.latents[lo:hi], dim=1),
            torch.stack(self.actions[lo:hi], dim=1),
            torch.stack(self.aug[lo:hi], dim=1),
        )

    def _sync(self) -> None:  # bring the cache up to date with the history
        pass

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stats(self) -> dict:
        raise NotImplementedError


class UncachedContext(GenerationContext):
    """Recompute the whole sequence at every call (mode `none`, and the references in tests)."""

    def __init__(self, far: FAR, layout: Literal["long-short", "all-fine", "window"] = "long-short"):
        super().__init__(far)
        if layout not in ("long-short", "all-fine", "window"):
            raise ValueError(f"unknown layout {layout!r}")
        self.layout = layout

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        n, B = self.num_frames, x_t.shape[0]
        W = self.window
        lo = max(0, n + 1 - W) if self.layout == "window" else 0  # sliding window: drop older frames
        window = n + 1 - lo if self.layout == "all-fine" else W
        if n > lo:
            lat, act, aug = self._history(lo, n)
            lat = torch.cat([_expand_batch(lat, B), x_t[:, None]], dim=1)  # (B', F+1, C, h, w)
            act = torch.cat([_expand_batch(act, B), action[:, None]], dim=1)
            aug = torch.cat([_expand_batch(aug, B), torch.zeros_like(t)[:, None]], dim=1)
            tt = torch.cat([torch.full(lat.shape[:1] + (n - lo,), self.far.config.clean_t, device=t.device), t[:, None]], dim=1)
        else:
            lat, act, aug, tt = x_t[:, None], action[:, None], torch.zeros_like(t)[:, None], t[:, None]
        return self.far(lat, tt, act, aug, window=window, time_offset=lo)[:, -1]

    def stats(self) -> dict:
        return dict(l1_frames=0, l1_tokens=0, l2_frames=0, l2_tokens=0, cache_bytes=0)


class KVCacheContext(GenerationContext):
    """Plain KV cache: fine keys/values of every frame, computed once."""

    def __init__(self, far: FAR):
        super().__init__(far)
        self.kv: KV | None = None
        self.cached_frames = 0

    def _sync(self) -> None:
        n = self.num_frames
        if n > self.cached_frames:
            lat, act, aug = self._history(self.cached_frames, n)
            new = self.far.frame_kv(lat, act, self.cached_frames, self.kv, coarse=False, aug=aug)
            self.kv = concat_kv(self.kv, new)
            self.cached_frames = n

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.far.predict_frame(x_t, t, action, self.num_frames, self.kv)

    def stats(self) -> dict:
        n = self.cached_frames
        return dict(
            l1_frames=n, l1_tokens=n * self.far.config.tokens_per_frame, l2_frames=0, l2_tokens=0,
            cache_bytes=_kv_bytes(self.kv),
        )


class MultiLevelCacheContext(GenerationContext):
    """L1: fine KV of frames [l2_frames, n); L2: coarse KV of frames [0, l2_frames) (if use_l2)."""

    def __init__(self, far: FAR, use_l2: bool = True):
        super().__init__(far)
        self.use_l2 = use_l2
        self.l1: KV | None = None
        self.l2: KV | None = None
        self.l1_start = 0  # first frame in the window (frames before it are in L2 or dropped)
        self.l1_end = 0  # frames [l1_start, l1_end) are in L1
        self.l2_frames = 0  # frames [0, l2_frames) are in L2
        self._past: KV | None = None  # L2 + L1, what the next frame attends to

    def _sync(self) -> None:
        n = self.num_frames
        # when predicting frame n the window is frames n-W+1..n, so context frames < n-W+1 are old
        start = max(0, n + 1 - self.window)
        if start > self.l1_start:
            if self.use_l2 and start > self.l2_frames:  # frames leaving the window -> L2, once
                lat, act, aug = self._history(self.l2_frames, start)
                new = self.far.frame_kv(lat, act, self.l2_frames, self.l2, coarse=True, aug=aug)
                self.l2 = concat_kv(self.l2, new)
                self.l2_frames = start
            # the remaining window frames attended to a frame that is now coarse: recompute L1
            self.l1, self.l1_start, self.l1_end = None, start, start
        if n > self.l1_end:
            lat, act, aug = self._history(self.l1_end, n)
            new = self.far.frame_kv(lat, act, self.l1_end, concat_kv(self.l2, self.l1), coarse=False, aug=aug)
            self.l1 = concat_kv(self.l1, new)
            self.l1_end = n
        self._past = concat_kv(self.l2, self.l1)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.far.predict_frame(x_t, t, action, self.num_frames, self._past)

    def stats(self) -> dict:
        cfg = self.far.config
        l1_frames = self.l1_end - self.l1_start
        return dict(
            l1_frames=l1_frames, l1_tokens=l1_frames * cfg.tokens_per_frame,
            l2_frames=self.l2_frames, l2_tokens=self.l2_frames * cfg.context_tokens_per_frame,
            cache_bytes=_kv_bytes(self.l1) + _kv_bytes(self.l2),
        )


def make_context(far: FAR, mode: str) -> GenerationContext:
    if mode == "none":
        return UncachedContext(far, layout="long-short")
    if mode == "kv":
        return KVCacheContext(far)
    if mode == "multilevel":
        return MultiLevelCacheContext(far, use_l2=True)
    if mode == "sliding":
        return MultiLevelCacheContext(far, use_l2=False)
    raise ValueError(f"unknown cache mode {mode!r}; choose one of {CACHE_MODES}")
