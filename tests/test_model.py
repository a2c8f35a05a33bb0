"""FAR transformer, autoencoder and training objective (tiny presets, CPU, fp32)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worldsim.autoencoder import AE_PRESETS, Autoencoder, AutoencoderConfig, frames_to_tensor, tensor_to_frames
from worldsim.model import FAR, PRESETS, FARConfig, KVBuffer, apply_rope, concat_kv, memory_time_positions
from worldsim.objective import ObjectiveConfig, training_loss

# CI clones the repository beside shared/ (see conftest.py): found relative to the checkout
DMLAB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dmlab_example_300f.npz"


def _dmlab() -> Path:
    if not DMLAB.exists():  # as conftest's dmlab_example_path: a skip naming the file, not an error
        pytest.skip(f"{DMLAB} not found (shared/ must sit beside the checkout)")
    return DMLAB


# The 2 CPU cores are shared: two spinning OpenMP threads under contention run ~20x slower than one.
torch.set_num_threads(1)


def random_far(cfg: FARConfig | None = None, seed: int = 0) -> FAR:
    """A tiny FAR whose zero-initialised (adaLN-Zero, output) layers are randomised too, so
    that every input can influence every output the attention mask allows."""
    torch.manual_seed(seed)
    far = FAR(cfg or PRESETS["tiny"]).eval()
    with torch.no_grad():
        for p in far.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return far


def test_presets_tokens_per_frame():
    assert PRESETS["tiny"].tokens_per_frame == 16 and PRESETS["tiny"].context_tokens_per_frame == 4
    assert PRESETS["small"].tokens_per_frame == 16
    b = PRESETS["far-b-long"]
    assert (b.depth, b.width, b.heads, b.window) == (12, 768, 12, 16)
    assert b.tokens_per_frame == 64 and b.context_tokens_per_frame == 4
    with pytest.raises(ValueError):
        FARConfig(latent_size=8, patch_size=3)


def test_output_shape_is_the_fine_window():
    far = random_far()
    x, t, a = torch.randn(2, 7, 4, 8, 8), torch.rand(2, 7), torch.randint(0, 5, (2, 7))
    assert far(x, t, a).shape == (2, 4, 4, 8, 8)  # window 4: 3 coarse + 4 fine frames
    assert far(x[:, :3], t[:, :3], a[:, :3]).shape == (2, 3, 4, 8, 8)


@pytest.mark.parametrize("window", [None, 9])  # long-short layout, and every frame fine
def test_frame_causality(window):
    far = random_far()
    T = 9
    x, a = torch.randn(1, T, 4, 8, 8), torch.randint(0, 5, (1, T))
    t = torch.rand(1, T)
    t[:, :4] = -1  # some clean context
    with torch.no_grad():
        base = far(x, t, a, window=window)
        first_fine = T - base.shape[1]
        for k in range(first_fine, T):  # change frame k: latents, then action
            x2 = x.clone()
            x2[:, k] += 1.0
            a2 = a.clone()
            a2[:, k] = (a2[:, k] + 1) % 5
            for xs, as_ in ((x2, a), (x, a2)):
                out = far(xs, t, as_, window=window)
                j = k - first_fine
                assert torch.equal(out[:, :j], base[:, :j]), f"frame {k} leaked into earlier frames"
                assert (out[:, j:] - base[:, j:]).abs().max() > 1e-4  # and it does matter later
        # a coarse (long-term) frame influences the fine window
        if first_fine > 0:
            x3 = x.clone()
            x3[:, 0] += 1.0
            assert (far(x3, t, a, window=window) - base).abs().max() > 1e-4


def test_cached_calls_match_uncached_forward():
    far = random_far()
    x, a = torch.randn(1, 9, 4, 8, 8), torch.randint(0, 5, (1, 9))
    t = torch.full((1, 9), -1.0)
    t[:, -1] = 0.7
    with torch.no_grad():
        ref = far(x, t, a)[:, -1]  # coarse 0..4, fine 5..8
        l2 = None
        for f in range(5):  # L2 built one frame at a time, as frames leave the window
            l2 = concat_kv(l2, far.frame_kv(x[:, f : f + 1], a[:, f : f + 1], f, l2, coarse=True))
        l1 = far.frame_kv(x[:, 5:8], a[:, 5:8], 5, l2)
        got = far.predict_frame(x[:, 8], t[:, 8], a[:, 8], 8, concat_kv(l2, l1))
        assert l2[0][0].shape[2] == 5 * 4 and l1[0][0].shape[2] == 3 * 16
    assert (got - ref).abs().max() <= 1e-5


def test_memory_time_positions_spread_a_long_memory_over_the_span():
    frames = torch.arange(0.0, 284.0, dtype=torch.float64)  # the eval's longest memory: frames 0..283, query 299
    pos = memory_time_positions(frames, 0, 283, 299, 95)
    assert pos[0] == 299 - 95 and pos[-1] == 283  # the oldest at the span, the newest where it is
    steps = pos.diff()
    assert (steps > 0).all() and torch.allclose(steps, steps[0].expand_as(steps))  # in order, evenly
    # within reach, or without a span: the frame indices
    assert torch.equal(memory_time_positions(frames[:40], 0, 39, 80, 95), frames[:40])
    assert torch.equal(memory_time_positions(frames, 0, 283, 299, 0), frames)
    # a bounded memory that forgot frames 0..99 spreads from its oldest kept frame
    kept = memory_time_positions(frames[100:], 100, 283, 299, 95)
    assert kept[0] == 204 and kept[-1] == 283


def test_memory_span_must_exceed_the_window():
    tiny = PRESETS["tiny"]
    for bad in (-1, 1, tiny.window):
        with pytest.raises(ValueError, match="memory_span"):
            dataclasses.replace(tiny, memory_span=bad)
    assert dataclasses.replace(tiny, memory_span=tiny.window + 1).memory_span == tiny.window + 1


def test_memory_span_shows_cached_memory_keys_at_their_spread_positions():
    """The cache keeps memory keys rotated to their frame indices; under memory_span a query sees each
    at the position memory_time_positions gives it: the attention of keys rotated there from scratch."""
    cfg = dataclasses.replace(PRESETS["tiny"], memory_span=6)  # window 4
    far = random_far(cfg)
    n, q = 12, 13  # memory frames 0..11 seen from frame 13: reaching 13 back, spread over 7..11
    x, a, t = torch.randn(1, q + 1, 4, 8, 8), torch.randint(0, 5, (1, q + 1)), torch.tensor([0.6])
    with torch.no_grad():
        l2 = far.frame_kv(x[:, :n], a[:, :n], 0, None, coarse=True)
        at_index = far._positions(0, n, cfg.context_patch_size, x.device)
        spread = at_index.clone()
        spread[:, 0] = memory_time_positions(at_index[:, 0], 0, n - 1, q, cfg.memory_span)
        assert spread[0, 0] == q - 6
        moved = [(apply_rope(apply_rope(k, far.rope(-at_index)), far.rope(spread)), v) for k, v in l2]
        want = far.predict_frame(x[:, q], t, a[:, q], q, moved)
        for past in (l2, [KVBuffer(k, v) for k, v in l2]):  # both cache forms
            got = far.predict_frame(x[:, q], t, a[:, q], q, past, memory=(0, n))
            assert (got - want).abs().max() <= 1e-5
        at_indices = far.predict_frame(x[:, q], t, a[:, q], q, l2)  # without `memory`: left where it is
        assert (at_indices - want).abs().max() > 1e-3


def test_a_turned_memory_is_not_reused_once_the_window_behind_it_changes():
    """The turned copy of the memory keys is kept for a frame's denoising steps; a window re-encoded
    in place (the same token count, other keys) must not be served from it."""
    cfg = dataclasses.replace(PRESETS["tiny"], memory_span=6)
    far = random_far(cfg)
    n, q = 12, 15
    x, a, t = torch.randn(2, q + 1, 4, 8, 8), torch.randint(0, 5, (2, q + 1)), torch.tensor([0.6])
    with torch.no_grad():
        l2 = far.frame_kv(x[:1, :n], a[:1, :n], 0, None, coarse=True)
        l1 = [far.frame_kv(x[i : i + 1, n:q], a[i : i + 1, n:q], n, l2, memory=(0, n)) for i in (0, 1)]
        cache = [KVBuffer(k, v) for k, v in concat_kv(l2, l1[0])]
        far.predict_frame(x[:1, q], t, a[:1, q], q, cache, memory=(0, n))
        for buf, (k, v) in zip(cache, l1[1]):
            buf.truncate(buf.length - k.shape[2])
            buf.append(k, v)
        got = far.predict_frame(x[:1, q], t, a[:1, q], q, cache, memory=(0, n))
        fresh = far.predict_frame(x[:1, q], t, a[:1, q], q, [KVBuffer(k, v) for k, v in concat_kv(l2, l1[1])],
                                  memory=(0, n))
    assert torch.equal(got, fresh)


def test_context_labels_take_the_fars_scale_and_older_configs_keep_theirs():
    """New models label clean / long-term context as the FAR code does on its 0..1000 scale (-1 / -2,
    so -0.001 / -0.002 of t in [0, 1]); a config saved without the labels predates that and trained
    with -1 / -2 of t, so it loads with those (a new default must not change what old weights see)."""
    assert (FARConfig().clean_t, FARConfig().long_context_t) == (-0.001, -0.002)
    old = {k: v for k, v in FARConfig().to_dict().items() if k not in ("clean_t", "long_context_t")}
    assert (FARConfig.from_dict(old).clean_t, FARConfig.from_dict(old).long_context_t) == (-1.0, -2.0)
    stored = FARConfig(clean_t=-1.0, long_context_t=-2.0).to_dict()
    assert FARConfig.from_dict(stored) == FARConfig(clean_t=-1.0, long_context_t=-2.0)


def test_long_term_frames_carry_their_own_label_and_noised_context_its_level():
    """Frames older than the window are labelled long_context_t, not clean_t: the shipped weights
    learned their memory under that label. A context frame's noise level (aug: training's context
    noise, play's generated_noise) reaches the model too; models trained with it tell their own
    frames from real ones by it."""
    window = PRESETS["tiny"].window
    frames = window + 3
    x, a = torch.randn(1, frames, 4, 8, 8), torch.randint(0, 5, (1, frames))
    t = torch.full((1, frames), PRESETS["tiny"].clean_t)
    t[:, -1] = 0.6
    far = random_far()
    same_label = random_far(dataclasses.replace(PRESETS["tiny"], long_context_t=PRESETS["tiny"].clean_t))
    with torch.no_grad():
        assert (far(x, t, a) - same_label(x, t, a)).abs().max() > 1e-4  # the same weights, another label
        aug = torch.zeros(1, frames)
        aug[:, -2] = 0.3
        assert (far(x, t, a, aug)[:, -1] - far(x, t, a)[:, -1]).abs().max() > 1e-4


def test_a_plain_kv_cache_serves_cfg_halves_of_a_batch_of_two():
    """A (k, v) tuple cache of batch B under a CFG-doubled query batch 2B: each half sees its own
    rows (it raised for B > 1), as with each half predicted on its own."""
    far = random_far()
    x, a = torch.randn(2, 9, 4, 8, 8), torch.randint(0, 5, (2, 9))
    with torch.no_grad():
        l1 = far.frame_kv(x[:, :8], a[:, :8], 0, None)
        t = torch.tensor([0.7, 0.3])
        null = torch.full((2,), far.config.num_actions)  # the null class
        both = far.predict_frame(torch.cat([x[:, 8], x[:, 8]]), torch.cat([t, t]), torch.cat([a[:, 8], null]), 8, l1)
        cond = far.predict_frame(x[:, 8], t, a[:, 8], 8, l1)
        uncond = far.predict_frame(x[:, 8], t, null, 8, l1)
    assert (both - torch.cat([cond, uncond])).abs().max() <= 1e-5


def test_inference_without_the_modulation_memo_predicts_the_same(monkeypatch):
    """Off the CPU (a GPU) inference computes the adaLN modulations as training does instead of
    memoising them, to keep device-to-host reads out of every forward. Forced here on the CPU:
    through the multi-level cache (coarse, clean, noise-labelled and noisy frames, several
    actions), both ways predict what the training forward does."""
    far = random_far()
    x, a = torch.randn(2, 9, 4, 8, 8), torch.randint(0, 5, (2, 9))
    t = torch.full((2, 9), -1.0)
    t[:, -1] = torch.tensor([0.7, 0.3])
    aug = torch.zeros(2, 9)
    aug[:, 6] = 0.25

    with torch.no_grad():
        reference = far(x, t, a, aug)[:, -1]  # the training path: never memoised

    def prediction() -> torch.Tensor:
        with torch.no_grad():
            l2 = None
            for f in range(5):
                l2 = concat_kv(l2, far.frame_kv(x[:, f : f + 1], a[:, f : f + 1], f, l2, coarse=True))
            l1 = far.frame_kv(x[:, 5:8], a[:, 5:8], 5, l2, aug=aug[:, 5:8])
            return far.predict_frame(x[:, 8], t[:, 8], a[:, 8], 8, concat_kv(l2, l1))

    memoised = prediction()
    assert far.__dict__.get("_mods_memo")  # the CPU default memoises
    far.__dict__.pop("_mods_memo")
    monkeypatch.setattr(FAR, "_memoize_mods", staticmethod(lambda device: False))
    direct = prediction()
    assert "_mods_memo" not in far.__dict__
    assert (memoised - reference).abs().max() <= 1e-5
    assert (direct - reference).abs().max() <= 1e-5


def test_objective_backward_reaches_coarse_projections():
    far = random_far().train()
    loss, stats = training_loss(
        far, torch.randn(2, 7, 4, 8, 8), torch.randint(0, 5, (2, 7)), torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert torch.isfinite(loss) and stats["coarse_frames"].item() == 3
    assert far.embed_coarse.weight.grad.abs().sum() > 0
    assert far.blocks[0].attn_coarse.qkv.weight.grad.abs().sum() > 0
    # with long context every parameter is used (DDP needs no find_unused_parameters)
    assert [n for n, p in far.named_parameters() if p.grad is None] == []
    assert stats["noisy_frames"].item() >= 2  # the last frame of each sample is always noisy


def test_random_context_length_always_keeps_a_coarse_frame():
    far = random_far()
    W = far.config.window
    x, a = torch.randn(2, W + 2, 4, 8, 8), torch.randint(0, 5, (2, W + 2))
    cfg = ObjectiveConfig(random_context_length=True)
    lengths = set()
    for seed in range(12):
        far.zero_grad(set_to_none=True)
        loss, stats = training_loss(far, x, a, torch.Generator().manual_seed(seed), cfg)
        loss.backward()
        lengths.add(int(stats["coarse_frames"]))
        assert [n for n, p in far.named_parameters() if p.grad is None] == []
    assert lengths == {1, 2}  # both lengths drawn, never the window alone


def test_short_context_batches_have_no_long_term_part_and_still_reach_every_parameter():
    """short_context_prob=1: every batch keeps only its last L ~ U[2, window] frames, all fine
    (the start of play), and every parameter still reaches the loss, the coarse ones through a
    zero term, so DDP ranks that draw different lengths agree. Prob 0 is bit-identical."""
    far = random_far().train()
    model = RecordingFAR(far)
    W = far.config.window
    T = W + 3
    x, a = torch.randn(2, T, 4, 8, 8), torch.randint(0, 5, (2, T))
    cfg = ObjectiveConfig(random_context_length=True, short_context_prob=1.0, action_dropout=0.0)
    lengths = set()
    for seed in range(16):
        far.zero_grad(set_to_none=True)
        model.calls.clear()
        loss, stats = training_loss(model, x, a, torch.Generator().manual_seed(seed), cfg)
        loss.backward()
        (x_in, _, a_in, _), = model.calls
        L = x_in.shape[1]
        lengths.add(L)
        assert stats["coarse_frames"].item() == 0 and stats["short_context"].item() == 1.0
        assert torch.equal(a_in, a[:, T - L :])  # the last L frames: the end of the sequence
        assert torch.isfinite(loss)
        assert [n for n, p in far.named_parameters() if p.grad is None] == []
        assert far.embed_coarse.weight.grad.abs().sum() == 0  # present, but the batch had no coarse token
    assert lengths == set(range(2, W + 1))

    base, _ = training_loss(far, x, a, torch.Generator().manual_seed(4), ObjectiveConfig(random_context_length=True))
    zero, _ = training_loss(far, x, a, torch.Generator().manual_seed(4),
                            ObjectiveConfig(random_context_length=True, short_context_prob=0.0))
    assert torch.equal(base, zero)


def test_objective_is_reproducible_with_a_generator():
    far = random_far()
    x, a = torch.randn(2, 6, 4, 8, 8), torch.randint(0, 5, (2, 6))
    cfg = ObjectiveConfig(random_context_length=True)
    l1, _ = training_loss(far, x, a, torch.Generator().manual_seed(3), cfg)
    l2, _ = training_loss(far, x, a, torch.Generator().manual_seed(3), cfg)
    assert torch.equal(l1, l2)


class RecordingFAR(torch.nn.Module):
    """Wraps a FAR and keeps the inputs and outputs of every call."""

    def __init__(self, far: FAR):
        super().__init__()
        self.far, self.config, self.null_action, self.calls = far, far.config, far.null_action, []

    def forward(self, x, t, actions, aug=None):
        v = self.far(x, t, actions, aug)
        self.calls.append((x.clone(), t.clone(), actions.clone(), v.detach().clone()))
        return v


def test_self_context_feeds_the_model_its_own_reconstructions_and_keeps_the_targets():
    """self_context_prob=1: a first pass (no gradients) reconstructs every window frame from a
    noised copy; the training pass then sees those reconstructions, not the ground truth, as its
    clean window context, while its noisy frames (the loss targets) are still built from the
    ground truth. With prob 0 the model is called once, as before."""
    x, a = torch.randn(2, 9, 4, 8, 8), torch.randint(0, 5, (2, 9))
    W = PRESETS["tiny"].window
    Tc = 9 - W
    plain = RecordingFAR(random_far())
    training_loss(plain, x, a, torch.Generator().manual_seed(1), ObjectiveConfig(context_noise_prob=0.0))
    assert len(plain.calls) == 1

    model = RecordingFAR(random_far())
    cfg = ObjectiveConfig(context_noise_prob=0.0, action_dropout=0.0, self_context_prob=1.0)
    loss, stats = training_loss(model, x, a, torch.Generator().manual_seed(1), cfg)
    loss.backward()
    assert len(model.calls) == 2 and torch.isfinite(loss)
    (x1, t1, _, v1), (x2, t2, _, _) = model.calls
    u = t1[:, Tc:]  # the first pass: window frames at their own levels, coarse frames clean
    assert (u >= 0).all() and (u <= cfg.self_context_level).all()
    assert torch.all(t1[:, :Tc] == model.config.clean_t)
    x0_hat = x1[:, Tc:] - u[..., None, None, None] * v1
    clean = t2[:, Tc:] == model.config.clean_t  # the training pass's clean window frames
    assert clean.any() and (~clean).any()
    assert torch.allclose(x2[:, Tc:][clean], x0_hat[clean], atol=1e-6)
    assert not torch.allclose(x2[:, Tc:][clean], x[:, Tc:][clean])
    # noisy frames: level*noise + (1-level)*x0 with the ground-truth x0 -> correlate with x, not x0_hat
    noisy = ~clean
    lv = t2[:, Tc:][noisy][:, None, None, None]
    gt_part = ((x2[:, Tc:][noisy] - (1 - lv) * x[:, Tc:][noisy]) / lv)  # = the noise if built from GT
    hat_part = ((x2[:, Tc:][noisy] - (1 - lv) * x0_hat[noisy]) / lv)
    assert gt_part.std() < hat_part.std()
    assert torch.equal(x2[:, :Tc], x[:, :Tc])  # coarse context stays the ground truth
    assert stats["self_frac"].item() == pytest.approx(clean.float().mean().item())


def dmlab_pseudo_latents(B: int = 4, T: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Real DMLab frames (every 10th) as fixed 8x8x4 "latents": 8x8 average pool + a grey channel."""
    d = np.load(_dmlab())
    idx = slice(0, B * T * 10, 10)
    v = frames_to_tensor(d["video"][idx])  # (B*T, 3, 64, 64)
    z = F.avg_pool2d(v, 8)
    z = torch.cat([z, z.mean(1, keepdim=True)], dim=1)  # (B*T, 4, 8, 8)
    z = (z - z.mean()) / z.std()
    return z.view(B, T, 4, 8, 8), torch.from_numpy(d["actions"][idx]).view(B, T)


def test_tiny_far_overfits_a_few_episodes():
    torch.manual_seed(0)
    far = FAR(PRESETS["tiny"]).train()
    latents, actions = dmlab_pseudo_latents()  # 4 episodes of 6 frames: 2 coarse + 4 fine
    opt = torch.optim.AdamW(far.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    cfg = ObjectiveConfig(action_dropout=0.0)
    losses = []
    for _ in range(150):
        loss, _ = training_loss(far, latents, actions, gen, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = np.mean(losses[:10]), np.mean(losses[-10:])
    assert end < 0.5 * start, (start, end)


def test_frames_tensor_roundtrip():
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(tensor_to_frames(x), frames)


def test_autoencoder_shapes_scale_and_learning():
    data = np.load(_dmlab())
    frames = data["video"][::75][:4]  # 4 real DMLab frames
    assert data["actions"].max() <= 2
    x = frames_to_tensor(frames)
    torch.manual_seed(0)
    ae = Autoencoder(AE_PRESETS["tiny"])
    z = ae.encode(x, normalize=False)
    assert z.shape == (4, 4, 8, 8)
    ae.calibrate_scale(z)
    assert abs(ae.encode(x).std().item() - 1.0) < 1e-3
    assert ae.decode(ae.encode(x)).shape == x.shape
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, stats = ae.reconstruction_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    mse_only, stats = ae.reconstruction_loss(x, kind="mse")
    assert torch.allclose(mse_only, stats["mse"]) and mse_only < loss
    with pytest.raises(ValueError, match="unknown reconstruction loss"):
        ae.reconstruction_loss(x, kind="l2")
    with pytest.raises(ValueError):
        AutoencoderConfig(down_factor=8, channels=(8, 16))


def test_deepened_decoder_starts_as_the_given_one_and_then_learns():
    """deepen_state_dict: an autoencoder with more decoder blocks per level, loaded from a shallower
    one, reconstructs exactly the same at first (the new blocks are identities) and has new weights
    to train; the encoder is untouched. Fewer blocks, or any other change of shape, is refused."""
    from worldsim.autoencoder import decoder_layout, deepen_state_dict

    x = frames_to_tensor(np.load(_dmlab())["video"][::75][:4])
    torch.manual_seed(0)
    src_cfg = AE_PRESETS["tiny"]
    src = Autoencoder(src_cfg)
    for p in src.parameters():  # trained-looking weights: no block is an identity any more
        p.data.normal_(0, 0.05)
    dst_cfg = dataclasses.replace(src_cfg, decoder_blocks_per_level=3)
    assert dst_cfg.decoder_blocks == 3 and src_cfg.decoder_blocks == src_cfg.blocks_per_level == 1
    assert len(decoder_layout(dst_cfg)) == len(decoder_layout(src_cfg)) + 2 * (len(src_cfg.channels))
    dst = Autoencoder(dst_cfg)
    missing, unexpected = dst.load_state_dict(deepen_state_dict(src.state_dict(), src_cfg, dst_cfg), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.layers.") for k in missing)
    assert sum(p.numel() for p in dst.decoder.parameters()) > sum(p.numel() for p in src.decoder.parameters())
    with torch.no_grad():
        assert torch.equal(dst.encode(x), src.encode(x))
        assert torch.allclose(dst(x), src(x), atol=1e-6)
    opt = torch.optim.Adam(dst.decoder.parameters(), lr=1e-3)
    for _ in range(3):
        loss, _ = dst.reconstruction_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(dst(x), src(x), atol=1e-4)
    with pytest.raises(ValueError, match="cannot drop"):
        deepen_state_dict(dst.state_dict(), dst_cfg, src_cfg)
    with pytest.raises(ValueError, match="only the decoder"):
        deepen_state_dict(src.state_dict(), src_cfg, dataclasses.replace(dst_cfg, latent_channels=8))
    with pytest.raises(ValueError, match=">= 1"):
        dataclasses.replace(src_cfg, decoder_blocks_per_level=0)


def test_deepened_far_predicts_what_the_given_one_did_and_then_learns():
    """deepen_far_state_dict: a FAR with more blocks, loaded from a shallower trained one, predicts
    exactly the same at first, through training's forward and the cached inference path (the new
    AdaLN-Zero blocks are identities, the last block stays last), and its new blocks train. Fewer
    blocks, or any other change of shape, is refused."""
    from worldsim.model import deepen_far_state_dict, deepened_block_sources

    src = random_far()  # trained-looking: no block is an identity
    dst_cfg = dataclasses.replace(src.config, depth=4)
    assert deepened_block_sources(2, 4) == [None, 0, None, 1] and deepened_block_sources(6, 8) == [0, 1, None, 2, None, 3, 4, 5]
    torch.manual_seed(1)
    dst = FAR(dst_cfg).eval()
    missing, unexpected = dst.load_state_dict(deepen_far_state_dict(src.state_dict(), src.config, dst_cfg), strict=False)
    assert not unexpected and {k.split(".")[1] for k in missing} == {"0", "2"}
    x, a = torch.randn(2, 9, 4, 8, 8), torch.randint(0, 5, (2, 9))
    t = torch.full((2, 9), -1.0)
    t[:, -2:] = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.allclose(dst(x, t, a), src(x, t, a), atol=1e-6)
        l2s = [m.frame_kv(x[:, :5], a[:, :5], 0, None, coarse=True) for m in (src, dst)]
        got = [m.predict_frame(x[:, 8], t[:, 8], a[:, 8], 8, concat_kv(l2, m.frame_kv(x[:, 5:8], a[:, 5:8], 5, l2)))
               for m, l2 in zip((src, dst), l2s)]
    assert torch.allclose(got[0], got[1], atol=1e-6)
    opt = torch.optim.Adam(dst.parameters(), lr=1e-3)
    new_block = dst.blocks[0].adaLN[1].weight
    for _ in range(2):
        loss = dst(x, t, a).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert new_block.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot deepen"):
        deepen_far_state_dict(dst.state_dict(), dst_cfg, src.config)
    with pytest.raises(ValueError, match="only the depth, the window and memory_span may differ"):
        deepen_far_state_dict(src.state_dict(), src.config, dataclasses.replace(dst_cfg, width=96, heads=2))
    # no weight depends on the window: another one takes the same tensors, and with W >= T frames
    # every frame is fine, which is what a window of T means
    wide_cfg = dataclasses.replace(src.config, window=9)
    wide = FAR(wide_cfg).eval()
    wide.load_state_dict(deepen_far_state_dict(src.state_dict(), src.config, wide_cfg))
    with torch.no_grad():
        assert torch.equal(wide(x, t, a), src(x, t, a, window=9))
        assert not torch.allclose(wide(x, t, a)[:, -2:], src(x, t, a)[:, -2:], atol=1e-4)


def test_blind_window_leaves_only_the_long_term_context_clean():
    """blind_window_prob=1: every window frame is noisy (no clean-context timestep), at levels
    >= blind_window_min_t, while the coarse frames stay clean; the loss then covers all W frames.
    Without long-term context nothing changes, and prob 0 is bit-identical to the default."""
    x, a = torch.randn(3, 9, 4, 8, 8), torch.randint(0, 5, (3, 9))
    W = PRESETS["tiny"].window
    Tc = 9 - W
    model = RecordingFAR(random_far())
    cfg = ObjectiveConfig(context_noise_prob=0.0, blind_window_prob=1.0, blind_window_min_t=0.6)
    loss, stats = training_loss(model, x, a, torch.Generator().manual_seed(2), cfg)
    (_, t, _, _), = model.calls
    assert torch.all(t[:, :Tc] == model.config.clean_t)
    assert (t[:, Tc:] >= 0.6).all() and (t[:, Tc:] <= 1.0).all()
    assert stats["noisy_frames"].item() == 3 * W and stats["blind_frac"].item() == 1.0
    loss.backward()
    assert torch.isfinite(loss)

    no_memory = RecordingFAR(random_far())  # a sample no longer than the window: nothing to blind
    training_loss(no_memory, x[:, -W:], a[:, -W:], torch.Generator().manual_seed(2), cfg)
    assert (no_memory.calls[0][1] == no_memory.config.clean_t).any()

    far = random_far()
    base, _ = training_loss(far, x, a, torch.Generator().manual_seed(4), ObjectiveConfig())
    zero, _ = training_loss(far, x, a, torch.Generator().manual_seed(4), ObjectiveConfig(blind_window_prob=0.0))
    assert torch.equal(base, zero)


def test_rollout_context_puts_the_models_own_frames_before_the_target(monkeypatch):
    """rollout_prob=1: the m frames before each sample's last frame are replaced by what the
    rollout generated (from the ground truth before them only), as clean, unaugmented context;
    the last frame stays the noisy target built from the ground truth. Prob 0 is bit-identical
    to the default objective (no extra draws)."""
    import worldsim.objective as objective

    B, T = 3, 9
    x, a = torch.randn(B, T, 4, 8, 8), torch.randint(0, 5, (B, T))
    seen = []

    def fake_rollout(core, x0, actions, m, steps, generator, aug=0.0):
        seen.append((x0.clone(), actions.clone(), m, steps, aug))
        return torch.full((x0.shape[0], m, *x0.shape[2:]), 7.0)

    monkeypatch.setattr(objective, "_rollout", fake_rollout)
    model = RecordingFAR(random_far())
    cfg = ObjectiveConfig(context_noise_prob=1.0, context_noise_max=0.5, rollout_prob=1.0, rollout_frames=2,
                          rollout_steps=3)
    ms = set()
    for seed in range(8):
        model.calls.clear()
        seen.clear()
        loss, stats = training_loss(model, x, a, torch.Generator().manual_seed(seed), cfg)
        assert torch.isfinite(loss) and stats["rollout_frac"].item() == 1.0
        (x0_seen, a_seen, m, steps, aug), = seen
        ms.add(m)
        assert steps == 3 and aug == 0.0 and torch.equal(x0_seen, x) and torch.equal(a_seen, a)
        (x_in, t_in, _, _), = model.calls
        span = slice(T - 1 - m, T - 1)
        assert torch.all(x_in[:, span] == 7.0)  # clean and unaugmented: the generated latents as they are
        assert torch.all(t_in[:, span] == model.config.clean_t)
        assert t_in[:, -1].min() > 0  # the target: noisy, from the ground truth
        assert not torch.allclose(x_in[:, -1], torch.full_like(x_in[:, -1], 7.0))
    assert ms == {1, 2}

    # longer rollouts reach into the long-term part (coarse frames), as play's own frames do once
    # the window has filled; the first frame always stays ground truth
    cfg = ObjectiveConfig(context_noise_prob=1.0, context_noise_max=0.5, rollout_prob=1.0, rollout_frames=20)
    ms.clear()
    for seed in range(12):
        model.calls.clear()
        seen.clear()
        training_loss(model, x, a, torch.Generator().manual_seed(seed), cfg)
        (_, _, m, _, _), = seen
        (x_in, t_in, _, _), = model.calls
        ms.add(m)
        assert torch.all(x_in[:, T - 1 - m : T - 1] == 7.0) and not torch.all(x_in[:, 0] == 7.0)
    assert max(ms) == T - 2 and max(ms) > model.config.window

    far = random_far()
    base, _ = training_loss(far, x, a, torch.Generator().manual_seed(4), ObjectiveConfig())
    zero, _ = training_loss(far, x, a, torch.Generator().manual_seed(4), ObjectiveConfig(rollout_prob=0.0))
    assert torch.equal(base, zero)


def test_rollout_aug_noises_and_labels_the_generated_context(monkeypatch):
    """rollout_aug=0.3: the rollout appends its frames at that level, and the training pass sees
    them noised to it and labelled with it (aug input 0.3), as play's generated_noise appends them."""
    import worldsim.objective as objective

    B, T = 2, 9
    x, a = torch.randn(B, T, 4, 8, 8), torch.randint(0, 5, (B, T))
    levels = []

    def fake_rollout(core, x0, actions, m, steps, generator, aug=0.0):
        levels.append(aug)
        return torch.full((x0.shape[0], m, *x0.shape[2:]), 7.0)

    monkeypatch.setattr(objective, "_rollout", fake_rollout)
    augs = []

    class AugRecordingFAR(RecordingFAR):
        def forward(self, x_, t_, a_, aug_=None):
            augs.append(aug_.clone())
            return super().forward(x_, t_, a_, aug_)

    model = AugRecordingFAR(random_far())
    cfg = ObjectiveConfig(rollout_prob=1.0, rollout_frames=3, rollout_aug=0.3)
    loss, _ = training_loss(model, x, a, torch.Generator().manual_seed(2), cfg)
    (x_in, t_in, _, _), = model.calls
    aug_in, = augs
    span = (t_in == model.config.clean_t) & (aug_in > 0.29)  # only the generated frames carry the label
    assert torch.isfinite(loss) and levels == [0.3] and span[:, -2].all() and not span[:, -1].any()
    residual = (x_in[span] - 0.7 * 7.0) / 0.3  # the noise mixed in: standard normal
    assert 0.8 < residual.std().item() < 1.2
    assert torch.allclose(aug_in[span], torch.full_like(aug_in[span], 0.3))


def test_rollout_generates_frames_as_play_does():
    """The rollout equals generating frame by frame with the uncached long-short reference and
    the Euler sampler, from the ground-truth prefix, each generated frame appended as context."""
    from worldsim.cache import UncachedContext
    from worldsim.objective import _rollout
    from worldsim.sampler import EulerSampler

    far = random_far()
    B, T, m, steps = 2, 10, 3, 2
    x, a = torch.randn(B, T, 4, 8, 8), torch.randint(0, 5, (B, T))

    # a rollout longer than the window moves its own frames into L2, as play does
    long_m = far.config.window + 3
    got = _rollout(far, x, a, long_m, steps, torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(6)
    ref = UncachedContext(far, layout="long-short")
    ref.extend(x[:, : T - 1 - long_m], a[:, : T - 1 - long_m])
    with torch.no_grad():
        for i, k in enumerate(range(T - 1 - long_m, T - 1)):
            z = EulerSampler(steps=steps).sample(ref.velocity, torch.randn((B, 4, 8, 8), generator=gen), a[:, k],
                                                 far.null_action)
            assert torch.allclose(got[:, i], z, atol=1e-4), i
            ref.extend(z[:, None], a[:, k : k + 1])

    got = _rollout(far, x, a, m, steps, torch.Generator().manual_seed(5))
    assert got.shape == (B, m, 4, 8, 8)

    gen = torch.Generator().manual_seed(5)
    ref = UncachedContext(far, layout="long-short")
    ref.extend(x[:, : T - 1 - m], a[:, : T - 1 - m])
    sampler = EulerSampler(steps=steps)
    with torch.no_grad():
        for i, k in enumerate(range(T - 1 - m, T - 1)):
            z = sampler.sample(ref.velocity, torch.randn((B, 4, 8, 8), generator=gen), a[:, k], far.null_action)
            assert torch.allclose(got[:, i], z, atol=1e-4), i
            ref.extend(z[:, None], a[:, k : k + 1])
    assert not torch.allclose(got, x[:, T - 1 - m : T - 1])

    # with aug, each frame enters the context noised and labelled, as play's generated_noise does
    got = _rollout(far, x, a, m, steps, torch.Generator().manual_seed(5), aug=0.2)
    gen = torch.Generator().manual_seed(5)
    ref = UncachedContext(far, layout="long-short")
    ref.extend(x[:, : T - 1 - m], a[:, : T - 1 - m])
    with torch.no_grad():
        for i, k in enumerate(range(T - 1 - m, T - 1)):
            z = sampler.sample(ref.velocity, torch.randn((B, 4, 8, 8), generator=gen), a[:, k], far.null_action)
            assert torch.allclose(got[:, i], z, atol=1e-4), i
            z_ctx = 0.8 * z + 0.2 * torch.randn(z.shape, generator=gen)
            ref.extend(z_ctx[:, None], a[:, k : k + 1], torch.full((B, 1), 0.2))


def test_objective_probabilities_out_of_range_are_refused():
    for bad in ({"blind_window_prob": 1.5}, {"blind_window_min_t": -0.1}, {"clean_context_prob": 2.0},
                {"rollout_prob": -0.5}, {"rollout_frames": 0}, {"rollout_steps": 0},
                {"short_context_prob": 1.1}, {"rollout_aug": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ObjectiveConfig(**bad)
    # 1.0 was taken and exported as the sampler's generated_noise, which no checkpoint may hold (the
    # trained model would not load); alone, it trained nothing and was exported all the same
    with pytest.raises(ValueError, match=r"rollout_aug must be in \[0, 1\), got 1.0"):
        ObjectiveConfig(rollout_prob=0.5, rollout_aug=1.0)
    with pytest.raises(ValueError, match="it needs rollout_prob > 0"):
        ObjectiveConfig(rollout_aug=0.3)
    for bad in ({"self_context_level": 0.0}, {"clean_context_prob": 0.0}):  # no frame would be replaced
        with pytest.raises(ValueError, match="self_context_level > 0 and clean_context_prob > 0"):
            ObjectiveConfig(self_context_prob=0.5, **bad)
