"""The fast inference path stays exact: growable in-place KV buffers, chunked prefill, memoised
conditioning, batched CFG attention, merged L2 + L1 re-encoding (tiny preset, CPU, fp32)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from worldsim.cache import UncachedContext, make_context
from worldsim.model import FAR, PRESETS, KVBuffer, concat_kv
from worldsim.world import WorldModel

from tests.test_cache import W, context, rollout, tiny_world

torch.set_num_threads(1)


def test_memory_grows_by_the_l2_tokens_of_one_frame():
    world = tiny_world()
    cfg = world.far.config
    frames, actions = context(W + 2)
    s = world.new_session(frames, actions, steps=1, cfg=1.0, seed=0)
    per_frame = 2 * cfg.depth * cfg.width * 4 * cfg.context_tokens_per_frame  # k+v, fp32, 4 coarse tokens
    before = s.stats()
    for i in range(30):
        s.step_latent(i % 5)
        st = s.stats()
        assert st["cache_bytes"] - before["cache_bytes"] == per_frame
        assert st["l1_frames"] == W - 1 and st["l2_frames"] == before["l2_frames"] + 1
        # storage grows geometrically (amortised): never more than 1.5x the cache plus the room
        # the next frame's tokens need
        slack = 2 * cfg.depth * cfg.width * 4 * (64 + 2 * cfg.tokens_per_frame)
        assert before["cache_bytes"] <= st["cache_capacity_bytes"] <= 1.5 * st["cache_bytes"] + slack
        before = st
    # nothing else is kept per frame: history older than the window is dropped (the newest frame
    # is encoded with the next query, so until then one more latent waits)
    assert sum(x is not None for x in s.context.latents) == W
    s.context.flush()
    assert sum(x is not None for x in s.context.latents) == W - 1


def test_long_context_prefill_equals_frame_by_frame():
    world = tiny_world()
    frames, actions = context(40)
    bulk = make_context(world.far, "multilevel")
    bulk.prefill_frames_coarse, bulk.prefill_frames_fine = 7, 3  # several uneven chunks
    a = world.new_session(frames, actions, cache_mode=bulk, steps=2, cfg=1.5, seed=0)
    b = world.new_session(frames[:1], actions[:1], cache_mode="multilevel", steps=2, cfg=1.5, seed=0)
    for f, act in zip(frames[1:], actions[1:]):
        b.append(f, int(act))
    a.context.flush(), b.context.flush()
    ka, kb = a.context.kv, b.context.kv
    assert a.stats() == {**b.stats(), "cache_capacity_bytes": a.stats()["cache_capacity_bytes"]}
    for la, lb in zip(ka, kb):
        assert (la.keys - lb.keys).abs().max() <= 1e-4 and (la.values - lb.values).abs().max() <= 1e-4
    za = torch.stack([a.step_latent(i % 5) for i in range(3)])
    zb = torch.stack([b.step_latent(i % 5) for i in range(3)])
    assert (za - zb).abs().max() <= 1e-4
    # and the same as recomputing everything
    ref = world.new_session(frames, actions, cache_mode="none", steps=2, cfg=1.5, seed=0)
    zr = torch.stack([ref.step_latent(i % 5) for i in range(3)])
    assert (za - zr).abs().max() <= 1e-4


def test_kv_mode_chunked_prefill_equals_uncached():
    world = tiny_world()
    ctx = make_context(world.far, "kv")
    ctx.prefill_frames_fine = 3
    frames, actions = context(10)
    a = world.new_session(frames, actions, cache_mode=ctx, steps=2, cfg=1.5, seed=0)
    b = world.new_session(frames, actions, cache_mode=UncachedContext(world.far, layout="all-fine"), steps=2, cfg=1.5, seed=0)
    za = torch.stack([a.step_latent(i % 5) for i in range(3)])
    zb = torch.stack([b.step_latent(i % 5) for i in range(3)])
    assert (za - zb).abs().max() <= 1e-4


def test_fork_does_not_share_the_in_place_buffers():
    world = tiny_world()
    frames, actions = context(6)
    s = world.new_session(frames, actions, steps=2, cfg=1.5, seed=3)
    twin = s.fork()
    twin.step_latent(2)
    twin.step_latent(3)  # writes into its own buffers only
    replay = world.new_session(frames, actions, steps=2, cfg=1.5, seed=3)
    assert torch.equal(s.step_latent(1), replay.step_latent(1))
    assert torch.equal(s.step_latent(4), replay.step_latent(4))


@pytest.mark.parametrize("mode", ["multilevel", "multilevel-fast", "kv", "sliding"])
def test_a_fork_made_outside_inference_mode_flushes_and_steps_like_its_source(mode):
    """A caller's own code runs outside Session's inference mode: forking there and bringing the
    twin's cache up to date (context.flush()) raised "Inference tensors cannot be saved for backward"
    in multilevel-fast, whose clones became normal tensors beside its other inference tensors."""
    world = tiny_world()
    frames, actions = context(6)
    s = world.new_session(frames, actions, steps=2, cfg=1.0, seed=3, cache_mode=mode)
    s.step_latent(1)
    s.append_latent(s.predict_latent(2), 2)  # appended frames wait for the next query
    twin = s.fork()
    twin.context.flush()
    s.context.flush()  # (a flush encodes apart what the next query would have fused: the same, up to rounding)
    assert torch.equal(twin.step_latent(3), s.step_latent(3))


@pytest.mark.parametrize("mode", ["kv", "multilevel-fast", "multilevel"])
def test_a_fork_of_a_session_whose_cache_exists_does_not_touch_its_source(mode):
    """The fork test above forks before anything is cached (the multi-level modes encode lazily):
    here the source has generated, so its buffers exist, and the twin writes into its own."""
    world = tiny_world()
    frames, actions = context(6)
    s = world.new_session(frames, actions, steps=2, cfg=1.5, seed=3, cache_mode=mode)
    replay = world.new_session(frames, actions, steps=2, cfg=1.5, seed=3, cache_mode=mode)
    s.step_latent(0)
    replay.step_latent(0)
    twin = s.fork()
    twin.step_latent(2)
    twin.step_latent(3)
    assert torch.equal(s.step_latent(1), replay.step_latent(1))


def test_a_copied_or_pickled_cache_buffer_stays_an_inference_buffer():
    """copy.deepcopy or pickle of a Dream-v0 env copies its cache: those copies were normal tensors,
    so the copy's next flush ran outside inference mode (a clone already kept the flag)."""
    import copy
    import pickle

    with torch.inference_mode():
        buf = KVBuffer(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    for twin in (copy.deepcopy(buf), pickle.loads(pickle.dumps(buf))):
        assert twin.k.is_inference() and twin.v.is_inference() and twin.length == 3
        n = buf.length  # (the spare tail beyond it is uninitialised memory, NaN bits included)
        assert torch.equal(twin.k[:, :, :n], buf.k[:, :, :n]) and torch.equal(twin.v[:, :, :n], buf.v[:, :, :n])
    empty = pickle.loads(pickle.dumps(KVBuffer()))
    assert empty.k is None and empty.length == 0


def test_frames_kv_equals_separate_frame_kv_calls():
    world = tiny_world()
    far = world.far
    torch.manual_seed(0)
    x, a = torch.randn(1, 9, 4, 8, 8), torch.randint(0, 5, (1, 9))
    with torch.no_grad():
        l2 = None
        for f in range(5):
            l2 = concat_kv(l2, far.frame_kv(x[:, f : f + 1], a[:, f : f + 1], f, l2, coarse=True))
        new2 = far.frame_kv(x[:, 5:6], a[:, 5:6], 5, l2, coarse=True)
        new1 = far.frame_kv(x[:, 6:9], a[:, 6:9], 6, concat_kv(l2, new2))
        buf = [KVBuffer(k, v) for k, v in l2]
        got2, got1 = far.frames_kv([(x[:, 5:6], a[:, 5:6], None, 5, True), (x[:, 6:9], a[:, 6:9], None, 6, False)], buf)
    for ref, got in ((new2, got2), (new1, got1)):
        for (rk, rv), (gk, gv) in zip(ref, got):
            assert (rk - gk).abs().max() <= 1e-5 and (rv - gv).abs().max() <= 1e-5


def test_cfg_halves_share_the_cache_exactly():
    world = tiny_world()
    frames, actions = context(7)
    s = world.new_session(frames, actions, steps=1, cfg=1.5, seed=0)
    ctx = s.context
    ref = UncachedContext(world.far)
    ref.extend(world.encode(frames)[None], torch.as_tensor(actions)[None])
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.7])
    act = torch.tensor([2, world.far.null_action])
    with torch.no_grad():
        both = ctx.velocity(x, t, act)
        cond, null = ctx.velocity(x[:1], t[:1], act[:1]), ctx.velocity(x[1:], t[1:], act[1:])
        r = ref.velocity(x, t, act)
    assert (both - torch.cat([cond, null])).abs().max() <= 1e-5
    assert (both - r).abs().max() <= 1e-4


def test_memoised_conditioning_follows_weight_changes():
    world = tiny_world()
    frames, actions = context(5)
    z1, _ = rollout(world, "multilevel", k=5, n=2)
    twin = tiny_world()
    with torch.no_grad():  # in place, as an optimizer step or load_state_dict would
        for w in (world, twin):
            w.far.blocks[0].adaLN[1].weight.mul_(1.5)
            w.far.t_embed.mlp[0].bias.add_(0.1)
    z2, _ = rollout(world, "multilevel", k=5, n=2)  # memo from the first rollout must not be reused
    z3, _ = rollout(twin, "multilevel", k=5, n=2)  # fresh model, never memoised before the change
    assert (z1 - z2).abs().max() > 1e-4
    assert torch.equal(z2, z3)


def test_sliding_and_multilevel_keep_exact_over_many_slides():
    world = tiny_world()
    ml, _ = rollout(world, "multilevel", k=2, n=12)
    ref, _ = rollout(world, "none", k=2, n=12)
    assert (ml - ref).abs().max() <= 1e-4
    sl, _ = rollout(world, "sliding", k=2, n=12)
    refw, _ = rollout(world, UncachedContext(world.far, layout="window"), k=2, n=12)
    assert (sl - refw).abs().max() <= 1e-4


def test_multilevel_fast_is_the_plain_cache_over_the_window_plus_l2():
    world = tiny_world()
    # before the window slides it is exact
    fast, _ = rollout(world, "multilevel-fast", k=1, n=W - 2)
    ref, _ = rollout(world, "multilevel", k=1, n=W - 2)
    assert (fast - ref).abs().max() <= 1e-5
    # afterwards it is not (by design), but keeps the same cache layout and memory
    fast, sf = rollout(world, "multilevel-fast", k=6, n=8)
    ref, sr = rollout(world, "multilevel", k=6, n=8)
    assert sf.stats() == sr.stats()
    assert (fast - ref).abs().max() > 1e-4
    # its L1 is what a plain per-frame append against [L2 | L1] gives: check the newest frame's
    # keys equal a frame_kv of that frame against the cache before it
    ctx = sf.context
    ctx.flush()
    tpf = world.far.config.tokens_per_frame
    with torch.no_grad():
        lat, act, aug = ctx._history(ctx.num_frames - 1, ctx.num_frames)
        past = [(b.keys[:, :, : b.length - tpf], b.values[:, :, : b.length - tpf]) for b in ctx.kv]
        new = world.far.frame_kv(lat, act, ctx.num_frames - 1, past, aug=aug)
    for b, (k, v) in zip(ctx.kv, new):
        assert (b.keys[:, :, -tpf:] - k).abs().max() <= 1e-5



@pytest.mark.parametrize("window", [W, 3])  # 3: a single frame kept, which a count off by one drops
@pytest.mark.parametrize("cfg", [1.0, 1.5])  # the slide fused with the query's pass / on its own (CFG)
def test_multilevel_fast_keeps_the_windows_keys_and_values_as_they_were_when_it_slides(cfg, window):
    """multilevel-fast's definition (cache.py): L1 keys/values are computed once, when their frame is
    appended, and kept when the window slides. Checked on the buffers themselves: after each generated
    frame, the keys and values of every frame still in the window, and all of L2, are bit for bit
    those of the step before (the tests above compare its paths with each other, which a slide that
    kept the wrong tensors passes)."""
    world = tiny_world()
    if window != W:
        far = FAR(dataclasses.replace(PRESETS["tiny"], window=window))
        far.load_state_dict(world.far.state_dict())  # the window is a setting, not a weight
        world = WorldModel(world.autoencoder, far, world.action_names, device="cpu")
    frames, actions = context(6)
    s = world.new_session(frames, actions, cache_mode="multilevel-fast", steps=2, cfg=cfg, seed=0)
    ctx = s.context
    assert ctx.window == window
    tpf, cpf = world.far.config.tokens_per_frame, world.far.config.context_tokens_per_frame

    def snapshot():
        return ([(b.keys.clone(), b.values.clone()) for b in ctx.kv],
                ctx.l2_frames - ctx.l2_first, ctx.l1_start, ctx.l1_end)

    s.step_latent(1)
    before = snapshot()
    for a in (3, 4, 2):
        s.step_latent(a)
        after = snapshot()
        (old_kv, old_l2, old_start, old_end), (new_kv, new_l2, new_start, new_end) = before, after
        assert new_start == old_start + 1 and new_l2 == old_l2 + 1 and new_end == old_end + 1  # it slid
        kept = range(new_start, old_end)  # the window frames that were in L1 before the slide
        assert len(kept) == window - 2
        for (ok, ov), (nk, nv) in zip(old_kv, new_kv):
            for f in kept:
                o, n = old_l2 * cpf + (f - old_start) * tpf, new_l2 * cpf + (f - new_start) * tpf
                assert torch.equal(nk[:, :, n:n + tpf], ok[:, :, o:o + tpf])
                assert torch.equal(nv[:, :, n:n + tpf], ov[:, :, o:o + tpf])
            assert torch.equal(nk[:, :, :old_l2 * cpf], ok[:, :, :old_l2 * cpf])  # L2 only grows
            assert torch.equal(nv[:, :, :old_l2 * cpf], ov[:, :, :old_l2 * cpf])
        before = after


def test_split_attention_over_long_caches_is_the_same_softmax(monkeypatch):
    import worldsim.model as model

    world = tiny_world()
    outs = {}
    for split_min in (10**9, 8):  # never split / split from 8 cached tokens (tiny caches)
        monkeypatch.setattr(model, "SPLIT_ATTENTION_MIN", split_min)
        outs[split_min], _ = rollout(world, "multilevel", k=9, n=6)
    assert (outs[8] - outs[10**9]).abs().max() <= 1e-5
    ref, _ = rollout(world, "none", k=9, n=6)
    assert (outs[8] - ref).abs().max() <= 1e-4


def test_appended_frames_are_encoded_in_the_next_querys_pass_with_the_same_results(monkeypatch):
    """Without CFG, a frame appended to a multi-level cache (and, in `multilevel`, the window
    re-encoding it triggers) is computed in the same forward pass as the next frame's first
    denoising step. The frames equal those of encoding each appended frame at once (flush), with
    and without the split cache / new-token attention; `multilevel` still equals `none`."""
    import worldsim.model as model

    world = tiny_world()
    fused_calls = []
    original = world.far.frames_kv_and_velocity
    monkeypatch.setattr(world.far, "frames_kv_and_velocity", lambda *a, **k: fused_calls.append(1) or original(*a, **k))

    def run(mode, flush_each_frame: bool, n: int = 9):
        frames, actions = context(6)
        s = world.new_session(frames, actions, cache_mode=mode, steps=2, cfg=1.0, seed=0)
        out = []
        for a in np.random.default_rng(1).integers(0, 5, n):
            out.append(s.step_latent(int(a)))
            if flush_each_frame:
                s.context.flush()
        return torch.stack(out)

    for split_min in (10**9, 8):  # never split / split from 8 cached tokens
        monkeypatch.setattr(model, "SPLIT_ATTENTION_MIN", split_min)
        for mode in ("multilevel", "multilevel-fast", "sliding"):
            fused_calls.clear()
            eager = run(mode, flush_each_frame=True)
            assert not fused_calls
            fused = run(mode, flush_each_frame=False)
            assert len(fused_calls) == 9 - 1  # every frame after the first (the context is prefilled)
            assert (fused - eager).abs().max() <= 1e-5, mode
        ref = run("none", flush_each_frame=False)
        assert (run("multilevel", flush_each_frame=False) - ref).abs().max() <= 1e-4
