"""Generation contexts: what the model remembers of the frames so far (the world's memory).

API
    CACHE_MODES = ("none", "kv", "multilevel", "sliding", "multilevel-fast")
    make_context(far, mode, memory_frames=None, kv_dtype=None) -> GenerationContext  # memory_frames: bound L2
                                      # (multi-level modes); kv_dtype: the cache's storage (bf16-kv: bfloat16)
    GenerationContext                 # common interface of every mode
      .extend(latents [B,K,C,h,w], actions [B,K], aug=None [B,K])  # append K clean frames
      .velocity(x_t [B',C,h,w], t [B'], action [B']) -> [B',C,h,w] # next frame; B' = B or 2B (CFG)
      .num_frames: int;  .stats() -> dict(l1_frames, l1_tokens, l2_frames, l2_tokens, cache_bytes,
                                          cache_capacity_bytes)
      .fork() -> an independent copy (history lists and cache buffers copied)
      .flush()    encode appended frames now (multi-level modes encode them with the next query)
    UncachedContext(far, layout="long-short" | "all-fine" | "window")   # recompute every call
    KVCacheContext(far)                                                 # plain KV cache, all fine
    MultiLevelCacheContext(far, use_l2=True, refresh_l1=True, max_l2_frames=None)  # L1 fine + L2 coarse

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
    multilevel-fast  NOT exact: like multilevel, but L1 keys/values are computed once, when their
                frame is appended (against the L2 + L1 of that moment), and kept when the window
                slides (no per-frame L1 re-encoding): a plain KV cache over the window plus L2.
                About 2/3 of the CPU time per frame at 4 steps (no per-frame re-encoding of the
                W-1 window frames); its frames differ from `none` (window frames keep what they
                saw, finely, of frames that are coarse now). Not what training sees, but it scores
                the same on the test mazes (model card), so it is play's default; eval, the Dream
                env and the tests of exactness use `multilevel`.

Exactness. In the long-short layout a fine frame attends to the coarse tokens of every frame
before the window; when the window slides, that set changes, so L1's keys/values (which depend
on what their frames attended to in earlier layers) change too. To equal `none` exactly, L1 is
recomputed once per generated frame when a frame leaves the window: one forward over the W-1
context frames against L2 - done once per frame, not per denoising step, and amortised over
the steps x (CFG) queries of the new frame. Before the window fills, frames are simply appended.

Bounded memory. L2 grows by 4 tokens per frame without end, and the time per generated frame with it
(scripts/time_long_play.py, the shipped checkpoint, multilevel-fast in bf16 on a 2-core CPU: 33 ms a
frame with 500 frames behind it, 61 with 2,000, 105 with 4,000; bounded to 2,000 frames, 63 at 4,000
and 62 at 8,000). `max_l2_frames` (make_context's `memory_frames`; play's --memory-frames) keeps
only the most recent frames: before frames enter L2 beyond the bound, the oldest are forgotten down
to the bound less a chunk (L2_FORGET_CHUNK frames, at most a quarter of the bound; one move of the
cache each). What is kept keeps its keys and values as computed (with the memory of their time) and
its positions; what enters L2 after, the window encoded against it and every query see only the
bounded L2 (frames beyond the bound enter it a forgetting chunk at a time, even a long context
appended at once). Without a bound (the default, as in eval and the tests of exactness) nothing
changes.

Memory span (FARConfig.memory_span, model.py). The multi-level modes tell every pass which frames
L2 holds (FAR's `memory`), and a pass sees them at the spread positions its newest frame gives
them. A long context then enters L2 in passes of at most span - W - 1 frames, so that within a
pass no memory needs spreading further than the span allows, and a generated frame is not fused
with the frames entering L2 (below): every denoising step of a frame sees the same memory, at the
positions the frame gives it. Without a span nothing changes.

Storage. Each cached mode keeps one growable KVBuffer per layer (model.py), laid out [L2 | L1] for
multilevel: a frame leaving the window appends its 4 coarse tokens to L2 (without a bound memory
grows by exactly those bytes per frame, amortised: capacity grows by half when full), the stale L1
part is truncated and recomputed in place. A denoising step writes the new frame's keys and values
into the buffer's spare tail and attends to [L2 | L1 | new] without copying the cache (the CFG
halves share it). History: only the latents the cache may still need are kept (multilevel/sliding
drop frames older than the window). Long contexts are prefilled in chunks (`prefill_frames_coarse` /
`prefill_frames_fine` frames; exact: frame-causal attention does not depend on the chunking), which
bounds the attention mask and skips most of the masked-out upper triangle of one big causal pass.
When the window slides by a frame, the frame entering L2 and the re-encoded window run as one pass
(FAR.frames_kv): one read of the weights and of L2. Without CFG, the multi-level modes go one step
further: an appended frame is only recorded, and its encoding (with the window re-encoding in
`multilevel`) runs in the same forward pass as the next frame's first denoising step
(FAR.frames_kv_and_velocity; the clean frames never attend to the noisy one, so the results are the
same; in multilevel-fast the frame entering L2 joins the pass too, masked off the window's cached
keys so it sees L2 alone). On a 2-core CPU each pass costs about as much to read the weights and the
cache as to compute, so a generated frame then costs its sampling steps' passes alone. Where a second
core is free, Session.step instead flushes the generated frame into the cache while that core decodes
it (world.decode_alongside): the same pass less the query (in multilevel-fast still one pass, the
frame entering L2 masked as above), off the next frame's path.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch

from worldsim.model import FAR, KV, KVBuffer, autocast_for

CACHE_MODES = ("none", "kv", "multilevel", "sliding", "multilevel-fast")
L2_FORGET_CHUNK = 64  # frames forgotten at once when L2 is bounded (max_l2_frames)


def _kv_bytes(kv: list[KVBuffer] | None, capacity: bool = False) -> int:
    if kv is None:
        return 0
    return sum(layer.nbytes(capacity) for layer in kv)


def _expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The history (B, ...) for a query batch B' = B or 2B (CFG: conditional then null halves)."""
    return x if x.shape[0] == batch else x.repeat(batch // x.shape[0], *[1] * (x.dim() - 1))


class GenerationContext:
    """History of clean frames (latents, actions, augmentation levels) + mode-specific cache."""

    prefill_frames_fine = 64  # frames per chunk when many frames are appended at once (fine tokens)
    prefill_frames_coarse = 256  # (coarse tokens: 4 per frame)
    # the cache's storage dtype (None: the transformer's); bf16 for an fp32 transformer makes the
    # attention over the cache run in bf16 (WorldModel precision "bf16-kv", KVBuffer.attend)
    kv_dtype: torch.dtype | None = None

    def __init__(self, far: FAR):
        self.far = far
        self.latents: list[torch.Tensor | None] = []  # each (B, C, h, w); None once no longer needed
        self.actions: list[torch.Tensor | None] = []  # each (B,)
        self.aug: list[torch.Tensor | None] = []  # each (B,)

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

    def _forget(self, before: int) -> None:
        """Drop the history of frames < before (the cache will never need them again)."""
        for lst in (self.latents, self.actions, self.aug):
            for i in range(before - 1, -1, -1):
                if lst[i] is None:
                    break
                lst[i] = None

    def _append(self, buffers: list[KVBuffer] | None, new: KV) -> list[KVBuffer]:
        """Append new (k, v) per layer; a new cache is stored in kv_dtype (None: the keys' own)."""
        if buffers is None:
            buffers = [KVBuffer() for _ in new]
        for buf, (k, v) in zip(buffers, new):
            if self.kv_dtype is not None and buf.k is None:
                k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
            buf.append(k, v)  # into a stored cache's dtype
        return buffers

    def _encode(self, buffers: list[KVBuffer] | None, lo: int, hi: int, coarse: bool) -> list[KVBuffer]:
        """Append the keys/values of clean frames lo..hi-1 to the cache `buffers`, in chunks."""
        chunk = self.prefill_frames_coarse if coarse else self.prefill_frames_fine
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            lat, act, aug = self._history(a, b)
            memory = self._memory(a if coarse else None)
            buffers = self._append(buffers, self.far.frame_kv(lat, act, a, buffers, coarse=coarse, aug=aug,
                                                              memory=memory))
        return buffers

    def _memory(self, end: int | None = None) -> tuple[int, int] | None:
        """(first frame, frames) of the long-term memory the cache begins with (FAR.forward_frames'
        `memory`), while frames before `end` (default: every frame) are in it; None: no memory."""
        return None

    def _sync(self) -> None:  # called by extend: bring the cache up to date with the history
        pass

    def flush(self) -> None:
        """Bring the cache up to date now (a mode may defer appended frames to the next query)."""
        self._sync()

    def fork(self) -> "GenerationContext":
        """An independent copy: same history and cache, nothing shared that is written in place."""
        twin = copy.copy(self)
        for name in ("latents", "actions", "aug"):
            setattr(twin, name, list(getattr(self, name)))
        for name, value in vars(self).items():
            if isinstance(value, list) and value and isinstance(value[0], KVBuffer):
                setattr(twin, name, [b.clone() for b in value])
        return twin

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
            act = torch.cat([_expand_batch(act, B), action[:, None]], dim=1)  # (B', F+1)
            aug = torch.cat([_expand_batch(aug, B), torch.zeros_like(t)[:, None]], dim=1)  # (B', F+1)
            tt = torch.cat([torch.full(lat.shape[:1] + (n - lo,), self.far.config.clean_t, device=t.device), t[:, None]],
                           dim=1)  # (B', F+1): the context clean, the new frame at t
        else:
            lat, act, aug, tt = x_t[:, None], action[:, None], torch.zeros_like(t)[:, None], t[:, None]  # F+1 = 1
        return self.far(lat, tt, act, aug, window=window, time_offset=lo)[:, -1]

    def stats(self) -> dict:
        return dict(l1_frames=0, l1_tokens=0, l2_frames=0, l2_tokens=0, cache_bytes=0, cache_capacity_bytes=0)


class KVCacheContext(GenerationContext):
    """Plain KV cache: fine keys/values of every frame, computed once."""

    def __init__(self, far: FAR):
        super().__init__(far)
        self.kv: list[KVBuffer] | None = None  # per layer
        self.cached_frames = 0

    def _sync(self) -> None:
        n = self.num_frames
        if n > self.cached_frames:
            self.kv = self._encode(self.kv, self.cached_frames, n, coarse=False)
            self.cached_frames = n
            self._forget(n)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.far.predict_frame(x_t, t, action, self.num_frames, self.kv)

    def stats(self) -> dict:
        n = self.cached_frames
        return dict(
            l1_frames=n, l1_tokens=n * self.far.config.tokens_per_frame, l2_frames=0, l2_tokens=0,
            cache_bytes=_kv_bytes(self.kv), cache_capacity_bytes=_kv_bytes(self.kv, capacity=True),
        )


class MultiLevelCacheContext(GenerationContext):
    """L1: fine KV of frames [l1_start, n); L2: coarse KV of frames [l2_first, l2_frames) (if use_l2;
    l2_first > 0 once a bounded memory, max_l2_frames, forgot the oldest).

    One KVBuffer per layer holds [L2 tokens | L1 tokens]. Appended frames are encoded lazily: the
    next velocity query encodes them in the same forward pass as its own frame (FAR.
    frames_kv_and_velocity: one or two reads of the weights and the cache fewer per generated
    frame); stats() counts them already, flush() encodes them now."""

    def __init__(self, far: FAR, use_l2: bool = True, refresh_l1: bool = True, max_l2_frames: int | None = None):
        super().__init__(far)
        if max_l2_frames is not None and max_l2_frames < 1:
            raise ValueError(f"max_l2_frames must be >= 1 or None (no limit), got {max_l2_frames}")
        self.use_l2 = use_l2
        self.refresh_l1 = refresh_l1  # False: multilevel-fast (inexact, see the module docstring)
        self.max_l2_frames = max_l2_frames
        self.kv: list[KVBuffer] | None = None  # per layer: L2 then L1
        self.l1_start = 0  # first frame in the window (frames before it are in L2 or dropped)
        self.l1_end = 0  # frames [l1_start, l1_end) are in L1
        self.l2_frames = 0  # frames [l2_first, l2_frames) are in L2
        self.l2_first = 0  # frames before it were forgotten (max_l2_frames)
        if self._spreads_memory:
            # a pass that adds k frames to L2 has its newest frame up to k + W - 1 frames after the
            # newest memory frame; below the span the memory stays in order (memory_time_positions)
            self.prefill_frames_coarse = max(1, min(self.prefill_frames_coarse, far.config.memory_span - self.window - 1))

    @property
    def _spreads_memory(self) -> bool:
        return self.use_l2 and self.far.config.memory_span > 0

    def _memory(self, end: int | None = None) -> tuple[int, int] | None:
        count = (self.l2_frames if end is None else end) - self.l2_first
        return (self.l2_first, count) if self.use_l2 and count > 0 else None

    @property
    def _l2_tokens(self) -> int:
        return (self.l2_frames - self.l2_first) * self.far.config.context_tokens_per_frame

    def _make_room(self, incoming: int) -> None:
        """With max_l2_frames: before `incoming` frames enter L2, forget the oldest so that L2 then
        holds at most max_l2_frames, down to that less a chunk (L2_FORGET_CHUNK, at most a quarter
        of the bound): each forgetting moves the whole cache once, so it happens once per chunk of
        frames, not at every frame. Called while the buffers hold L2 alone (L1 truncated), so what
        enters L2, the window re-encoded after it and the query all see the bounded L2."""
        if self.max_l2_frames is None or self.kv is None:
            return
        drop = self._to_forget(self.l2_frames - self.l2_first, incoming)
        if drop:
            for buf in self.kv:
                buf.drop_front(drop * self.far.config.context_tokens_per_frame)
            self.l2_first += drop

    def _to_forget(self, held: int, incoming: int) -> int:
        """Frames _make_room forgets of `held` before `incoming` enter (a bound is set)."""
        excess = held + incoming - self.max_l2_frames
        return min(held, excess + min(L2_FORGET_CHUNK, self.max_l2_frames // 4)) if excess > 0 else 0

    def _l2_chunk(self, incoming: int, held: int | None = None) -> int:
        """Of `incoming` frames about to enter L2 (holding `held`), how many enter in the next pass:
        all of them (in prefill chunks) where they fit the bound, as without one; else a bounded
        memory's forgetting chunk, so that making room never forgets nearly all of L2 at once."""
        held = self.l2_frames - self.l2_first if held is None else held
        if self.max_l2_frames is None or held + incoming <= self.max_l2_frames:
            return incoming
        return max(1, min(incoming, self.prefill_frames_coarse, L2_FORGET_CHUNK, self.max_l2_frames // 4))

    def _encode_l2(self, start: int) -> None:
        """Frames [l2_frames, start) into L2 (the buffers hold L2 alone); beyond a bound, in chunks
        (_l2_chunk) that each see at most max_l2_frames of L2, with room made before each."""
        while self.l2_frames < start:
            chunk = self._l2_chunk(start - self.l2_frames)
            self._make_room(chunk)
            self.kv = self._encode(self.kv, self.l2_frames, self.l2_frames + chunk, coarse=True)
            self.l2_frames += chunk

    def _sync(self) -> None:
        pass  # deferred to the next velocity() (or flush / stats)

    def flush(self) -> None:
        # as Session builds caches: in inference mode (whose tensors only it may update in place;
        # a cache built under no_grad, as the trainer's rollouts do, stays outside) and autocast
        inference = self.kv is None or self.kv[0].k is None or self.kv[0].k.is_inference()
        with torch.inference_mode(inference), autocast_for(self.far):
            self._catch_up()

    def _catch_up(self, query: tuple | None = None) -> torch.Tensor | None:
        """Bring the cache up to date with the history; with query = (x_t, t, action) of the next
        frame also return its velocity, computed in the same pass as the usual step's encoding
        where possible (else after it)."""
        n = self.num_frames
        # when predicting frame n the window is frames n-W+1..n, so context frames < n-W+1 are old
        start = max(0, n + 1 - self.window)
        # fused with the query: only over an existing cache (long contexts are prefilled in
        # chunks first) and without a CFG-doubled query batch
        # (with a one-frame window the last context frame's latent is already dropped: not fusable)
        # Not under a memory span: a pass spreads the memory from its newest frame, and the fused pass
        # (the new frame with the frames entering L2) would show the first denoising step another
        # memory than the steps after it
        fusable = (query is not None and self.kv is not None and n > 0 and self.latents[n - 1] is not None
                   and query[0].shape[0] == self.latents[n - 1].shape[0] and not self._spreads_memory)
        # frames that may enter L2 in the usual one pass (a bounded memory makes room for them first)
        incoming = start - self.l2_frames
        one_pass = incoming if incoming <= self.prefill_frames_coarse and self._l2_chunk(incoming) == incoming else 0
        if start > self.l1_start and not self.refresh_l1:
            # (without a query, as flush() after each generated frame: the same one pass, less the query)
            if ((fusable or (query is None and self.kv is not None and not self._spreads_memory)) and self.use_l2
                    and 0 < start - self.l2_frames <= one_pass and start <= self.l1_end < n
                    and n - self.l1_end <= self.prefill_frames_fine):
                return self._slide_keeping_l1_with_query(start, query)
            self._slide_keeping_l1(start)
        if start > self.l1_start:
            if self.kv is not None:  # L1 attended to a frame that is now coarse: recompute it
                for buf in self.kv:
                    buf.truncate(self._l2_tokens)
            if self.use_l2 and start > self.l2_frames:  # frames leaving the window -> L2, once
                if self.kv is not None and start - self.l2_frames <= one_pass and 0 < n - start < self.window:
                    # the usual step: the frame(s) entering L2 and the window re-encoded, one pass
                    # (with the query's frame, where it can share it)
                    self._make_room(start - self.l2_frames)
                    parts = [(*self._history(self.l2_frames, start), self.l2_frames, True),
                             (*self._history(start, n), start, False)]
                    v = None
                    if fusable:
                        v, (new2, new1) = self.far.frames_kv_and_velocity(parts, *query, n, self.kv,
                                                                          memory=self._memory())
                    else:
                        new2, new1 = self.far.frames_kv(parts, self.kv, memory=self._memory())
                    self.kv = self._append(self._append(self.kv, new2), new1)
                    self.l2_frames, self.l1_start, self.l1_end = start, start, n
                    self._forget(start)
                    return v if v is not None else self._velocity_now(query)
                self._encode_l2(start)
            self.l1_start = self.l1_end = start
            self._forget(start)
        if n > self.l1_end:
            if fusable and n - self.l1_end <= self.prefill_frames_fine:
                # new frames appended to L1 as they are (multilevel-fast; the sliding window's
                # re-encoding; any mode before the window slides), with the query
                v, (new1,) = self.far.frames_kv_and_velocity(
                    [(*self._history(self.l1_end, n), self.l1_end, False)], *query, n, self.kv, memory=self._memory())
                self.kv = self._append(self.kv, new1)
                self.l1_end = n
                return v
            self.kv = self._encode(self.kv, self.l1_end, n, coarse=False)
            self.l1_end = n
        return self._velocity_now(query)

    def _velocity_now(self, query: tuple | None) -> torch.Tensor | None:
        return None if query is None else self.far.predict_frame(*query, self.num_frames, self.kv, memory=self._memory())

    def _slide_keeping_l1(self, start: int) -> None:
        """multilevel-fast: frames < start leave L1 (into L2), the rest of L1 is kept as it is."""
        keep = max(0, self.l1_end - start)  # window frames already in L1
        kept = []
        if self.kv is not None:
            kept = self._kept_l1(start)
            for buf in self.kv:
                buf.truncate(self._l2_tokens)
        if self.use_l2 and start > self.l2_frames:
            self._encode_l2(start)
        if self.kv is not None and keep:
            self.kv = self._append(self.kv, kept)
        self.l1_start, self.l1_end = start, max(start, self.l1_end)
        self._forget(start)

    def _kept_l1(self, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of L1's keys/values of the window frames >= start (the end of each buffer)."""
        keep = max(0, self.l1_end - start) * self.far.config.tokens_per_frame
        return [(b.k[:, :, b.length - keep : b.length].clone(), b.v[:, :, b.length - keep : b.length].clone())
                for b in self.kv]

    def _slide_keeping_l1_with_query(self, start: int, query: tuple | None) -> torch.Tensor | None:
        """multilevel-fast's usual step as one pass: the frame(s) entering L2 (seeing L2 alone, as
        in _slide_keeping_l1), the new frame(s) appended to L1 and the query, if any (seeing L2,
        them and the kept L1). The same results as _slide_keeping_l1, then _catch_up's L1 append."""
        n = self.num_frames
        kept = self._kept_l1(start)
        for buf in self.kv:  # [L2 | kept L1]: the frames leaving the window are no longer seen
            buf.truncate(self._l2_tokens)
        self._make_room(start - self.l2_frames)
        self.kv = self._append(self.kv, kept)
        parts = [(*self._history(self.l2_frames, start), self.l2_frames, True),
                 (*self._history(self.l1_end, n), self.l1_end, False)]
        if query is None:
            v, (new2, new1) = None, self.far.frames_kv(parts, self.kv, cache_visible=[self._l2_tokens, None],
                                                       memory=self._memory())
        else:
            v, (new2, new1) = self.far.frames_kv_and_velocity(parts, *query, n, self.kv,
                                                              cache_visible=[self._l2_tokens, None], memory=self._memory())
        for buf in self.kv:  # -> [L2 + new coarse | kept L1 | new L1]
            buf.truncate(self._l2_tokens)
        self.kv = self._append(self._append(self._append(self.kv, new2), kept), new1)
        self.l2_frames, self.l1_start, self.l1_end = start, start, n
        self._forget(start)
        return v

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self._catch_up((x_t, t, action))

    def _l2_pending(self) -> int:
        """Frames L2 holds once the appended frames are encoded (what _encode_l2 and _make_room
        leave of it with a bound: the same chunks, the same arithmetic)."""
        if not self.use_l2:
            return 0
        held = self.l2_frames - self.l2_first
        incoming = max(0, max(0, self.num_frames + 1 - self.window) - self.l2_frames)
        if self.max_l2_frames is None:
            return held + incoming
        while incoming:
            chunk = self._l2_chunk(incoming, held)
            held += chunk - self._to_forget(held, chunk)
            incoming -= chunk
        return held

    def stats(self) -> dict:
        """What the cache holds once the appended frames are encoded (they may still be pending)."""
        cfg = self.far.config
        if self.kv is None and self.num_frames:
            self.flush()  # the first frames: nothing cached yet to size a token by
        n = self.num_frames
        start = max(0, n + 1 - self.window)
        l1_frames = n - start
        l2_frames = self._l2_pending()
        tokens = l1_frames * cfg.tokens_per_frame + l2_frames * cfg.context_tokens_per_frame
        per_token = 0 if self.kv is None else sum(2 * b.k[:, :, :1].numel() * b.k.element_size() for b in self.kv)
        return dict(
            l1_frames=l1_frames, l1_tokens=l1_frames * cfg.tokens_per_frame,
            l2_frames=l2_frames, l2_tokens=l2_frames * cfg.context_tokens_per_frame,
            cache_bytes=tokens * per_token,
            cache_capacity_bytes=max(tokens * per_token, _kv_bytes(self.kv, capacity=True)),
        )


def make_context(far: FAR, mode: str, memory_frames: int | None = None,
                 kv_dtype: torch.dtype | None = None) -> GenerationContext:
    """The context of cache `mode`; memory_frames bounds the L2 of the multi-level modes (the other
    modes have no L2 and ignore it); kv_dtype stores the cache in that dtype (mode none has none)."""
    if mode == "none":
        context = UncachedContext(far, layout="long-short")
    elif mode == "kv":
        context = KVCacheContext(far)
    elif mode == "multilevel":
        context = MultiLevelCacheContext(far, use_l2=True, max_l2_frames=memory_frames)
    elif mode == "sliding":
        context = MultiLevelCacheContext(far, use_l2=False)
    elif mode == "multilevel-fast":
        context = MultiLevelCacheContext(far, use_l2=True, refresh_l1=False, max_l2_frames=memory_frames)
    else:
        raise ValueError(f"unknown cache mode {mode!r}; choose one of {CACHE_MODES}")
    context.kv_dtype = kv_dtype
    return context
