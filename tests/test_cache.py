"""Cached generation equals uncached recomputation; sampler and Session behaviour (tiny, fp32)."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from worldsim.autoencoder import AE_PRESETS, Autoencoder
from worldsim.cache import UncachedContext, make_context
from worldsim.model import FAR, PRESETS, usable_cores
from worldsim.sampler import EulerSampler
from worldsim.world import WorldModel

torch.set_num_threads(1)  # 2 shared cores: one thread avoids OpenMP spin contention

ACTIONS = ("noop", "forward", "backward", "turn_left", "turn_right")
W = PRESETS["tiny"].window  # 4


def tiny_world(seed: int = 0) -> WorldModel:
    torch.manual_seed(seed)
    far = FAR(PRESETS["tiny"])
    with torch.no_grad():  # randomise the zero-initialised layers too: every path matters
        for p in far.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return WorldModel(Autoencoder(AE_PRESETS["tiny"]), far, ACTIONS, device="cpu")


def context(k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (k, 64, 64, 3), dtype=np.uint8), rng.integers(0, 5, k)


def rollout(world, mode, k=6, n=8, steps=3, cfg=1.5, seed=0, context_noise=0.0):
    frames, actions = context(k)
    s = world.new_session(frames, actions, cache_mode=mode, steps=steps, cfg=cfg, seed=seed, context_noise=context_noise)
    rng = np.random.default_rng(1)
    out = [s.step_latent(int(a)) for a in rng.integers(0, 5, n)]
    return torch.stack(out), s


@pytest.fixture(scope="module")
def world():
    return tiny_world()


def test_multilevel_equals_none(world):
    # 6 context frames (> W: bulk prefill of L2) then 8 generated: frames keep moving L1 -> L2
    ml, s = rollout(world, "multilevel", context_noise=0.05)
    ref, _ = rollout(world, "none", context_noise=0.05)
    assert s.stats()["l2_frames"] == 6 + 8 - (W - 1)
    assert (ml - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode", ["none", "multilevel", "multilevel-fast"])
def test_a_memory_span_beyond_the_history_changes_nothing(world, mode):
    """memory_span moves only a memory reaching further back than it: 14 frames under a span of 30
    are generated exactly as at their frame indices; under a span of 5 (window 4) they are not."""
    plain, _ = rollout(world, mode)
    own = world.far.config
    try:
        world.far.config = dataclasses.replace(own, memory_span=30)
        wide, _ = rollout(world, mode)
        world.far.config = dataclasses.replace(own, memory_span=W + 1)
        narrow, _ = rollout(world, mode)
    finally:
        world.far.config = own
    assert torch.equal(wide, plain)
    assert (narrow - plain).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["multilevel", "multilevel-fast"])
def test_under_a_memory_span_every_denoising_step_of_a_frame_sees_the_same_memory(world, mode):
    """A frame's first step must not see the memory otherwise than its later steps (as a pass fusing
    it with the frame entering L2 would): the same query twice gives the same velocity, flushed or not."""
    own = world.far.config
    try:
        world.far.config = dataclasses.replace(own, memory_span=W + 2)
        frames, actions = context(14)
        x, t, a = torch.randn(1, 4, 8, 8), torch.tensor([0.7]), torch.tensor([1])
        with torch.inference_mode():
            lat, act = world.encode(frames)[None], torch.as_tensor(actions)[None]
            lazy, flushed = make_context(world.far, mode), make_context(world.far, mode)
            for ctx in (lazy, flushed):
                ctx.extend(lat[:, :12], act[:, :12])
                ctx.flush()
                ctx.extend(lat[:, 12:13], act[:, 12:13])  # a frame leaves the window: into L2 with the next query
            flushed.flush()
            first, second, other = lazy.velocity(x, t, a), lazy.velocity(x, t, a), flushed.velocity(x, t, a)
    finally:
        world.far.config = own
    assert torch.equal(first, second) and torch.equal(first, other)


def test_a_long_context_under_a_memory_span_is_prefilled_seeing_its_memory_spread(world):
    """A context appended at once enters L2 in passes of at most span - W - 1 frames (here 1), and
    each sees the memory before it at the positions memory_time_positions gives it, as a generated
    frame's pass does: the L2 of frame-by-frame frame_kv calls given that memory."""
    own = world.far.config
    try:
        world.far.config = far_cfg = dataclasses.replace(own, memory_span=W + 2)
        frames, actions = context(20)
        s = world.new_session(frames, actions, cache_mode="multilevel")
        s.context.flush()
        with torch.inference_mode():
            lat, act = world.encode(frames)[None], torch.as_tensor(actions)[None]
            ref = None
            for f in range(s.context.l2_frames):
                new = world.far.frame_kv(lat[:, f : f + 1], act[:, f : f + 1], f, ref, coarse=True,
                                         memory=(0, f) if f else None)
                ref = new if ref is None else [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
                                               for (k0, v0), (k1, v1) in zip(ref, new)]
    finally:
        world.far.config = own
    assert s.context.prefill_frames_coarse == 1 and far_cfg.memory_span == W + 2
    tokens = s.context._l2_tokens
    for buf, (k, v) in zip(s.context.kv, ref):
        assert torch.allclose(buf.k[:, :, :tokens], k, atol=1e-5) and torch.allclose(buf.v[:, :, :tokens], v, atol=1e-5)


@pytest.mark.parametrize("mode", ["multilevel", "multilevel-fast"])
def test_a_one_frame_window_generates_like_recomputation(mode):
    """W = 1 (every context frame in L2): the cache drops each latent as soon as it is coarse,
    which used to crash the second sampling step."""
    torch.manual_seed(0)
    far = FAR(dataclasses.replace(PRESETS["tiny"], window=1))
    with torch.no_grad():
        for p in far.parameters():
            p.add_(0.05 * torch.randn_like(p))
    w1 = WorldModel(Autoencoder(AE_PRESETS["tiny"]), far, ACTIONS, device="cpu")
    got, s = rollout(w1, mode, k=3, n=4)
    ref, _ = rollout(w1, "none", k=3, n=4)
    assert s.stats()["l1_frames"] == 0
    tolerance = 1e-4 if mode == "multilevel" else 0.1  # -fast approximates (ARCHITECTURE.md)
    assert (got - ref).abs().max().item() <= tolerance * max(1.0, ref.abs().max().item())


def test_the_uncached_reference_serves_a_guided_batch_of_two(world):
    """UncachedContext (cache mode "none", the tests' reference) with B = 2 and CFG: the query
    batch is 2B (conditional, then null-action halves), as in the cached contexts."""
    ctx = {"none": UncachedContext(world.far), "multilevel": make_context(world.far, "multilevel")}
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 5, 4, 8, 8, generator=g)  # (B, K, C, h, w)
    acts = torch.randint(0, 5, (2, 5), generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    sampler = EulerSampler(steps=2, cfg_scale=1.5)
    out = {}
    for name, c in ctx.items():
        with torch.no_grad():
            c.extend(lat, acts)
            out[name] = sampler.sample(c.velocity, x.clone(), torch.tensor([1, 3]), null_action=5)
    assert (out["none"] - out["multilevel"]).abs().max().item() <= 1e-4


def test_kv_equals_its_uncached_all_fine_recomputation(world):
    kv, s = rollout(world, "kv")
    ref, _ = rollout(world, UncachedContext(world.far, layout="all-fine"))
    assert (kv - ref).abs().max().item() <= 1e-4
    assert s.stats()["l1_frames"] == 14 and s.stats()["l2_frames"] == 0
    ml, _ = rollout(world, "multilevel")  # different layouts: not expected to agree
    assert (kv - ml).abs().max().item() > 1e-3


def test_sliding_equals_uncached_window(world):
    sl, s = rollout(world, "sliding")
    ref, _ = rollout(world, UncachedContext(world.far, layout="window"))
    assert (sl - ref).abs().max().item() <= 1e-4
    assert s.stats()["l2_frames"] == 0 and s.stats()["l1_frames"] == W - 1


def test_cache_stats_token_counts(world):
    _, s = rollout(world, "multilevel", n=3)
    st = s.stats()
    cfg = world.far.config
    assert st["l1_frames"] == W - 1 and st["l1_tokens"] == (W - 1) * cfg.tokens_per_frame
    assert st["l2_frames"] == 9 - (W - 1)
    assert st["l2_tokens"] == st["l2_frames"] * cfg.context_tokens_per_frame == st["l2_frames"] * 4
    # per layer: k and v, (1, heads, tokens, head_dim) fp32
    per_token = 2 * cfg.depth * cfg.width * 4
    assert st["cache_bytes"] == per_token * (st["l1_tokens"] + st["l2_tokens"])


def test_cache_capacity_counts_the_turned_copy_of_the_memory_keys(world):
    """Under a memory span every layer also holds a turned copy of its keys, which the capacity
    a user sizes memory by must count (the stored tokens, cache_bytes, stay as they are)."""
    own = world.far.config
    try:
        plain = rollout(world, "multilevel", k=14, n=2)[1].stats()
        world.far.config = dataclasses.replace(own, memory_span=W + 2)
        s = rollout(world, "multilevel", k=14, n=2)[1]
        spread = s.stats()
    finally:
        world.far.config = own
    storage = sum(2 * b.k.numel() * b.k.element_size() for b in s.context.kv)  # k and v, spare room included
    turned = sum(b._turned[1].k.numel() * b._turned[1].k.element_size() for b in s.context.kv)
    assert turned > 0 and spread["cache_bytes"] == plain["cache_bytes"]
    assert spread["cache_capacity_bytes"] == storage + turned


def test_cfg_scale_one_is_no_guidance(world):
    torch.manual_seed(0)
    x, a = torch.randn(1, 4, 8, 8), torch.tensor([2])
    calls = []

    def fn(x_, t_, a_):
        calls.append(a_.tolist())
        return world.far.predict_frame(x_, t_, a_, 0, None)

    v1 = EulerSampler(3, cfg_scale=1.0).guided_velocity(fn, x, 0.5, a, world.far.null_action)
    assert torch.equal(v1, fn(x, torch.tensor([0.5]), a)) and calls[0] == [2]  # no null branch run
    v = EulerSampler(3, cfg_scale=1.5).guided_velocity(fn, x, 0.5, a, world.far.null_action)
    assert calls[-1] == [2, 5]  # batched: conditional and null action
    vc, vn = fn(x, torch.tensor([0.5]), a), fn(x, torch.tensor([0.5]), torch.tensor([5]))
    assert torch.allclose(v, vn + 1.5 * (vc - vn), atol=1e-5)
    g1, _ = rollout(world, "multilevel", n=3, cfg=1.0)
    g2, _ = rollout(world, "multilevel", n=3, cfg=1.5)
    assert (g1 - g2).abs().max() > 1e-4


def test_session_seed_predict_append_step(world):
    frames, actions = context(3)
    a = world.new_session(frames, actions, steps=2, cfg=1.0, seed=7)
    b = world.new_session(frames, actions, steps=2, cfg=1.0, seed=7)
    c = world.new_session(frames, actions, steps=2, cfg=1.0, seed=8)
    fa, fb, fc = a.step(1), b.step(1), c.step(1)
    assert fa.dtype == np.uint8 and fa.shape == (64, 64, 3)
    assert np.array_equal(fa, fb) and not np.array_equal(fa, fc)
    assert a.frame_index == 4
    p = a.predict(2)  # predict does not append
    assert p.shape == (64, 64, 3) and a.frame_index == 4
    a.append(frames[0], 3)
    assert a.frame_index == 5 and a.stats()["l1_frames"] == W - 1
    with pytest.raises(ValueError):
        a.predict(5)  # the null class is not a playable action
    for bad in (5, -1, 9):  # nor a context action: 5 was taken silently, -1 and 9 failed deep in torch
        with pytest.raises(ValueError, match=f"context action {bad} out of range"):
            world.new_session(frames, np.array([0, bad, 1]), steps=1, cfg=1.0, seed=0)
    empty = world.new_session(np.zeros((0, 64, 64, 3), np.uint8), np.zeros(0, np.int64), steps=1, cfg=1.0, seed=0)
    assert empty.step(0).shape == (64, 64, 3) and empty.frame_index == 1
    # a frame or latent of another shape broke the session for good (the next step failed in torch.stack);
    # a fractional action was cut to an integer; encode of another resolution gave latents of another size
    for mode in ("multilevel", "kv"):
        s = world.new_session(frames, actions, cache_mode=mode, steps=1, cfg=1.0, seed=0)
        with pytest.raises(ValueError, match=r"frame must be \[64, 64, 3\], got \(32, 32, 3\)"):
            s.append(frames[0, :32, :32], 1)
        with pytest.raises(ValueError, match=r"frame must be \[64, 64, 3\], got \(2, 64, 64, 3\)"):
            s.append(frames[:2], 1)
        with pytest.raises(ValueError, match=r"latents must be \[K, 4, 8, 8\]"):
            s.append_latent(torch.zeros(3, 4, 4), 1)
        for bad in (1.9, float("inf"), True, "1"):
            with pytest.raises(ValueError, match=f"action must be a whole number, got {bad!r}"):
                s.step(bad)
        assert s.frame_index == 3 and s.step(2.0).shape == (64, 64, 3)  # untouched, and a whole float is that action
    # torch's CPU generator keeps a seed's low 32 bits (and reads -1 as 2**64 - 1): 2**32 gave seed 0's frames
    for bad in (2**70, 2**64, 2**32, -1):
        with pytest.raises(ValueError, match=rf"seed must be from 0 to 2\*\*32 - 1, got {bad}"):
            world.new_session(frames, actions, seed=bad)
    with pytest.raises(ValueError, match=r"frames must be \[\.\.\., 64, 64, 3\], got \(1, 128, 128, 3\)"):
        world.encode(np.zeros((1, 128, 128, 3), np.uint8))


def test_fork_is_independent(world):
    frames, actions = context(5)
    s = world.new_session(frames, actions, steps=2, cfg=1.0, seed=3)
    twin = s.fork()
    z1 = s.step_latent(1)
    z2 = twin.step_latent(1)
    assert torch.equal(z1, z2) and s.frame_index == twin.frame_index == 6
    s.step_latent(0)
    assert twin.frame_index == 6


@pytest.mark.parametrize("option", ["context_noise", "generated_noise"])
@pytest.mark.parametrize("level", [-0.1, 1.0, float("nan")])
def test_a_noise_level_outside_zero_to_one_is_refused(world, option, level):
    frames, actions = context(2)
    with pytest.raises(ValueError, match=f"{option} must be in \\[0, 1\\)"):
        world.new_session(frames, actions, **{option: level})


def test_generated_noise_labels_only_the_models_own_frames(world):
    """generated_noise: the frames the session generates go into the context noised and labelled
    with that level (as --obj-rollout-aug trained them); the given context and appended real
    frames stay clean and unlabelled. Defaults come from the checkpoint's sampler settings."""
    frames, actions = context(3)
    s = world.new_session(frames, actions, cache_mode="none", steps=2, seed=0, generated_noise=0.3)
    z = s.step_latent(1)
    s.append(frames[0], 2)
    s.step(3)
    assert [float(a[0]) for a in s.context.aug] == pytest.approx([0.0, 0.0, 0.0, 0.3, 0.0, 0.3])
    residual = (s.context.latents[3][0] - 0.7 * z) / 0.3  # the noise mixed in: standard normal
    assert 0.8 < residual.std().item() < 1.2 and abs(residual.mean().item()) < 0.2

    plain = world.new_session(frames, actions, cache_mode="none", steps=2, seed=0)
    assert torch.equal(plain.step_latent(1), z) and float(plain.context.aug[3][0]) == 0.0
    assert torch.equal(plain.context.latents[3][0], z)
    saved = world.sampler
    world.sampler = {**saved, "generated_noise": 0.25}
    try:
        labelled = world.new_session(frames, actions, cache_mode="none", steps=2, seed=0)
        labelled.step_latent(1)
        assert float(labelled.context.aug[3][0]) == 0.25
    finally:
        world.sampler = saved


def test_kv_buffer_drop_front_keeps_the_newest_tokens_in_order():
    from worldsim.model import KVBuffer

    k = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).reshape(2, 3, 10, 4)
    buf = KVBuffer(k, -k)
    buf.drop_front(4)
    assert buf.length == 6 and torch.equal(buf.keys, k[:, :, 4:]) and torch.equal(buf.values, -k[:, :, 4:])
    buf.append(k[:, :, :2], -k[:, :, :2])  # appends land after what was kept
    assert torch.equal(buf.keys, torch.cat([k[:, :, 4:], k[:, :, :2]], dim=2))
    with pytest.raises(ValueError, match="cannot drop 9 of 8"):
        buf.drop_front(9)
    big = KVBuffer(torch.randn(1, 2, 1000, 4), torch.randn(1, 2, 1000, 4))
    kept = big.keys[:, :, 990:].clone(), big.values[:, :, 990:].clone()
    big.drop_front(990)
    assert torch.equal(big.keys, kept[0]) and torch.equal(big.values, kept[1])


@pytest.mark.parametrize("mode", ["multilevel", "multilevel-fast"])
@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_a_bounded_memory_forgets_the_oldest_frames_and_stops_growing(world, mode, cfg):
    """L2 grew without end, and the time per frame with it (0.8 s at 20,000 frames of play): memory_frames
    bounds it. Until the bound is reached nothing changes; then the oldest frames are forgotten in chunks,
    the newest keep their keys, values and positions, and the cache stops growing."""
    frames, actions = context(6)
    bound = 8
    capped = world.new_session(frames, actions, cache_mode=mode, steps=2, cfg=cfg, seed=5, memory_frames=bound)
    free = world.new_session(frames, actions, cache_mode=mode, steps=2, cfg=cfg, seed=5)
    rng = np.random.default_rng(2)
    held, sizes, diverged_at = [], [], None
    for i, a in enumerate(rng.integers(0, 5, 40)):
        za, zb = capped.step_latent(int(a)), free.step_latent(int(a))
        assert capped.context.l2_frames - capped.context.l2_first <= bound  # held between frames
        stats = capped.stats()
        held.append(stats["l2_frames"])
        sizes.append(stats["cache_bytes"])
        if diverged_at is None and not torch.equal(za, zb):
            diverged_at = i
        free_l2 = free.stats()["l2_frames"]
        if free_l2 <= bound:  # the bound not yet reached: the very same frames
            assert torch.equal(za, zb) and stats == free.stats()
    assert max(held) <= bound and min(held[-20:]) >= bound - bound // 4  # forgets a quarter at a time
    assert len(set(sizes[-20:])) <= bound // 4 + 1 and max(sizes[-20:]) == max(sizes)  # flat, not growing
    assert diverged_at is not None  # past the bound the memory differs, so the check above can fail
    assert capped.context.l2_first > 0 and capped.frame_index == free.frame_index
    # the buffers hold what the counters say, and the window (exact mode) was encoded against the kept
    # memory: a recomputation of L1 over the kept L2 answers a query alike
    ctx = capped.context
    ctx.flush()
    stats = capped.stats()
    tokens = stats["l1_tokens"] + stats["l2_tokens"]
    assert all(buf.length == tokens for buf in ctx.kv) and stats["l2_frames"] == ctx.l2_frames - ctx.l2_first
    if mode == "multilevel":
        from worldsim.model import KVBuffer

        far, n = world.far, ctx.num_frames
        ref = [KVBuffer(buf.k[:, :, :ctx._l2_tokens].clone(), buf.v[:, :, :ctx._l2_tokens].clone()) for buf in ctx.kv]
        lat, act, aug = ctx._history(ctx.l1_start, n)
        with torch.inference_mode():
            for buf, (k, v) in zip(ref, far.frame_kv(lat, act, ctx.l1_start, ref, aug=aug)):
                buf.append(k, v)
            x, t, a = torch.randn(1, *lat.shape[2:]), torch.tensor([0.7]), torch.tensor([2])
            torch.testing.assert_close(ctx.velocity(x, t, a), far.predict_frame(x, t, a, n, ref), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="memory_frames must be an integer >= 1"):
        world.new_session(frames, actions, cache_mode=mode, memory_frames=0)


def test_a_bounded_exact_memory_equals_a_reference_that_forgets_the_same_frames(world):
    """The exact multi-level cache with a bound against a reference built here frame by frame: each
    frame leaving the window enters an L2 that first forgot its oldest frames by the same rule, and
    every query sees that L2 and the window encoded against it, never more than the bound."""
    from worldsim.cache import L2_FORGET_CHUNK
    from worldsim.model import KVBuffer

    far, W = world.far, world.far.config.window
    bound, ctpf = 6, world.far.config.context_tokens_per_frame
    frames, actions = context(6)
    session = world.new_session(frames, actions, cache_mode="multilevel", steps=2, cfg=1.0, seed=5,
                                memory_frames=bound)
    lats, acts = list(world.encode(frames).float()), [int(a) for a in actions]
    ref: list[KVBuffer] = [KVBuffer() for _ in range(far.config.depth)]
    first = entered = 0
    rng = np.random.default_rng(4)
    forgot = False
    with torch.inference_mode():
        for _ in range(30):
            n = len(lats)
            for j in range(entered, max(0, n + 1 - W)):  # frame j leaves the window: room first, then L2
                if entered - first + 1 > bound:
                    drop = min(entered - first, entered - first + 1 - bound + min(L2_FORGET_CHUNK, bound // 4))
                    for buf in ref:
                        buf.drop_front(drop * ctpf)
                    first, forgot = first + drop, True
                kv = far.frame_kv(lats[j][None, None], torch.tensor([[acts[j]]]), j, ref if entered else None,
                                  coarse=True)
                for buf, (k, v) in zip(ref, kv):
                    buf.append(k, v)
                entered += 1
            start = max(0, n + 1 - W)
            window = [KVBuffer(b.k[:, :, :b.length].clone(), b.v[:, :, :b.length].clone()) for b in ref]
            l1 = far.frame_kv(torch.stack(lats[start:n])[None], torch.tensor([acts[start:n]]), start,
                              window if entered else None)
            for buf, (k, v) in zip(window, l1):
                buf.append(k, v)
            x, t, a = torch.randn(1, *lats[0].shape), torch.tensor([0.6]), torch.tensor([int(rng.integers(0, 5))])
            torch.testing.assert_close(session.context.velocity(x, t, a), far.predict_frame(x, t, a, n, window),
                                       rtol=1e-5, atol=1e-5)
            assert entered - first <= bound and session.stats()["l2_frames"] == entered - first
            action = int(rng.integers(0, 5))
            lats.append(session.step_latent(action).float())
            acts.append(action)
    assert forgot  # the bound was reached, so the comparison covers the forgetting


@pytest.mark.parametrize("mode", ["multilevel", "multilevel-fast"])
@pytest.mark.parametrize("bound, appends, cfg", [(20, (300, 0, 90, 0), 1.5), (4, (2, 2, 0, 2, 2), 1.0)])
def test_a_bounded_memory_takes_long_contexts_and_bulk_appends_in_chunks(world, mode, bound, appends, cfg,
                                                                         monkeypatch):
    """A long prefill or a bulk append under a bound: every pass sees at most the bound in L2, and the
    frames enter in forgetting chunks, so L2 is never emptied to make room (chunks of the bound's size
    forgot all of L2 before each). Appends of a few frames under a small bound, without CFG, take the
    fused passes (multilevel-fast's slide with the query), which must chunk as well."""
    far = world.far
    ctpf = far.config.context_tokens_per_frame
    frames, actions = context(3)
    session = world.new_session(frames, actions, cache_mode=mode, steps=1, cfg=cfg, seed=1, memory_frames=bound)
    ctx = session.context
    seen: list[int] = []
    kept_before_entering: list[int] = []  # L2 held as frames enter it, once it was full
    infer = far._infer

    def counting(parts, past_kv, *args, **kwargs):
        coarse = sum(p[0].shape[1] for p in parts if p[5])  # frames entering L2 in this pass
        seen.append(ctx.l2_frames - ctx.l2_first + coarse)
        if coarse and ctx.l2_first:
            kept_before_entering.append(ctx.l2_frames - ctx.l2_first)
        if past_kv is not None:  # the cache holds [L2 | L1...]: its L2 is what the counters say
            assert all(buf.length >= (ctx.l2_frames - ctx.l2_first) * ctpf for buf in past_kv)
        return infer(parts, past_kv, *args, **kwargs)

    monkeypatch.setattr(far, "_infer", counting)
    rng = np.random.default_rng(0)
    fc = far.config
    for bulk in appends:  # e.g. a long context, a few frames, a bulk append mid-session, a few frames
        if bulk:
            session.extend_latents(torch.randn(bulk, fc.latent_channels, fc.latent_size, fc.latent_size),
                                   torch.as_tensor(rng.integers(0, 5, bulk)))
        for _ in range(3):
            session.step_latent(int(rng.integers(0, 5)))
            held = ctx.l2_frames - ctx.l2_first
            assert bound - 2 * (bound // 4) <= held <= bound  # forgotten in chunks, never emptied
        predicted = session.stats()
        ctx.flush()
        assert session.stats() == predicted
        assert all(buf.length == predicted["l1_tokens"] + predicted["l2_tokens"] for buf in ctx.kv)
    assert seen and max(seen) <= bound
    assert kept_before_entering and min(kept_before_entering) >= bound - 2 * (bound // 4)



def _with_a_pending_frame(world, mode: str):
    """A multilevel context past its window's slide, its latest frame appended but not yet
    encoded (as a generated frame is), and the next frame's query (x_t, t, action)."""
    ctx = make_context(world.far, mode)
    g = torch.Generator().manual_seed(0)
    cfg = world.far.config
    lat = torch.randn(1, W + 3, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    ctx.extend(lat[:, :-1], torch.randint(0, 5, (1, W + 2), generator=g))
    ctx.velocity(torch.randn(1, *lat.shape[2:], generator=g), torch.tensor([0.5]), torch.tensor([1]))  # encode them
    ctx.extend(lat[:, -1:], torch.tensor([[2]]))
    return ctx, (torch.randn(1, *lat.shape[2:], generator=g), torch.tensor([0.7]), torch.tensor([3]))


@pytest.mark.parametrize("mode", ["multilevel-fast", "multilevel"])
def test_a_flush_encodes_the_pending_frame_in_one_pass_as_the_next_query_would(world, mode, monkeypatch):
    """Session.step flushes each generated frame into the cache while another core decodes it. In
    multilevel-fast the frame entering L2 and the new frame go in one pass over the weights (not
    two), the frame entering L2 masked off the kept window as in the pass fused with the next
    query: the same cache and the same next velocity either way. (Without the mask the frame
    entering L2 would see the window, and its keys would differ.)"""
    with torch.inference_mode():
        fused, query = _with_a_pending_frame(world, mode)
        v_fused = fused.velocity(*query)
        flushed, query = _with_a_pending_frame(world, mode)
        passes = []
        infer = world.far._infer
        monkeypatch.setattr(world.far, "_infer", lambda *a, **k: passes.append(1) or infer(*a, **k))
        flushed.flush()
        assert len(passes) == 1 and flushed.l1_end == flushed.num_frames  # one pass, nothing left pending
        v_flushed = flushed.velocity(*query)
    assert (v_flushed - v_fused).abs().max().item() <= 1e-5
    assert len(flushed.kv) == len(fused.kv) == world.far.config.depth
    for a, b in zip(flushed.kv, fused.kv):
        assert a.length == b.length
        assert (a.keys - b.keys).abs().max().item() <= 1e-5 and (a.values - b.values).abs().max().item() <= 1e-5


@pytest.mark.skipif(usable_cores() < 2, reason="decoding alongside needs a second core")
def test_step_decodes_on_a_second_thread_while_the_cache_takes_the_frame(world, monkeypatch):
    """On a CPU with torch at one thread and a second core, Session.step decodes the generated
    frame on another thread while this one encodes the frame into the cache (flush), so the next
    frame starts from an up-to-date cache. The frames are those of the serial step (the cache
    update then fused into the next frame's first pass) to float rounding; with several torch
    threads the step stays serial (two threads' ops would fight for the cores)."""
    import threading

    import worldsim.world as world_module

    frames, actions = context(6)
    decoded_on, flushed_on = [], []
    decode = world.decode
    monkeypatch.setattr(world, "decode", lambda z: decoded_on.append(threading.get_ident()) or decode(z))

    def play(n=6):
        s = world.new_session(frames, actions, cache_mode="multilevel-fast", steps=2, cfg=1.0, seed=5)
        flush = s.context.flush
        s.context.flush = lambda: flushed_on.append(threading.get_ident()) or flush()
        out = []
        for a in [1, 3, 3, 0, 4, 2][:n]:
            out.append(s.step(a))
            assert s.context.l1_end == s.context.num_frames or not flushed_on  # flushed before step returned
        return np.stack(out), s

    torch.set_num_threads(1)
    alongside, s = play()
    assert len(decoded_on) == 6 and set(decoded_on) != {threading.get_ident()}
    assert flushed_on == [threading.get_ident()] * 6 and s.frame_index == 12
    again, _ = play()
    assert np.array_equal(alongside, again)  # reproducible

    decoded_on.clear(), flushed_on.clear()
    monkeypatch.setattr(world_module, "decode_alongside", lambda device: None)
    serial, _ = play()
    assert decoded_on == [threading.get_ident()] * 6 and not flushed_on
    assert np.array_equal(alongside[0], serial[0])
    assert np.abs(alongside.astype(int) - serial.astype(int)).max() <= 2
    monkeypatch.undo()

    torch.set_num_threads(2)
    try:
        assert world_module.decode_alongside(torch.device("cpu")) is None
    finally:
        torch.set_num_threads(1)
    assert world_module.decode_alongside(torch.device("meta")) is None


@pytest.mark.skipif(usable_cores() < 2, reason="decoding alongside needs a second core")
def test_a_decode_that_waited_for_its_core_leaves_the_next_frames_decoded_alongside(world, monkeypatch):
    """Where the frame is decoded sets its float rounding (alongside, the cache update runs in a
    pass of its own; serially it shares the next frame's first pass): the same seed gives the same
    frames on the same threads and cores only if a busy moment on the second core (another program,
    a waited-for page) does not change the path. On the project's checkpoint one decode that waited
    0.2 s (b8b794a's busy-core pause) changed the sixth frame after it. A decode that sleeps stands
    in for one that waits for its core."""
    import threading
    import time

    frames, actions = context(3)
    s = world.new_session(frames, actions, cache_mode="multilevel-fast", steps=1, cfg=1.0, seed=0)
    decoded_on = []
    decode = world.decode

    def waiting_decode(z):
        decoded_on.append(threading.get_ident())
        time.sleep(0.05)  # wall time without CPU time: the thread waited
        return decode(z)

    monkeypatch.setattr(world, "decode", waiting_decode)
    s.step(1)
    monkeypatch.setattr(world, "decode", lambda z: decoded_on.append(threading.get_ident()) or decode(z))
    s.step(2)
    s.step(3)
    assert len(decoded_on) == 3 and threading.get_ident() not in decoded_on  # all alongside


@pytest.mark.skipif(usable_cores() < 2 or not hasattr(os, "fork"), reason="needs a second core and fork()")
def test_a_forked_child_steps_serially_without_the_parents_decoder_thread(world):
    """A child forked after its parent stepped (gymnasium's AsyncVectorEnv forks workers after a
    Dream-v0 ran in the parent) inherits the parent's decoder thread pool but not its thread:
    handing it work would wait forever. Such a child is one of a pool of workers that keeps the
    cores busy, where the decode alongside only costs CPU time: it steps serially."""
    import multiprocessing
    import threading

    import worldsim.world as world_module

    frames, actions = context(3)
    s = world.new_session(frames, actions, cache_mode="multilevel-fast", steps=1, cfg=1.0, seed=0)
    s.step(1)  # the parent's decoder thread exists now

    def child(queue):
        decoded_on = []
        decode = world.decode
        world.decode = lambda z: decoded_on.append(threading.get_ident()) or decode(z)
        shape = s.step(2).shape
        queue.put((shape, decoded_on == [threading.get_ident()], world_module.decode_alongside(torch.device("cpu"))))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the forked child's step hung")
    assert proc.exitcode == 0 and queue.get(timeout=5) == ((64, 64, 3), True, None)
    assert world_module.decode_alongside(torch.device("cpu")) is not None  # the parent's stays


@pytest.mark.skipif(usable_cores() < 2, reason="decoding alongside needs a second core")
def test_a_thread_still_playing_after_the_main_thread_ended_keeps_stepping():
    """A game loop on a thread of its own, the main thread's script done: the interpreter's shutdown
    first stops its thread pools (decode_alongside's among them), then waits for that thread. Its
    steps raised "cannot schedule new futures after shutdown"; they decode on their own thread now.
    A fresh interpreter, as only a real shutdown stops the pools."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    script = (
        "import threading, time, torch\n"
        "from test_cache import tiny_world, context\n"
        "torch.set_num_threads(1)\n"
        "world = tiny_world()\n"
        "s = world.new_session(*context(3), cache_mode='multilevel-fast', steps=1, cfg=1.0, seed=0)\n"
        "s.step(1)  # the decoder thread started\n"
        "def play():\n"
        "    time.sleep(0.5)  # the main thread has ended by now\n"
        "    frames = [s.step(2) for _ in range(3)]\n"
        "    print('played', len(frames), frames[-1].shape, flush=True)\n"
        "threading.Thread(target=play).start()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "played 3 (64, 64, 3)" in done.stdout, done.stderr[-2000:]
