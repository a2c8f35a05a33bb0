"""bf16 inference on CPU (WorldModel(precision="bf16"), play's default where the CPU has native
bf16): the transformer's weights and KV cache in bfloat16, the autoencoder in fp32, frames close
to fp32's and as reproducible (tiny preset, CPU). precision="bf16-kv" (play's default elsewhere):
fp32 weights, the KV cache stored and attended in bfloat16."""
from __future__ import annotations

import pytest
import torch

import worldsim.world as world_module
from worldsim.world import WorldModel, resolve_precision

from tests.test_cache import ACTIONS, context, rollout, tiny_world

torch.set_num_threads(1)


def bf16_world(seed: int = 0) -> WorldModel:
    w = tiny_world(seed)  # its own FAR: the bf16 WorldModel casts the module in place
    return WorldModel(w.autoencoder, w.far, ACTIONS, device="cpu", precision="bf16")


@pytest.mark.parametrize("mode", ["multilevel", "multilevel-fast"])
def test_bf16_stores_the_transformer_and_its_cache_in_half_the_bytes_and_stays_close_to_fp32(mode):
    exact, half = tiny_world(), bf16_world()
    assert half.precision == "bf16" and exact.precision == "fp32"
    assert {p.dtype for p in half.far.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.autoencoder.parameters()} == {torch.float32}

    z32, s32 = rollout(exact, mode, k=6, n=10, steps=3, cfg=1.0)
    z16, s16 = rollout(half, mode, k=6, n=10, steps=3, cfg=1.0)
    assert z16.dtype == torch.float32  # sessions hand back fp32 latents either way
    assert s16.context.kv[0].k.dtype == torch.bfloat16
    s32.context.flush(), s16.context.flush()
    st32, st16 = s32.stats(), s16.stats()
    assert st16["l2_tokens"] == st32["l2_tokens"] > 0
    assert st16["cache_bytes"] * 2 == st32["cache_bytes"]
    # not bit-exact (bf16 keeps 8 significant bits), but the same frames within 1% after 10
    # generated frames fed back into the cache
    assert not torch.equal(z16, z32)
    assert (z16 - z32).abs().max() <= 0.01 * z32.abs().max()
    # and reproducible: the same seed gives the same frames
    again, _ = rollout(bf16_world(), mode, k=6, n=10, steps=3, cfg=1.0)
    assert torch.equal(again, z16)


def test_bf16_with_guidance_and_frames_decode_like_fp32():
    exact, half = tiny_world(), bf16_world()
    z32, _ = rollout(exact, "multilevel", k=6, n=4, steps=2, cfg=1.5)
    z16, _ = rollout(half, "multilevel", k=6, n=4, steps=2, cfg=1.5)
    assert (z16 - z32).abs().max() <= 0.01 * z32.abs().max()
    f32, f16 = exact.decode(z32), half.decode(z16)
    assert f16.dtype == f32.dtype and f16.shape == f32.shape
    assert abs(f16.astype(int) - f32.astype(int)).mean() <= 2.0  # uint8 levels


def test_bf16_long_caches_split_their_attention_like_fp32(monkeypatch):
    """Long caches (here from 8 cached tokens) attend to the cache and to the new tokens in two
    flash passes merged by log-sum-exp, in bf16 as in fp32 (CFG-batched and multi-frame masked calls)."""
    import worldsim.model as model

    calls = []
    split = model.KVBuffer._attend_split
    monkeypatch.setattr(model.KVBuffer, "_attend_split", lambda self, *a: calls.append(1) or split(self, *a))
    outs = {}
    for split_min in (10**9, 8):
        monkeypatch.setattr(model, "SPLIT_ATTENTION_MIN", split_min)
        outs[split_min], s = rollout(bf16_world(), "multilevel", k=9, n=6, steps=2, cfg=1.5)
        assert s.context.kv[0].k.dtype == torch.bfloat16
    assert calls, "the split path never ran"
    scale = outs[10**9].abs().max()
    assert (outs[8] - outs[10**9]).abs().max() <= 0.01 * scale
    exact, _ = rollout(tiny_world(), "multilevel", k=9, n=6, steps=2, cfg=1.5)
    assert (outs[8] - exact).abs().max() <= 0.01 * exact.abs().max()


def test_fp32_runs_without_autocast_and_a_bf16_copy_leaves_the_fp32_model_alone():
    from worldsim.model import autocast_for

    exact = tiny_world()
    with autocast_for(exact.far):
        assert not torch.is_autocast_enabled("cpu")
    half = WorldModel(exact.autoencoder, exact.far, ACTIONS, device="cpu", precision="bf16")
    with autocast_for(half.far):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert {p.dtype for p in exact.far.parameters()} == {torch.float32}  # not cast in place
    assert {p.dtype for p in half.far.parameters()} == {torch.bfloat16}


def test_a_bf16_world_model_refuses_to_save_its_rounded_weights(tmp_path):
    with pytest.raises(ValueError, match="precision='fp32'"):
        bf16_world().save(tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(world_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(world_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "bf16-kv"  # emulated bf16 matmuls are slower than fp32
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16-kv", cpu) == "bf16-kv"
    # CUDA runs bf16 autocast whatever is asked, and says so; other devices run fp32
    assert resolve_precision("auto", torch.device("cuda")) == resolve_precision("fp32", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", torch.device("mps")) == "fp32"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", cpu)


def test_a_bf16_model_without_a_cache_norms_q_and_k_without_a_dtype_mismatch():
    """Cache mode "none" runs the training path (FAR.forward) on the bf16 weights: its q/k norms
    must take bf16 inputs, or RMSNorm warns and falls back to its unfused kernel."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, _ = rollout(bf16_world(), "none", k=6, n=2, steps=2, cfg=1.0)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("mode,cfg", [("multilevel", 1.0), ("multilevel-fast", 1.0), ("multilevel", 1.5),
                                      ("kv", 1.0), ("sliding", 1.5)])
def test_bf16_kv_keeps_fp32_weights_and_stores_the_cache_in_half_the_bytes_close_to_fp32(mode, cfg):
    exact = tiny_world()
    kv16 = WorldModel(exact.autoencoder, exact.far, ACTIONS, device="cpu", precision="bf16-kv")
    assert kv16.far is exact.far  # the weights are not copied, nor cast: matmuls stay fp32
    assert {p.dtype for p in kv16.far.parameters()} == {torch.float32}

    z32, s32 = rollout(exact, mode, k=6, n=10, steps=3, cfg=cfg)
    z16, s16 = rollout(kv16, mode, k=6, n=10, steps=3, cfg=cfg)
    assert z16.dtype == torch.float32
    s32.context.flush(), s16.context.flush()
    assert {b.k.dtype for b in s16.context.kv} == {b.v.dtype for b in s16.context.kv} == {torch.bfloat16}
    assert {b.k.dtype for b in s32.context.kv} == {torch.float32}
    assert s16.stats()["cache_bytes"] * 2 == s32.stats()["cache_bytes"] > 0
    assert not torch.equal(z16, z32)
    assert (z16 - z32).abs().max() <= 0.01 * z32.abs().max()
    again, _ = rollout(WorldModel(exact.autoencoder, exact.far, ACTIONS, device="cpu", precision="bf16-kv"), mode,
                       k=6, n=10, steps=3, cfg=cfg)
    assert torch.equal(again, z16)


def test_bf16_kv_long_caches_split_their_attention_like_fp32(monkeypatch):
    """The split attention over long caches (here from 8 cached tokens) in a bf16 cache of fp32
    weights: CFG-batched and multi-frame masked calls, close to the unsplit result and to fp32."""
    import worldsim.model as model

    calls = []
    split = model.KVBuffer._attend_split
    monkeypatch.setattr(model.KVBuffer, "_attend_split", lambda self, *a: calls.append(1) or split(self, *a))
    exact = tiny_world()
    kv16 = WorldModel(exact.autoencoder, exact.far, ACTIONS, device="cpu", precision="bf16-kv")
    outs = {}
    for split_min in (10**9, 8):
        monkeypatch.setattr(model, "SPLIT_ATTENTION_MIN", split_min)
        outs[split_min], s = rollout(kv16, "multilevel", k=9, n=6, steps=2, cfg=1.5)
        assert s.context.kv[0].k.dtype == torch.bfloat16
    assert calls, "the split path never ran"
    assert (outs[8] - outs[10**9]).abs().max() <= 0.01 * outs[10**9].abs().max()
    monkeypatch.setattr(model, "SPLIT_ATTENTION_MIN", 10**9)
    z32, _ = rollout(exact, "multilevel", k=9, n=6, steps=2, cfg=1.5)
    assert (outs[8] - z32).abs().max() <= 0.01 * z32.abs().max()


def test_a_session_without_a_cache_says_it_runs_fp32_under_bf16_kv():
    """bf16-kv's only bf16 is the KV cache: mode none stores none, so its session runs the fp32
    world's frames bit for bit. Its session (so the Dream env's info and play's benchmark line)
    said bf16-kv; now each session says what it runs."""
    exact = tiny_world()
    kv16 = WorldModel(exact.autoencoder, exact.far, ACTIONS, device="cpu", precision="bf16-kv")
    z32, s32 = rollout(exact, "none", k=5, n=2, steps=2, cfg=1.5)
    z16, s16 = rollout(kv16, "none", k=5, n=2, steps=2, cfg=1.5)
    assert torch.equal(z16, z32)
    assert s16.precision == s32.precision == "fp32"
    _, cached = rollout(kv16, "sliding", k=5, n=1, steps=2, cfg=1.0)
    assert cached.precision == "bf16-kv" and cached.context.kv[0].k.dtype == torch.bfloat16
    assert cached.fork().precision == "bf16-kv"


def test_a_context_object_runs_the_precision_of_its_world():
    """new_session(cache_mode=make_context(world.far, mode)): the context kept its own kv_dtype
    (None: the transformer's, fp32), so a bf16-kv world's session silently ran fp32. A context with
    no frames and no dtype of its own takes the world's; one that chose another dtype, or already
    holds frames in another, is refused by name rather than run in a precision the world does not say."""
    from worldsim.cache import UncachedContext, make_context

    exact = tiny_world()
    kv16 = WorldModel(exact.autoencoder, exact.far, ACTIONS, device="cpu", precision="bf16-kv")
    frames, actions = context(5)
    by_name = kv16.new_session(frames, actions, cache_mode="multilevel", steps=2, cfg=1.5, seed=0)
    given = kv16.new_session(frames, actions, cache_mode=make_context(kv16.far, "multilevel"), steps=2, cfg=1.5, seed=0)
    assert given.precision == "bf16-kv"
    assert torch.equal(torch.stack([given.step_latent(a) for a in (1, 3)]),
                       torch.stack([by_name.step_latent(a) for a in (1, 3)]))  # the frames of the mode's name
    assert given.context.kv[0].k.dtype == torch.bfloat16
    # an fp32 world leaves a context without a dtype as it is: fp32
    fp32 = exact.new_session(frames, actions, cache_mode=make_context(exact.far, "kv"), steps=2, seed=0)
    fp32.step_latent(1)
    assert fp32.precision == "fp32" and fp32.context.kv[0].k.dtype == torch.float32
    # no cache, nothing to store: runs (fp32, and says so)
    assert kv16.new_session(frames, actions, cache_mode=UncachedContext(kv16.far), steps=2).precision == "fp32"

    with pytest.raises(ValueError, match=r"cache_mode: this context stores its cache in torch\.float32, but this "
                                         r"WorldModel's precision bf16-kv stores it in torch\.bfloat16"):
        kv16.new_session(frames, actions, cache_mode=make_context(kv16.far, "kv", kv_dtype=torch.float32))
    with pytest.raises(ValueError, match=r"stores its cache in torch\.bfloat16, but this WorldModel's precision fp32 "
                                         r"stores it in the transformer's dtype"):
        exact.new_session(frames, actions, cache_mode=make_context(exact.far, "kv", kv_dtype=torch.bfloat16))
    used = exact.new_session(frames, actions, cache_mode="kv", steps=2).context  # holds 5 frames in fp32
    with pytest.raises(ValueError, match=r"stores its cache in the transformer's dtype and already holds 5 frames"):
        kv16.new_session(frames, actions, cache_mode=used)
    assert used.num_frames == 5 and used.kv_dtype is None  # a refused context is left as it was
