"""FAR: frame-autoregressive transformer with long-short context (Gu, Mao, Shou 2025).

API
    FARConfig(latent_channels, latent_size, patch_size, context_patch_size, depth, width, heads,
              mlp_ratio, num_actions, window, clean_t=-0.001, long_context_t=-0.002, rope_theta,
              memory_span=0)
    PRESETS: dict[str, FARConfig]                 # "tiny" (tests), "small" (CPU default), "far-b-long"
    FAR(cfg)
      .forward(latents [B,T,C,h,w], t [B,T], actions [B,T], aug=None [B,T], window=None, time_offset=0)
          -> velocity [B,Wf,C,h,w] for the last Wf = min(window, T) frames (the fine ones).
          t in [0,1] = noise level of a noisy frame; t < 0 marks a clean context frame.
          Frames older than the window are coarse (long-term context, always clean).
      .forward_frames(latents [B,F,C,h,w], t [B,F], actions [B,F], aug, start_frame, past_kv,
                      coarse=False, need_output=True) -> (velocity [B,F,C,h,w] | None, new_kv)
          runs F consecutive frames (frame-causal among themselves) against a KV cache;
          new_kv is a list per layer of (k, v), each [B, heads, F*tokens, head_dim].
      .predict_frame(x_t [B,C,h,w], t [B], action [B], frame_index, past_kv, aug=None) -> [B,C,h,w]
      .frame_kv(latents [B,F,C,h,w], actions [B,F], start_frame, past_kv, coarse=False, aug=None)
          -> new_kv of clean context frames (fine, or re-encoded coarsely for L2).
      .frames_kv([(latents, actions, aug, start_frame, coarse), ...], past_kv) -> [new_kv per part]
          several groups (coarse first) in one pass, e.g. a frame entering L2 + the window re-encoded.
      .frames_kv_and_velocity(parts, x_t, t, action, frame_index, past_kv, cache_visible=None)
          -> (velocity [B,C,h,w], [new_kv per part]): frames_kv then predict_frame as one pass.
      The cached entry points (forward_frames, predict_frame, frame_kv, frames_kv,
      frames_kv_and_velocity) take memory=(first frame, frames): the long-term memory the cache
      begins with, which memory_span moves (cache.py passes it; None leaves the cache as it is).
      They run an inference twin of the blocks (FARBlock.infer): same math as forward(), with
      per-frame adaLN modulations (memoised on the CPU) and RoPE tables, one additive mask per
      call and the cache attended in place (KVBuffer) - training (forward) is untouched.
      .null_action: int  (= num_actions, the CFG null class)
    pick_device(device=None) -> torch.device (DeviceError where it is not here);  autocast(device) -> context manager (bf16 on CUDA)
    autocast_for(module) -> the autocast its inference runs under (also bf16 on CPU when its
      weights are stored in bf16: WorldModel(precision="bf16"); a bf16 KVBuffer of fp32 weights
      attends in bf16 instead, WorldModel(precision="bf16-kv"));  cpu_has_native_bf16() -> bool
    concat_kv(a, b) -> per-layer concatenation of two KV lists along the token axis
    memory_time_positions(frames, first, last, query, span) -> the memory's RoPE time positions
    deepen_far_state_dict(state, src, dst) -> src's weights for a deeper dst (new blocks
      absent: they keep AdaLN-Zero's identity init);  deepened_block_sources(src_depth, dst_depth)
    KVBuffer: one layer's growable key/value store for cached inference (see its docstring);
      a list of them (one per block) may be passed wherever past_kv is taken. A block then writes
      its new keys/values into the buffer's spare tail and attends to the stored prefix + them,
      instead of concatenating the cache with them at every call (every denoising step).

Faithful to FAR: AdaLN-Zero DiT blocks, RMS-normed q/k, 3-axis RoPE (time, row, col),
frame-causal attention (full inside a frame), one timestep per frame with distinct values for
clean short-term context (`clean_t`) and long-term context (`long_context_t`, the paper code's
`timestep * 2`), actions embedded (plus a null class) and added to the timestep embedding. The
embedder takes t in [0, 1] times 1000, the paper code's 0..1000 scale, where its labels are -1 / -2:
-0.001 / -0.002 here, the defaults since session 26, just past the cleanest noise level. Before,
they were -1 / -2 here (-1000 / -2000 on that scale), labels far from every noise level; the shipped
weights were trained with those (their config.json stores them), and the model card's HISTORY.md,
"Session 26", compares the two from scratch. Long-short context:
the last `window` frames are fine tokens (patch_size), older frames coarse tokens
(context_patch_size) with their own input projection and, per block, their own qkv / output
projections and q/k norms; adaLN and MLP are shared. Conditioning is per frame (cheaper than
per token and what the CPU calibration found best). `aug` is an optional per-frame noise level
of noise-augmented clean context, embedded and added to the frame's conditioning.

RoPE positions: time = absolute frame index in the sequence; row/col = patch centres in latent
pixel units, so a coarse token sits at the centre of the fine tokens it summarises. Training
and cached inference compute identical positions for the same frame.

Memory span (not in the paper; memory_span > 0). A transformer trained on T-frame samples never
saw a query more than T - 1 frames from a key, and it degrades on a memory further back (the
shipped one, trained on 96- then 64-frame samples, predicts worse from 284 frames of memory than
from 64: model card, HISTORY "Session 28"/"Session 29"). With memory_span = N, a long-term memory
reaching further back than N frames from a query is presented spread evenly over the last N
(memory_time_positions: the order kept, the newest memory frame at its index); the short-term
window and the frame itself keep their indices. forward() spreads every coarse frame relative to
the sequence's last frame. The cache stores keys at their frame indices and each pass turns the
memory's keys to the positions its newest frame gives them (KVBuffer.attend's memory_turn); a
frame's coarse tokens, computed when it entered L2, keep what they saw then. So the cached modes
are not exactly `forward` under a span (they are without one), as multilevel-fast is not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k, v), each (B, H, L, Dh)


@dataclass
class FARConfig:
    latent_channels: int = field(default=16, metadata={"help": "latent channels C (from the autoencoder)"})
    latent_size: int = field(default=8, metadata={"help": "latent height = width h"})
    patch_size: int = field(default=2, metadata={"help": "latent pixels per fine token side (1 or 2)"})
    context_patch_size: int = field(default=4, metadata={"help": "latent pixels per coarse token side"})
    depth: int = field(default=6, metadata={"help": "transformer blocks"})
    width: int = field(default=256, metadata={"help": "model width D"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden = mlp_ratio * width"})
    num_actions: int = field(default=5, metadata={"help": "action vocabulary (null class added)"})
    window: int = field(default=16, metadata={"help": "short-term window W (fine frames)"})
    # the FAR code's -1 / -2 on its 0..1000 timestep scale; until session 26 the defaults were -1 / -2
    # here (-1000 / -2000 there), which the shipped weights were trained with (their config says so)
    clean_t: float = field(default=-0.001, metadata={
        "help": "timestep label of clean short-term context: a negative number, outside the noise levels t in [0, 1]"})
    long_context_t: float = field(default=-0.002, metadata={"help": "timestep label of long-term (coarse) context: a negative number"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    # an inference setting as much as a model one: no weight depends on it (see memory_time_positions)
    memory_span: int = field(default=0, metadata={"help": (
        "0: RoPE time = frame index. N > window: a long-term memory reaching further back than N frames "
        "is spread evenly over the last N (e.g. the furthest its training samples showed it: N = length - 1)")})

    def __post_init__(self) -> None:
        for name in ("latent_channels", "latent_size", "depth", "width", "heads", "num_actions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for p, name in ((self.patch_size, "patch_size"), (self.context_patch_size, "context_patch_size")):
            if p < 1 or self.latent_size % p:
                raise ValueError(f"{name}={p} must divide latent_size={self.latent_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 6 (3-axis RoPE)")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        # NaN, inf or a non-positive value here loads and plays black frames (or fails deep in torch)
        if not (math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0 and int(self.mlp_ratio * self.width) >= 1):
            raise ValueError(f"mlp_ratio must be a positive number with mlp_ratio * width >= 1 (at least one "
                             f"hidden unit), got {self.mlp_ratio}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta}")
        if self.memory_span < 0 or 0 < self.memory_span <= self.window:
            raise ValueError(f"memory_span must be 0 (frame indices) or greater than the window ({self.window}), "
                             f"got {self.memory_span}")
        for name in ("clean_t", "long_context_t"):  # t < 0 is what marks a context frame
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) < 0):
                raise ValueError(f"{name} must be a negative number (t < 0 marks context), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def context_tokens_per_frame(self) -> int:
        return (self.latent_size // self.context_patch_size) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FARConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown FAR config keys: {sorted(unknown)}")
        # a config without the context labels was written when -1 / -2 were the defaults
        return cls(**{"clean_t": -1.0, "long_context_t": -2.0, **d})


PRESETS: dict[str, FARConfig] = {
    # tests: 2 blocks, 16 tokens/frame, 4 coarse tokens/frame, window 4
    "tiny": FARConfig(latent_channels=4, depth=2, width=64, heads=2, window=4, patch_size=2),
    # what trains on 2 CPU cores (see shared/notes/cpu-training-calibration.md): 16 tokens/frame
    "small": FARConfig(latent_channels=16, depth=6, width=256, heads=4, window=16, patch_size=2),
    # the paper's FAR-B-Long: 64 tokens/frame, 4 coarse tokens/frame, 8x8x32 latents
    "far-b-long": FARConfig(latent_channels=32, depth=12, width=768, heads=12, window=16, patch_size=1),
}


# ----------------------------------------------------------------------------------------------
# embeddings


class TimestepEmbedder(nn.Module):
    """Scalar per frame -> sinusoid of 1000*t -> MLP (DiT). Negative t = clean context markers."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (1000.0 * t.float())[..., None] * freqs  # (..., half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Rope3D(nn.Module):
    """3-axis rotary embedding: head_dim split into (time, row, col) pair groups."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        spatial = 2 * (head_dim // 6)  # even dims per spatial axis
        self.dims = (head_dim - 2 * spatial, spatial, spatial)
        self.theta = theta

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (L, 3) float -> cos, sin (L, head_dim/2). Computed in float64: large frame indices."""
        angles = []
        for axis, d in enumerate(self.dims):
            freqs = self.theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)
            angles.append(pos[:, axis, None].double() * freqs)
        a = torch.cat(angles, dim=-1)
        return a.cos().float(), a.sin().float()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, H, L, Dh) rotated pairwise (x[2i], x[2i+1]) by the angles of each token."""
    cos, sin = rope
    x2 = x.float().unflatten(-1, (-1, 2))  # (B, H, L, Dh/2, 2)
    x0, x1 = x2[..., 0], x2[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)  # (B, H, L, Dh)


def rope_table_full(rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) (L, Dh/2) -> (cos repeated per pair, sin with the sign of each pair member) (L, Dh)."""
    cos, sin = rope
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_rope_full(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """apply_rope with a rope_table_full table: x*cos + swap_pairs(x)*(-sin, sin), the same
    products and sums (x0 cos - x1 sin, x1 cos + x0 sin) in fewer kernels (inference path)."""
    cos, sin = table
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (B, H, L, Dh): pairs (x1, x0)
    return (xf * cos + swapped * sin).type_as(x)


def memory_time_positions(frames: torch.Tensor, first: int, last: int, query: int, span: int) -> torch.Tensor:
    """RoPE time positions of long-term memory frames `frames` (indices in [first, last]) as the
    queries of frame `query` see them under memory_span `span`: a memory reaching further back than
    `query - span` is spread evenly over [query - span, last] (order kept, the newest frame where it
    is), so no query is further than `span` frames from a memory frame; otherwise (or span 0) the
    frame indices. Why: a transformer never saw a memory frame further away than its longest
    training samples allowed (95 frames for the shipped one), and its next-frame prediction from a
    memory reaching further degrades (model card HISTORY, "Session 29": spread over 95 frames,
    teacher forcing gains 0.9 dB, but generation loses 0.5)."""
    lo = query - span
    if span <= 0 or lo <= first or last <= first:
        return frames
    lo = min(lo, last)  # a pass longer than the span (not in the caches, see cache.py) clamps its memory
    return lo + (frames - first) * ((last - lo) / (last - first))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------
# transformer block


class AttnProjections(nn.Module):
    """qkv + q/k RMS norms + output projection of one token kind (fine or coarse)."""

    def __init__(self, width: int, head_dim: int, queries: bool = True):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)  # q part unused when queries=False (kept: one layout)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if queries else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.out = nn.Linear(width, width) if queries else None


@dataclass
class TokenGroup:
    """Tokens of F consecutive frames of one kind. x (B, F, n, D), cond (B, F, D)."""

    x: torch.Tensor
    cond: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]  # each (F*n, Dh/2)
    coarse: bool


class FARBlock(nn.Module):
    def __init__(self, cfg: FARConfig, last: bool = False):
        super().__init__()
        # In the last block coarse tokens only serve keys/values (no loss on them, as in the
        # paper's code): no coarse queries, output projection or MLP. Every parameter then gets
        # a gradient whenever a sample has long context (matters for DDP).
        self.last = last
        D = cfg.width
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))  # per-frame shift/scale/gate x2
        self.attn_fine = AttnProjections(D, cfg.head_dim)
        self.attn_coarse = AttnProjections(D, cfg.head_dim, queries=not last)  # the paper's separate context projections
        hidden = int(cfg.mlp_ratio * D)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))

    def forward(self, groups: list[TokenGroup], mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Training / uncached path: the groups' new token states. Coarse groups in the last block
        need no output and are returned unchanged. The cached path is infer()."""
        B = groups[0].x.shape[0]
        H, Dh = self.heads, self.head_dim
        wants = [not (self.last and g.coarse) for g in groups]
        qs, ks, vs, mods = [], [], [], []
        for g, want in zip(groups, wants):
            proj = self.attn_coarse if g.coarse else self.attn_fine
            mod = self.adaLN(g.cond).unsqueeze(2).chunk(6, dim=-1)  # 6 x (B, F, 1, D)
            mods.append(mod)
            h = modulate(self.norm1(g.x), mod[0], mod[1]).flatten(1, 2)  # (B, F*n, D)
            q, k, v = proj.qkv(h).unflatten(-1, (3, H, Dh)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
            # q/k normed in the norm weight's dtype: under autocast (bf16 q/k, fp32 weights) and in a
            # bf16 model alike, a mixed-dtype RMSNorm falls back to its unfused kernel (with a warning
            # on CPU)
            ks.append(apply_rope(proj.k_norm(k.to(proj.k_norm.weight.dtype)), g.rope).to(v.dtype))
            vs.append(v)
            if want:
                qs.append(apply_rope(proj.q_norm(q.to(proj.q_norm.weight.dtype)), g.rope).to(v.dtype))
        k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)  # (B, H, L, Dh)
        q = torch.cat(qs, dim=2)  # (B, H, Lq, Dh): the fine group always has queries
        Lq = q.shape[2]
        if mask is not None:
            mask = mask[-Lq:]  # query rows: groups without queries are always the leading (coarse) ones
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, Dh)
        o = o.transpose(1, 2).flatten(2)  # (B, Lq, D)

        outs, start = [], 0
        for g, mod, want in zip(groups, mods, wants):
            if not want:
                outs.append(g.x)
                continue
            proj = self.attn_coarse if g.coarse else self.attn_fine
            Fn, n = g.x.shape[1], g.x.shape[2]
            og = proj.out(o[:, start : start + Fn * n]).view(B, Fn, n, -1)  # (B, F, n, D)
            start += Fn * n
            x = g.x + mod[2] * og
            x = x + mod[5] * self.mlp(modulate(self.norm2(x), mod[3], mod[4]))
            outs.append(x)
        return outs

    def infer(
        self,
        xs: list[torch.Tensor],
        mods: list[tuple[torch.Tensor, ...]],
        ropes: list[tuple[torch.Tensor, torch.Tensor]],
        coarse: list[bool],
        past: "tuple[torch.Tensor, torch.Tensor] | KVBuffer | None",
        mask: torch.Tensor | None,
        outputs: list[bool],
        cache_masked: bool = False,
        memory_turn: MemoryTurn | None = None,
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """forward() at inference (FAR.forward_frames / frames_kv): the same math for token groups
        xs (B, F, n, D) (coarse ones first) with precomputed modulations per group (shift1,
        1+scale1, gate1, shift2, 1+scale2, gate2), each (B, F, 1, D), rope_table_full tables, and
        the cache attended in place (KVBuffer); the shared MLP runs once over all groups' tokens.
        outputs[i]: group i needs its new states (else only its keys/values: no queries, attention
        output or MLP; such groups must lead). Returns the groups' new states (unchanged where not
        wanted) and the keys/values of their tokens. cache_masked: the mask hides cached tokens
        from some queries (else every query sees the whole cache). memory_turn: the cache's
        long-term memory is seen at the positions memory_span gives it."""
        H, Dh = self.heads, self.head_dim
        qs, ks, vs, wants = [], [], [], []
        for x, mod, rope, c, want in zip(xs, mods, ropes, coarse, outputs):
            proj = self.attn_coarse if c else self.attn_fine
            h = torch.addcmul(mod[0], self.norm1(x), mod[1]).flatten(1, 2)  # (B, F*n, D)
            qkv = proj.qkv(h).unflatten(-1, (3, H, Dh)).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
            q, k, v = qkv
            vs.append(v)
            want = want and not (self.last and c)
            wants.append(want)
            # the norm's own dtype: bf16 weights (play) stay bf16; under autocast (training's rollouts)
            # bf16 k/q meet fp32 weights, which would fall back to the unfused kernel with a warning
            wq, wk = proj.q_norm.weight if want else None, proj.k_norm.weight
            if want and wk.dtype == torch.float32:
                # q and k normed and rotated together, half the kernels (~0.1 ms a block on the 2-core
                # CPU): the same numbers in fp32, the weight multiplying after the normalisation
                # (bf16 weights keep one rounding per norm below)
                w = torch.stack([wq, wk]).view(2, 1, 1, 1, Dh)
                q, k = apply_rope_full(F.rms_norm(qkv[:2].float(), (Dh,), None, proj.k_norm.eps) * w, rope).to(v.dtype)
                ks.append(k)
                qs.append(q)
                continue
            ks.append(apply_rope_full(proj.k_norm(k.to(wk.dtype)), rope).to(v.dtype))
            if want:
                qs.append(apply_rope_full(proj.q_norm(q.to(wq.dtype)), rope).to(v.dtype))
        k_new = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)
        v_new = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
        if not qs:
            return xs, (k_new, v_new)
        q = qs[0] if len(qs) == 1 else torch.cat(qs, dim=2)
        if mask is not None:
            mask = mask[-q.shape[2] :]  # query rows: groups without queries are the leading ones
        if isinstance(past, KVBuffer):
            o = past.attend(q, k_new, v_new, mask, cache_masked, memory_turn)
        else:
            kk, vv = k_new, v_new
            if past is not None:
                pk, pv = past
                if memory_turn is not None:
                    turned = apply_rope_full(pk[:, :, : memory_turn.tokens], memory_turn.table).to(pk.dtype)
                    pk = torch.cat([turned, pk[:, :, memory_turn.tokens :]], dim=2)
                if pk.shape[0] != kk.shape[0]:  # CFG: the m halves of the query batch share the cache of batch B
                    m = kk.shape[0] // pk.shape[0]
                    pk, pv = pk.repeat(m, 1, 1, 1), pv.repeat(m, 1, 1, 1)  # (m*B, H, L, Dh): rows as in the query
                kk, vv = torch.cat([pk, kk], dim=2), torch.cat([pv, vv], dim=2)
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        o = o.transpose(1, 2).flatten(2)  # (B, Lq, D)

        outs, hs, start = list(xs), [], 0
        for i, (x, mod, c, want) in enumerate(zip(xs, mods, coarse, wants)):
            if not want:
                continue
            proj = self.attn_coarse if c else self.attn_fine
            B, Fn, n, D = x.shape
            og = proj.out(o[:, start : start + Fn * n]).view(B, Fn, n, D)  # (B, F, n, D)
            start += Fn * n
            outs[i] = x = torch.addcmul(x, mod[2], og)
            hs.append((i, torch.addcmul(mod[3], self.norm2(x), mod[4])))
        if len(hs) == 1:
            i, h = hs[0]
            outs[i] = torch.addcmul(outs[i], mods[i][5], self.mlp(h))
        else:  # the MLP is shared by coarse and fine tokens: one pass over all of them
            flat = self.mlp(torch.cat([h.flatten(1, 2) for _, h in hs], dim=1))  # (B, sum of F*n, D)
            start = 0
            for i, h in hs:
                B, Fn, n, D = h.shape
                mlp_out = flat[:, start : start + Fn * n].view(B, Fn, n, D)  # (B, F, n, D)
                outs[i] = torch.addcmul(outs[i], mods[i][5], mlp_out)
                start += Fn * n
        return outs, (k_new, v_new)


class FinalLayer(nn.Module):
    def __init__(self, cfg: FARConfig):
        super().__init__()
        D = cfg.width
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, cfg.patch_size**2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(cond).unsqueeze(2).chunk(2, dim=-1)  # (B, F, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))


# ----------------------------------------------------------------------------------------------
# the model


class FAR(nn.Module):
    def __init__(self, cfg: FARConfig):
        super().__init__()
        self.config = cfg
        C, D = cfg.latent_channels, cfg.width
        self.embed_fine = nn.Linear(C * cfg.patch_size**2, D)
        self.embed_coarse = nn.Linear(C * cfg.context_patch_size**2, D)
        self.t_embed = TimestepEmbedder(D)
        self.aug_embed = TimestepEmbedder(D)  # noise level of augmented clean context
        self.action_embed = nn.Embedding(cfg.num_actions + 1, D)  # last index = null (CFG)
        self.rope = Rope3D(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList([FARBlock(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth)])
        self.final = FinalLayer(cfg)
        self._init_weights()

    @property
    def null_action(self) -> int:
        return self.config.num_actions

    def _init_weights(self) -> None:
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        nn.init.normal_(self.action_embed.weight, std=0.02)
        for emb in (self.t_embed, self.aug_embed):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.aug_embed.mlp[2].weight)  # augmentation starts as a no-op
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN[1].weight)
            nn.init.zeros_(block.adaLN[1].bias)
        nn.init.zeros_(self.final.adaLN[1].weight)
        nn.init.zeros_(self.final.adaLN[1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    # -- tokens ------------------------------------------------------------------------------

    def _patchify(self, latents: torch.Tensor, p: int) -> torch.Tensor:
        B, Fn, C, h, w = latents.shape
        x = latents.reshape(B, Fn, C, h // p, p, w // p, p)  # (B, F, C, h/p, p, w/p, p)
        x = x.permute(0, 1, 3, 5, 2, 4, 6)  # (B, F, h/p, w/p, C, p, p)
        return x.reshape(B, Fn, (h // p) * (w // p), C * p * p)  # (B, F, n, C*p*p)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        p, g = cfg.patch_size, cfg.latent_size // cfg.patch_size
        B, Fn = x.shape[:2]
        x = x.reshape(B, Fn, g, g, cfg.latent_channels, p, p)  # (B, F, h/p, w/p, C, p, p)
        x = x.permute(0, 1, 4, 2, 5, 3, 6)  # (B, F, C, g, p, g, p)
        return x.reshape(B, Fn, cfg.latent_channels, g * p, g * p)  # (B, F, C, h, w)

    def _positions(self, start_frame: int, num_frames: int, p: int, device: torch.device) -> torch.Tensor:
        """(F*n, 3) positions: absolute frame index, patch centre row/col in latent pixels."""
        g = self.config.latent_size // p
        centres = (torch.arange(g, device=device, dtype=torch.float64) + 0.5) * p
        t = torch.arange(start_frame, start_frame + num_frames, device=device, dtype=torch.float64)
        tt, rr, cc = torch.meshgrid(t, centres, centres, indexing="ij")
        return torch.stack([tt, rr, cc], dim=-1).reshape(-1, 3)  # (F*n, 3)

    def _cond(self, t: torch.Tensor, actions: torch.Tensor, aug: torch.Tensor | None, coarse: bool) -> torch.Tensor:
        """Per-frame conditioning (B, F, D) = timestep emb + action emb (+ augmentation emb)."""
        t = self._timestep_labels(t, coarse)
        if aug is None:  # always embedded (zeros = not augmented) so train and inference agree
            aug = torch.zeros_like(t)
        return self.t_embed(t) + self.action_embed(actions) + self.aug_embed(aug)

    def _timestep_labels(self, t: torch.Tensor, coarse: bool) -> torch.Tensor:
        """t as the embedder sees it (float32): every coarse frame long_context_t, a clean fine one
        (t < 0) clean_t, a noisy one its level."""
        cfg = self.config
        if coarse:
            return torch.full_like(t, cfg.long_context_t, dtype=torch.float32)
        return torch.where(t < 0, torch.full_like(t, cfg.clean_t), t).float()

    def _group(self, latents, t, actions, aug, start_frame: int, coarse: bool, query_frame: int = 0) -> TokenGroup:
        p = self.config.context_patch_size if coarse else self.config.patch_size
        embed = self.embed_coarse if coarse else self.embed_fine
        x = embed(self._patchify(latents, p))  # (B, F, n, D)
        Fn = latents.shape[1]
        pos = self._positions(start_frame, Fn, p, latents.device)
        if coarse and self.config.memory_span:
            pos[:, 0] = memory_time_positions(pos[:, 0], start_frame, start_frame + Fn - 1, query_frame,
                                              self.config.memory_span)
        return TokenGroup(x, self._cond(t, actions, aug, coarse), self.rope(pos), coarse)

    def _rope_table(self, start_frame: int, num_frames: int, p: int, device: torch.device):
        """RoPE cos/sin of frames start_frame.. (inference): memoised, as every denoising step of a
        frame uses the same table. Depends only on positions and config, never on weights."""
        memo = self.__dict__.setdefault("_rope_memo", {})
        key = (start_frame, num_frames, p, str(device))
        table = memo.get(key)
        if table is None:
            if len(memo) >= 32:
                memo.clear()
            table = memo[key] = rope_table_full(self.rope(self._positions(start_frame, num_frames, p, device)))
        return table

    def _memory_turn(self, memory: tuple[int, int] | None, query_frame: int, device: torch.device) -> MemoryTurn | None:
        """How a pass whose newest frame is query_frame turns the cached keys of the long-term memory
        frames memory = (first, count), stored at their frame indices, to the positions
        memory_time_positions gives them; None where nothing moves (memo as _rope_table)."""
        span = self.config.memory_span
        if not span or memory is None or memory[1] < 2 or query_frame - span <= memory[0]:
            return None
        first, count = memory
        tag = ("memory", first, count, query_frame, span, str(device))
        memo = self.__dict__.setdefault("_rope_memo", {})
        turn = memo.get(tag)
        if turn is None:
            if len(memo) >= 32:
                memo.clear()
            frames = torch.arange(first, first + count, device=device, dtype=torch.float64)
            shift = memory_time_positions(frames, first, first + count - 1, query_frame, span) - frames
            pos = torch.zeros(count, self.config.context_tokens_per_frame, 3, device=device, dtype=torch.float64)
            pos[:, :, 0] = shift[:, None]  # time only: the rows and columns stay where they are
            table = rope_table_full(self.rope(pos.flatten(0, 1)))  # (count * tokens per frame, head_dim) each
            turn = memo[tag] = MemoryTurn(count * self.config.context_tokens_per_frame, table, tag)
        return turn

    def _mods_params(self) -> list[torch.Tensor]:
        mods = [self.t_embed, self.aug_embed, self.action_embed, self.final.adaLN, *(b.adaLN for b in self.blocks)]
        return [p for m in mods for p in m.parameters()]

    def _frame_mods(self, t: torch.Tensor, actions: torch.Tensor, aug: torch.Tensor | None, coarse: bool) -> list:
        """adaLN modulations of every block, then of the final layer, for frames conditioned on
        (t, action, aug) (B, F): [(shift1, 1+scale1, gate1, shift2, 1+scale2, gate2)] * depth +
        [(shift, 1+scale)], each (B, F, 1, D). Inference on the CPU: memoised per distinct frame
        condition, since every frame repeats the sampler's timesteps and a few actions. Elsewhere
        they are computed as in training: the memo's keys are read on the host, which would make
        every forward on a GPU wait for the GPU (`_memoize_mods`). (The memo is dropped
        whenever a conditioning weight changes: keyed on the parameters' storage and version
        counters, which optimizers, EMA, load_state_dict and in-place ops under no_grad bump; an
        in-place write through `.data` does not, so a caller doing that must
        `far.__dict__.pop("_mods_memo", None)`.)"""
        D = self.config.width
        B, Fn = t.shape
        if torch.is_grad_enabled() or not self._memoize_mods(t.device):
            cond = self._cond(t, actions, aug, coarse)
            return self._split_mods([blk.adaLN(cond) for blk in self.blocks] + [self.final.adaLN(cond)], B, Fn)
        tv = self._timestep_labels(t, coarse)
        av = torch.zeros_like(tv) if aug is None else aug.float()
        dev = t.device
        tag = (coarse, str(dev), torch.is_autocast_enabled(dev.type))
        keys = [(tt, aa, gg, tag) for tt, aa, gg in zip(tv.flatten().tolist(), actions.flatten().tolist(), av.flatten().tolist())]
        memo = self.__dict__.setdefault("_mods_memo", {})
        version = tuple((p.data_ptr(), p._version) for p in self._mods_params())
        if memo.get("version") != version or len(memo) > 512:
            memo.clear()
            memo["version"] = version
        missing = [k for k in dict.fromkeys(keys) if k not in memo]
        if missing:
            mt = torch.tensor([k[0] for k in missing], device=dev)[None]
            ma = torch.tensor([k[1] for k in missing], device=dev, dtype=torch.long)[None]
            mg = torch.tensor([k[2] for k in missing], device=dev)[None]  # each (1, M): the M missing conditions
            cond = self._cond(mt, ma, mg, coarse)  # (1, M, D)
            outs = [blk.adaLN(cond) for blk in self.blocks] + [self.final.adaLN(cond)]
            for o in outs:  # 1 + scale, once
                self._add_one_to_scales(o)
            for j, k in enumerate(missing):
                memo[k] = [o[0, j] for o in outs]
        if len(keys) == 1:
            rows = [r.view(1, 1, 1, -1) for r in memo[keys[0]]]  # per block: (1, 1, 1, 6D; the final layer's 2D)
        else:
            # per block: (B, Fn, 1, 6D; the final layer's 2D)
            rows = [torch.stack([memo[k][i] for k in keys]).view(B, Fn, 1, -1) for i in range(len(self.blocks) + 1)]
        return [r.chunk(r.shape[-1] // D, dim=-1) for r in rows]  # per block 6 x (B, F, 1, D); the final layer's 2

    @staticmethod
    def _memoize_mods(device: torch.device) -> bool:
        """Whether inference memoises the modulations (`_frame_mods`): on the CPU only. The memo's
        `.tolist()` is a device-to-host copy, so on a GPU every forward would wait for the queue to
        drain. Session 23 suspected it of the rollout objective's slow steps (4 such forwards per
        rolled frame, ~33 a training step: 0.69 steps/s on an H200 beside two other arms, against
        12.5 for a plain arm), but without the memo session 24 measured 0.68, so that cost lies
        elsewhere."""
        return device.type == "cpu"

    def _add_one_to_scales(self, mods: torch.Tensor) -> None:
        """In place: (shift, scale, gate) * k along the last axis -> (shift, 1 + scale, gate) * k
        (the blocks' 6D and the final layer's 2D alike), so inference modulates with one addcmul."""
        D = self.config.width
        for j in range(1, mods.shape[-1] // D, 3):
            mods[..., j * D : (j + 1) * D] += 1

    def _split_mods(self, outs: list[torch.Tensor], B: int, Fn: int) -> list:
        D = self.config.width
        res = []
        for o in outs:
            o = o.view(B, Fn, 1, -1).clone()  # (B, Fn, 1, 6D; the final layer's 2D)
            self._add_one_to_scales(o)
            res.append(o.chunk(o.shape[-1] // D, dim=-1))  # 6 x (B, Fn, 1, D); the final layer's 2
        return res

    @staticmethod
    def _frame_causal_mask(groups: list[TokenGroup], start_frames: list[int]) -> torch.Tensor | None:
        """Bool (L, L): a token sees every token of frames <= its own."""
        frame_ids = []
        for g, s in zip(groups, start_frames):
            Fn, n = g.x.shape[1], g.x.shape[2]
            frame_ids.append(torch.arange(s, s + Fn, device=g.x.device).repeat_interleave(n))
        if sum(g.x.shape[1] for g in groups) == 1:
            return None  # one frame: full attention to itself and the cache
        ids = torch.cat(frame_ids)
        return ids[None, :] <= ids[:, None]  # (L, L)

    def _run(self, groups: list[TokenGroup], start_frames: list[int]) -> torch.Tensor:
        mask = self._frame_causal_mask(groups, start_frames)
        for block in self.blocks:
            xs = block(groups, mask)
            groups = [dataclasses.replace(g, x=x) for g, x in zip(groups, xs)]
        fine = groups[-1]
        assert not fine.coarse
        out = self.final(fine.x, fine.cond)  # (B, F, n, C*p*p)
        return self._unpatchify(out)

    # -- public entry points -----------------------------------------------------------------

    def forward(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        actions: torch.Tensor,
        aug: torch.Tensor | None = None,
        window: int | None = None,
        time_offset: int = 0,
    ) -> torch.Tensor:
        """Uncached long-short forward. latents (B,T,C,h,w) -> velocity (B, Wf, C, h, w).

        window: fine frames (default config.window; >= T presents every frame fine, the plain-KV
        layout). time_offset: absolute index of the first frame (RoPE time axis)."""
        T = latents.shape[1]
        Wf = min(self.config.window if window is None else window, T)
        Tc = T - Wf  # coarse (long-term) frames: 0..Tc-1; fine: Tc..T-1
        sl = lambda a, lo, hi: None if a is None else a[:, lo:hi]  # noqa: E731
        groups, starts = [], []
        if Tc > 0:
            groups.append(self._group(latents[:, :Tc], t[:, :Tc], actions[:, :Tc], sl(aug, 0, Tc), time_offset,
                                      coarse=True, query_frame=time_offset + T - 1))
            starts.append(time_offset)
        groups.append(
            self._group(latents[:, Tc:], t[:, Tc:], actions[:, Tc:], sl(aug, Tc, T), time_offset + Tc, coarse=False)
        )
        starts.append(time_offset + Tc)
        return self._run(groups, starts)

    def forward_frames(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        actions: torch.Tensor,
        aug: torch.Tensor | None,
        start_frame: int,
        past_kv: KV | None,
        coarse: bool = False,
        need_output: bool = True,
        memory: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor | None, KV]:
        """F consecutive frames (absolute indices start_frame..) against a cache of earlier frames.
        memory = (first frame, frames): the cache begins with the coarse tokens of these long-term
        memory frames (what memory_span moves; None: no memory, or leave it where it is)."""
        if coarse and need_output:
            raise ValueError("coarse tokens have no output head; use need_output=False")
        out, kvs = self._infer([(latents, t, actions, aug, start_frame, coarse)], past_kv, need_output, memory=memory)
        return out, [kv[0] for kv in kvs]

    def frames_kv(self, parts: list[tuple], past_kv: KV | None, memory: tuple[int, int] | None = None,
                  cache_visible: list[int | None] | None = None) -> list[KV]:
        """Keys/values of clean frames in several groups run as one pass (inference): parts =
        [(latents (B,F,C,h,w), actions (B,F), aug (B,F) | None, start_frame, coarse)], coarse
        groups first, consecutive in time. E.g. the frame leaving the window (coarse, into L2)
        together with the window re-encoded (fine, L1): the same tokens, masks and results as two
        frame_kv calls, in one pass over the weights and the cache. Returns one KV per part.
        memory: as forward_frames'. cache_visible: as frames_kv_and_velocity's."""
        parts = self._clean_parts(parts)
        _, kvs = self._infer(parts, past_kv, need_output=False, cache_visible=cache_visible, memory=memory)
        return [[kv[j] for kv in kvs] for j in range(len(parts))]

    def frames_kv_and_velocity(
        self, parts: list[tuple], x_t: torch.Tensor, t: torch.Tensor, action: torch.Tensor, frame_index: int,
        past_kv: KV | None, cache_visible: list[int | None] | None = None, memory: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """frames_kv(parts, past_kv), then predict_frame(x_t, t, action, frame_index) against the
        cache extended by them, as one pass: the same tokens, masks and results (the clean frames
        never attend to the noisy one), one read of the weights and of the cache instead of two.
        The parts' batch must be x_t's (B,C,h,w): no CFG-doubled batch. Returns (velocity
        (B,C,h,w), one KV per part). cache_visible[j]: part j sees only the first that many cached
        tokens (e.g. a frame entering L2 sees L2 alone); the noisy frame sees the whole cache.
        memory: as forward_frames'; under a memory span the one pass spreads it from the noisy frame,
        so the results then differ from the two calls' (the caches do not fuse then)."""
        clean = self._clean_parts(parts)
        noisy = (x_t[:, None], t[:, None], action[:, None], None, frame_index, False)
        visible = None if cache_visible is None else list(cache_visible) + [None]
        out, kvs = self._infer(clean + [noisy], past_kv, need_output=True, cache_visible=visible, memory=memory)
        return out[:, 0], [[kv[j] for kv in kvs] for j in range(len(parts))]

    def _clean_parts(self, parts: list[tuple]) -> list[tuple]:
        """frames_kv's parts (latents, actions, aug, start_frame, coarse) as _infer's, t = clean_t."""
        return [(lat, torch.full(lat.shape[:2], self.config.clean_t, device=lat.device), act, aug, s, c)
                for lat, act, aug, s, c in parts]

    def _infer(
        self, parts: list[tuple], past_kv: KV | None, need_output: bool, cache_visible: list[int | None] | None = None,
        memory: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor | None, list]:
        """parts [(latents, t, actions, aug, start_frame, coarse)] -> (velocity of the last part |
        None, per layer a list of (k, v) per part). cache_visible[j]: part j's tokens see only the
        first that many cached tokens (None: all of them). memory = (first frame, frames) of the
        long-term memory the cache begins with: under memory_span the whole pass sees it at the
        positions memory_time_positions gives it for the pass's newest frame (its own tokens keep
        their frame indices; the keys it returns are at their frame indices, as the cache keeps them)."""
        cfg = self.config
        xs, mods, ropes, coarse, ids = [], [], [], [], []
        for latents, t, actions, aug, start_frame, c in parts:
            Fn = latents.shape[1]
            p = cfg.context_patch_size if c else cfg.patch_size
            x = (self.embed_coarse if c else self.embed_fine)(self._patchify(latents, p))  # (B, F, n, D)
            xs.append(x)
            ropes.append(self._rope_table(start_frame, Fn, p, latents.device))
            mods.append(self._frame_mods(t, actions, aug, c))
            coarse.append(c)
            ids.append(torch.arange(start_frame, start_frame + Fn, device=x.device).repeat_interleave(x.shape[2]))
        device = xs[0].device
        past_len = 0 if past_kv is None else kv_length(past_kv[0])
        mask = None
        hidden = []  # (first row, end row, visible cached tokens) of parts that see part of the cache
        if cache_visible is not None:
            rows = itertools.accumulate([0] + [x.shape[1] * x.shape[2] for x in xs])
            hidden = [(lo, lo + x.shape[1] * x.shape[2], vis) for lo, x, vis in zip(rows, xs, cache_visible)
                      if vis is not None and vis < past_len]
        if sum(x.shape[1] for x in xs) > 1 or hidden:  # frame-causal among the new frames, all of the cache
            ids = torch.cat(ids)
            # (new tokens, cached + new tokens)
            allowed = torch.cat([ids.new_ones(len(ids), past_len, dtype=torch.bool), ids[None, :] <= ids[:, None]], dim=1)
            for lo, hi, vis in hidden:
                allowed[lo:hi, vis:past_len] = False
            if device.type == "cpu":  # additive once, in the tokens' dtype (bf16 too): no conversion per layer
                mask = torch.zeros(allowed.shape, device=device, dtype=xs[0].dtype).masked_fill_(~allowed, float("-inf"))
            else:
                mask = allowed
        sizes = [x.shape[1] * x.shape[2] for x in xs]
        turn = self._memory_turn(memory, max(p[4] + p[0].shape[1] - 1 for p in parts), device) if past_len else None
        every = [True] * len(xs)
        # the last block's new states feed only the output head: of the last part, if it is wanted
        last = [need_output and j == len(xs) - 1 for j in range(len(xs))]
        new_kv = []
        for i, block in enumerate(self.blocks):
            outputs = last if i == len(self.blocks) - 1 else every
            # (in the last block only the last part has queries, and it sees the whole cache)
            cache_masked = bool(hidden) and i < len(self.blocks) - 1
            xs, (k, v) = block.infer(xs, [m[i] for m in mods], ropes, coarse,
                                     None if past_kv is None else past_kv[i], mask, outputs, cache_masked, turn)
            # per part: (B, heads, F*n of that part, head_dim)
            new_kv.append(list(zip(k.split(sizes, dim=2), v.split(sizes, dim=2))) if len(xs) > 1 else [(k, v)])
        if not need_output:
            return None, new_kv
        if coarse[-1]:
            raise ValueError("coarse tokens have no output head; use need_output=False")
        shift, scale = mods[-1][-1]
        out = self.final.linear(torch.addcmul(shift, self.final.norm(xs[-1]), scale))  # (B, F, n, C*p*p)
        return self._unpatchify(out), new_kv

    def predict_frame(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        action: torch.Tensor,
        frame_index: int,
        past_kv: KV | None,
        aug: torch.Tensor | None = None,
        memory: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Velocity of one noisy frame x_t (B,C,h,w) at level t (B,) given the cached context
        (memory: as forward_frames')."""
        out, _ = self.forward_frames(
            x_t[:, None], t[:, None], action[:, None], None if aug is None else aug[:, None],
            frame_index, past_kv, coarse=False, need_output=True, memory=memory,
        )
        return out[:, 0]

    def frame_kv(
        self,
        latents: torch.Tensor,
        actions: torch.Tensor,
        start_frame: int,
        past_kv: KV | None,
        coarse: bool = False,
        aug: torch.Tensor | None = None,
        memory: tuple[int, int] | None = None,
    ) -> KV:
        """Keys/values of clean context frames (B,F,C,h,w): fine for L1, coarse for L2 (memory: as
        forward_frames')."""
        t = torch.full(latents.shape[:2], self.config.clean_t, device=latents.device)
        _, kv = self.forward_frames(latents, t, actions, aug, start_frame, past_kv, coarse=coarse, need_output=False,
                                    memory=memory)
        return kv


def deepened_block_sources(src_depth: int, dst_depth: int) -> list[int | None]:
    """For each block of a FAR deepened from src_depth to dst_depth blocks: the source block it takes
    its weights from, or None for a new block. The new blocks are spread evenly between the
    source's blocks, and the last block stays last (it alone has no coarse queries)."""
    if not 1 <= src_depth <= dst_depth:
        raise ValueError(f"cannot deepen a FAR of {src_depth} blocks to {dst_depth}")
    added = dst_depth - src_depth
    # new block j goes after source block round((j + 1) * (src_depth - 1) / (added + 1)) - 1 (-1: first)
    after = [round((j + 1) * (src_depth - 1) / (added + 1)) - 1 for j in range(added)]
    order: list[int | None] = [None] * after.count(-1)
    for i in range(src_depth):
        order.append(i)
        order += [None] * after.count(i)
    return order


def deepen_far_state_dict(state: dict[str, torch.Tensor], src: FARConfig, dst: FARConfig) -> dict[str, torch.Tensor]:
    """`src`'s FAR weights renamed for `dst`, which has as many or more blocks and is otherwise the
    same, but for the window W (no weight depends on it: a model trained with one can be
    fine-tuned with another).

    The blocks `dst` adds are absent from the result, so they keep their construction-time init,
    AdaLN-Zero's identity (zero gates): a FAR loaded with `load_state_dict(..., strict=False)`
    predicts exactly what `src`'s does, and training grows the new blocks from there (as a
    deepened autoencoder decoder does, autoencoder.deepen_state_dict).
    """
    if dataclasses.replace(dst, depth=src.depth, window=src.window, memory_span=src.memory_span) != src:
        diff = {k: (v, getattr(dst, k)) for k, v in src.to_dict().items()
                if k not in ("depth", "window", "memory_span") and getattr(dst, k) != v}
        raise ValueError(f"only the depth, the window and memory_span may differ: {diff}")
    where = {s: i for i, s in enumerate(deepened_block_sources(src.depth, dst.depth)) if s is not None}
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            index, rest = key[len("blocks."):].split(".", 1)
            key = f"blocks.{where[int(index)]}.{rest}"
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# cached inference: the per-layer key/value store the blocks attend in place


def concat_kv(a: KV | None, b: KV | None) -> KV | None:
    if a is None:
        return b
    if b is None:
        return a
    return [(torch.cat([ka, kb], dim=2), torch.cat([va, vb], dim=2)) for (ka, va), (kb, vb) in zip(a, b)]


@dataclass(frozen=True)
class MemoryTurn:
    """The turn of a cache's long-term memory keys under memory_span: its first `tokens` keys,
    stored at their frames' indices, are turned by `table` (rope_table_full of the time shifts) to
    the positions memory_time_positions gives them; `tag` names the turn (memo key)."""

    tokens: int
    table: tuple[torch.Tensor, torch.Tensor]
    tag: tuple


class KVBuffer:
    """Keys/values of one layer for cached inference, stored in place with room to grow.

    Storage k, v: (B, H, capacity, Dh); the first `length` tokens are the cache. `append` copies
    only the new tokens (capacity grows by half when full, so memory grows by the appended
    tokens' bytes, amortised). `attend(q, k_new, v_new)` is the cached attention of a block: it
    writes the new tokens' keys/values into the spare tail (scratch, `length` is unchanged) and
    attends to the contiguous prefix cache + new, so the fixed cache is never copied per call -
    exactly the attention over torch.cat([cache, new]). Queries batched as m x B (the CFG
    conditional / null halves over a cache of batch B) share the one cache instead of an m-fold
    copy: on CPU as one attention call of all halves' queries over [cache | new_1 | .. | new_m]
    with each half masked off the others' new keys (one read of the cache), elsewhere as m calls.
    From SPLIT_ATTENTION_MIN cached tokens on (CPU, fp32 or bf16, no grad), masked or CFG-batched calls
    attend to the cache and to the new tokens in two flash passes merged by log-sum-exp (the
    same softmax, ~1e-7 apart; no (queries x cache) mask to read per head)."""

    __slots__ = ("k", "v", "length", "edits", "_turned")

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        self.k, self.v, self.length = None, None, 0
        self.edits = 0  # bumped by every change of the stored tokens (keys the memo of _turned_view)
        self._turned = None  # (key, KVBuffer): the cache with its memory keys turned (memory_span)
        if k is not None:
            self.append(k, v)

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.length]

    def nbytes(self, capacity: bool = False) -> int:
        if self.k is None:
            return 0
        tokens = self.capacity if capacity else self.length
        held = 2 * self.k[:, :, :1].numel() * tokens * self.k.element_size()
        if capacity and self._turned is not None:  # memory_span: the memoised copy of the turned keys
            held += self._turned[1].k.numel() * self._turned[1].k.element_size()
        return held

    def reserve(self, n: int, like: torch.Tensor) -> None:
        """Make room for n more tokens after `length` (storage shaped/typed like `like` (B,H,*,Dh))."""
        need = self.length + n
        if self.k is not None and need <= self.capacity:
            return
        cap = max(need, self.capacity + self.capacity // 2, 64)
        B, H, _, Dh = like.shape if self.k is None else self.k.shape
        dtype, device = (like.dtype, like.device) if self.k is None else (self.k.dtype, self.k.device)
        k, v = torch.empty(B, H, cap, Dh, dtype=dtype, device=device), torch.empty(B, H, cap, Dh, dtype=dtype, device=device)
        if self.length:
            k[:, :, : self.length] = self.keys
            v[:, :, : self.length] = self.values
        self.k, self.v = k, v
        self.edits += 1

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        self.reserve(n, k)
        self.k[:, :, self.length : self.length + n] = k
        self.v[:, :, self.length : self.length + n] = v
        self.length += n
        self.edits += 1

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate {self.length} cached tokens to {length}")
        self.length = length
        self.edits += 1

    def drop_front(self, n: int) -> None:
        """Forget the first n cached tokens (the oldest long-term memory); the rest move to the front.
        Keys carry their rotary positions, so what is kept attends as before."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot drop {n} of {self.length} cached tokens")
        if n == 0:
            return
        rest = self.length - n
        self.k[:, :, :rest] = self.k[:, :, n : self.length].clone()  # the ranges overlap
        self.v[:, :, :rest] = self.v[:, :, n : self.length].clone()
        self.length = rest
        self.edits += 1

    def clone(self) -> "KVBuffer":
        twin = KVBuffer()
        if self.k is not None:
            # a cache of inference tensors stays one when forked outside inference mode: a clone there
            # would be a normal tensor, which the next flush would mix with the context's others
            with torch.inference_mode(self.k.is_inference()):
                twin.k, twin.v, twin.length = self.k.clone(), self.v.clone(), self.length
        return twin

    # copy.deepcopy and pickle (a Dream-v0 env copied whole) keep inference tensors inference tensors,
    # as clone does: else the copy's cache runs outside inference mode and generates other frames
    def __deepcopy__(self, memo: dict) -> "KVBuffer":
        return self.clone()

    def __getstate__(self) -> tuple:
        return self.k, self.v, self.length, self.k is not None and self.k.is_inference()

    def __setstate__(self, state: tuple) -> None:
        k, v, self.length, inference = state
        self.edits, self._turned = 0, None
        with torch.inference_mode(inference):
            self.k, self.v = (None, None) if k is None else (k.clone(), v.clone())

    def attend(
        self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, mask: torch.Tensor | None = None,
        cache_masked: bool = False, memory_turn: "MemoryTurn | None" = None,
    ) -> torch.Tensor:
        """softmax(q [cache, new]^T) [cache, new]: q (Bq, H, Lq, Dh), k_new/v_new (Bq, H, n, Dh).
        cache_masked: the mask also hides cached tokens from some queries (one masked pass then).
        memory_turn: the cache's first tokens (the long-term memory) are attended with their keys
        turned to other time positions (memory_span)."""
        n, L = k_new.shape[2], self.length
        if self.k is None:
            return F.scaled_dot_product_attention(q, k_new, v_new, attn_mask=mask)
        if self.k.dtype != q.dtype:  # a bf16 cache of an fp32 transformer (precision bf16-kv): attend in bf16
            mask = mask if mask is None or mask.dtype == torch.bool else mask.to(self.k.dtype)
            o = self.attend(q.to(self.k.dtype), k_new.to(self.k.dtype), v_new.to(self.k.dtype), mask, cache_masked,
                            memory_turn)
            return o.to(q.dtype)
        if memory_turn is not None:
            return self._turned_view(memory_turn).attend(q, k_new, v_new, mask, cache_masked)
        B = self.k.shape[0]
        m = q.shape[0] // B
        if L >= SPLIT_ATTENTION_MIN and (m > 1 or mask is not None) and not cache_masked and _split_ok(q):
            return self._attend_split(q, k_new, v_new, mask, m)
        if m == 1:
            self.reserve(n, k_new)
            self.k[:, :, L : L + n] = k_new
            self.v[:, :, L : L + n] = v_new
            return F.scaled_dot_product_attention(q, self.k[:, :, : L + n], self.v[:, :, : L + n], attn_mask=mask)
        self.reserve(m * n, k_new)
        if mask is not None or q.device.type != "cpu":  # one pass per CFG half over the shared cache
            k_all, v_all = self.k[:, :, : L + n], self.v[:, :, : L + n]
            outs = []
            for i in range(0, q.shape[0], B):
                k_all[:, :, L:] = k_new[i : i + B]
                v_all[:, :, L:] = v_new[i : i + B]
                outs.append(F.scaled_dot_product_attention(q[i : i + B], k_all, v_all, attn_mask=mask))
            return torch.cat(outs)
        # the m halves' queries in one pass over the cache: keys [cache | new_1 | ... | new_m],
        # half i masked off the other halves' new keys (exp(-inf) = 0: the same attention)
        Lq = q.shape[2]
        for i in range(m):
            self.k[:, :, L + i * n : L + (i + 1) * n] = k_new[i * B : (i + 1) * B]
            self.v[:, :, L + i * n : L + (i + 1) * n] = v_new[i * B : (i + 1) * B]
        qf = torch.cat(q.split(B), dim=2)  # (B, H, m*Lq, Dh)
        o = F.scaled_dot_product_attention(
            qf, self.k[:, :, : L + m * n], self.v[:, :, : L + m * n], attn_mask=_halves_mask(L, m, n, Lq, q.dtype, q.device)
        )
        return torch.cat(o.split(Lq, dim=2))  # (m*B, H, Lq, Dh): the halves back in the batch

    def _turned_view(self, turn: "MemoryTurn") -> "KVBuffer":
        """A copy of this cache whose first turn.tokens keys are turned by turn.table; its values
        are this cache's (attend writes only their spare tail). Memoised until the cache changes or
        another turn is asked for, so the denoising steps of a frame share one copy."""
        key = (turn.tag, self.edits)  # every change of the stored tokens bumps edits
        if self._turned is None or self._turned[0] != key:
            if turn.tokens > self.length:
                raise ValueError(f"cannot turn {turn.tokens} memory keys of a cache of {self.length} tokens")
            view = KVBuffer()
            view.k, view.v, view.length = self.k.clone(), self.v, self.length
            view.k[:, :, : turn.tokens] = apply_rope_full(self.k[:, :, : turn.tokens], turn.table).to(self.k.dtype)
            self._turned = (key, view)
        return self._turned[1]

    def _attend_split(self, q, k_new, v_new, mask, m: int) -> torch.Tensor:
        """Long caches on CPU: attention over the cache (unmasked: every new token sees all of it)
        and over the new tokens (masked) as two flash passes merged by their log-sum-exps, which
        is the same softmax without an (Lq, cache) mask read per head; the CFG halves' queries
        share the cache pass."""
        B, Lq = self.k.shape[0], q.shape[2]
        kc, vc = self.keys, self.values
        if m == 1:
            o1, l1 = _flash_lse(q, kc, vc)
            o2, l2 = _flash_lse(q, k_new, v_new, None if mask is None else mask[:, self.length :])
            return _merge_lse(o1, l1, o2, l2)
        if mask is not None:  # several frames' queries per CFG half: a pass per half
            return torch.cat([self._attend_split(q[i : i + B], k_new[i : i + B], v_new[i : i + B], mask, 1)
                              for i in range(0, q.shape[0], B)])
        o1, l1 = _flash_lse(torch.cat(q.split(B), dim=2), kc, vc)  # (B, H, m*Lq, Dh)
        o1, l1 = torch.cat(o1.split(Lq, dim=2)), torch.cat(l1.split(Lq, dim=2))  # (m*B, H, Lq, .)
        o2, l2 = _flash_lse(q, k_new, v_new)  # each half with its own new keys
        return _merge_lse(o1, l1, o2, l2)


SPLIT_ATTENTION_MIN = 1024  # cached tokens from which KVBuffer.attend splits cache / new on CPU
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _split_ok(q: torch.Tensor) -> bool:
    return (_FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled())


def _flash_lse(q, k, v, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention on CPU with its log-sum-exp per query: (B, H, Lq, Dh), (B, H, Lq)."""
    out = _FLASH_CPU(q, k, v, attn_mask=mask)
    return out[0], out[1]


def _merge_lse(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the union of two key sets from the attention over each."""
    lse = torch.logaddexp(l1, l2)  # fp32 (the flash kernel's log-sum-exps), also for bf16 outputs
    return (o1 * torch.exp(l1 - lse).unsqueeze(-1) + o2 * torch.exp(l2 - lse).unsqueeze(-1)).to(o1.dtype)


_HALVES_MASK: dict = {}


def _halves_mask(L: int, m: int, n: int, Lq: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask (m*Lq, L + m*n): query half i sees the cache and its own n new keys."""
    key = (L, m, n, Lq, dtype, str(device))
    mask = _HALVES_MASK.get(key)
    if mask is None:
        _HALVES_MASK.clear()  # one entry: the cache length changes every frame
        mask = torch.full((m * Lq, L + m * n), float("-inf"), dtype=dtype, device=device)
        mask[:, :L] = 0
        for i in range(m):
            mask[i * Lq : (i + 1) * Lq, L + i * n : L + (i + 1) * n] = 0
        _HALVES_MASK[key] = mask
    return mask


def kv_length(layer: "KVBuffer | tuple[torch.Tensor, torch.Tensor] | None") -> int:
    """Cached tokens of one layer's past (a KVBuffer or a (k, v) pair)."""
    if layer is None:
        return 0
    return layer.length if isinstance(layer, KVBuffer) else layer[0].shape[2]


# ----------------------------------------------------------------------------------------------
# devices and precision


class DeviceError(ValueError):
    """A --device that names no device, or one this machine does not have."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto": a CUDA GPU where there is one, else the CPU. Checks a named device exists."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):  # e.g. Apple's mps, which has no float64 (RoPE's angles are float64)
        raise DeviceError(f"device {device!r}: worldsim runs on cpu or cuda only (its position encoding "
                          f"computes in float64, which {dev.type} may lack); use cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r}: this PyTorch ({torch.__version__}) sees no CUDA GPU; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 elsewhere (exact, reproducible CPU tests)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_for(module: nn.Module) -> contextlib.AbstractContextManager:
    """autocast(device) of the module's weights, and bf16 autocast on CPU when those weights are
    stored in bf16: matmuls then read half the bytes (what bounds a 2-core CPU's cached
    inference); RoPE and the sampler's updates stay fp32, and the kernels accumulate in fp32."""
    weight = next(module.parameters())
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return autocast(weight.device)


def usable_cores() -> int:
    """The CPU cores this process may run on: what a container or taskset leaves it (Linux), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 numbers natively (AVX512-BF16 or AMX tiles); elsewhere
    bf16 matmuls are emulated, which can be slower than fp32."""
    try:  # private torch.cpu queries (cpuinfo); absent from some builds
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False
