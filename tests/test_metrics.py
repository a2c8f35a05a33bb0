"""worldsim.metrics on known inputs: PSNR, SSIM, detail and change, the revisit rule."""
import math

import numpy as np
import pytest

from worldsim import metrics
from worldsim.metrics import PSNR_CAP_DB, psnr, revisit_mask, ssim, wrap_angle


def _frames(n=3, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_identical_frames_give_capped_psnr_and_unit_ssim():
    x = _frames()
    assert np.all(psnr(x, x) == PSNR_CAP_DB)
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-12)
    assert psnr(x[0], x[0]) == PSNR_CAP_DB  # one frame -> a scalar
    assert np.ndim(ssim(x[0], x[0])) == 0


def test_psnr_matches_known_gaussian_noise():
    rng = np.random.default_rng(1)
    sigma = 8.0
    clean = np.full((4, 64, 64, 3), 128.0)
    noisy = clean + rng.normal(0.0, sigma, size=clean.shape)
    got = psnr(noisy, clean)
    exact = 10 * np.log10(255.0**2 / np.mean((noisy - clean) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(got, exact, rtol=1e-12)
    # and the analytic value for the noise level: MSE ~ sigma^2, relative spread sqrt(2 / 12288)
    # per frame (~0.06 dB), so 0.25 dB is > 4 standard deviations
    np.testing.assert_allclose(got, 10 * np.log10(255.0**2 / sigma**2), atol=0.25)
    # uint8 inputs are scored without overflow (difference of 10 everywhere)
    a = np.full((2, 16, 16, 3), 200, np.uint8)
    b = np.full((2, 16, 16, 3), 210, np.uint8)
    np.testing.assert_allclose(psnr(a, b), 10 * np.log10(255.0**2 / 100.0))
    np.testing.assert_allclose(psnr(b, a), 10 * np.log10(255.0**2 / 100.0))


def test_ssim_of_constant_offset_matches_closed_form():
    # x constant a, y constant a + c: variances and covariance vanish, so SSIM is the
    # luminance term (2 a (a + c) + C1) / (a^2 + (a + c)^2 + C1) with C1 = (0.01 * 255)^2.
    c1 = (0.01 * 255) ** 2
    for a, c in [(100.0, 20.0), (10.0, 50.0), (200.0, -150.0)]:
        x = np.full((1, 32, 32, 3), a)
        y = x + c
        expected = (2 * a * (a + c) + c1) / (a * a + (a + c) ** 2 + c1)
        np.testing.assert_allclose(ssim(x, y), expected, rtol=1e-10)
    # textured image + offset: contrast/structure term is exactly 1, luminance term per window
    x = _frames(1, 24, 24, seed=3).astype(np.float64) * 0.5
    np.testing.assert_array_less(ssim(x, x + 30.0), 1.0)
    assert ssim(x, x + 30.0) > ssim(x, x + 90.0)


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    x = _frames(2, 64, 64, seed=4)
    y = np.clip(x.astype(int) + np.random.default_rng(5).integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    ours = ssim(x, y)
    for i in range(2):
        ref = skm.structural_similarity(x[i], y[i], channel_axis=-1, data_range=255, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False)
        assert ours[i] == pytest.approx(ref, abs=1e-9)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 9, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def test_unit_range_float_frames_are_refused_not_misscored():
    """Frames scaled to [0, 1] or [-1, 1] would read as near-black 0..255 frames and score tens of dB
    too high; they are refused unless the caller says their range (data_range=1)."""
    x = _frames(2, 16, 16, seed=6)
    y = _frames(2, 16, 16, seed=7)
    for scaled in (lambda f: f / 255.0, lambda f: f / 127.5 - 1.0):
        for fn in (psnr, ssim, metrics.detail):
            args = (scaled(x),) if fn is metrics.detail else (scaled(x), scaled(y))
            with pytest.raises(ValueError, match=r"every value in .*rescale them first"):
                fn(*args)
        with pytest.raises(ValueError, match="previous frame"):
            metrics.frame_change(x, scaled(y[0]))
    # the same frames on the 0..255 scale, as floats, score exactly as the uint8 ones, and [0, 1]
    # frames with their range given score the same as well
    np.testing.assert_allclose(psnr(x.astype(np.float32), y.astype(np.float64)), psnr(x, y))
    np.testing.assert_allclose(psnr(x / 255.0, y / 255.0, data_range=1.0), psnr(x, y), rtol=1e-12)
    np.testing.assert_allclose(ssim(x / 255.0, y / 255.0, data_range=1.0), ssim(x, y), rtol=1e-9)
    assert psnr(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))[0] == PSNR_CAP_DB  # all-zero frames pass

def test_lpips_runs_only_from_weights_already_on_disk(tmp_path, monkeypatch):
    """LPIPS is scored only when both weight files are present; otherwise the status names the
    missing file (nothing is downloaded: the torch hub folder here is empty)."""
    import sys
    import types

    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setitem(sys.modules, "lpips", None)  # not installed
    ok, why = metrics.lpips_status()
    assert not ok and "not installed" in why

    package = tmp_path / "site" / "lpips"
    fake = types.ModuleType("lpips")
    fake.__file__ = str(package / "__init__.py")
    monkeypatch.setitem(sys.modules, "lpips", fake)
    ok, why = metrics.lpips_status()
    assert not ok and str(package / "weights" / "v0.1" / "alex.pth") in why
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "weights" / "v0.1" / "alex.pth").write_bytes(b"")
    ok, why = metrics.lpips_status()
    backbone = tmp_path / "hub" / "checkpoints" / metrics.ALEXNET_WEIGHTS
    assert not ok and str(backbone) in why and "download" in why
    assert not backbone.exists()  # the status looked, it fetched nothing
    backbone.parent.mkdir(parents=True)
    backbone.write_bytes(b"")
    assert metrics.lpips_status()[0]


def test_detail_and_change_on_known_frames():
    flat = np.full((1, 8, 8, 3), 100, np.uint8)
    stripes = np.zeros((1, 8, 8, 3), np.uint8)
    stripes[:, :, ::2] = 90  # columns alternate 90 / 0: every horizontal step changes by 90, no vertical one
    np.testing.assert_allclose(metrics.detail(flat), [0.0])
    np.testing.assert_allclose(metrics.detail(stripes), [90.0])
    smoothed = (stripes.astype(np.float64) * 0.5 + 22).astype(np.uint8)  # half the contrast: half the detail
    assert metrics.detail(smoothed)[0] == pytest.approx(45.0)
    frames = np.concatenate([flat, flat + 10, flat + 10])  # (3, 8, 8, 3)
    np.testing.assert_allclose(metrics.frame_change(frames, previous=flat[0] - 4), [4.0, 10.0, 0.0])
    with pytest.raises(ValueError, match="previous frame"):
        metrics.frame_change(frames, previous=np.zeros((4, 4, 3), np.uint8))


def test_ratio_to_truth_pools_every_frame_of_every_episode():
    assert metrics.ratio_to_truth([np.array([1.0, 1.0]), np.array([4.0])], [np.array([2.0, 2.0]), np.array([2.0])]) \
        == pytest.approx(1.0)  # (1 + 1 + 4) / (2 + 2 + 2)
    assert metrics.ratio_to_truth([np.array([1.0])], [np.array([0.0])]) is None  # a still, flat truth: no ratio


def test_wrap_angle():
    np.testing.assert_allclose(wrap_angle([0.0, 2 * math.pi, -3 * math.pi / 2, math.pi - 0.1]),
                               [0.0, 0.0, math.pi / 2, math.pi - 0.1], atol=1e-12)


def test_revisit_mask_on_hand_made_poses():
    d = math.radians(1.0)
    # generating frame 6 with window 3, the window holds frames 4, 5, 6: old context frames are 0..3
    context, window = 6, 3
    poses = np.array([
        [1.5, 1.5, math.pi - d],      # 0  old, faces west (yaw ~ +pi)
        [2.5, 1.5, 0.0],              # 1  old, east
        [3.5, 1.5, 0.0],              # 2  old
        [3.5, 2.5, math.pi / 2],      # 3  old, south
        [5.5, 5.5, 0.0],              # 4  in the window
        [6.5, 5.5, 0.0],              # 5  in the window
        # generated frames
        [1.5, 1.5, -math.pi + d],     # 6  wrap-around: 2 degrees from frame 0 -> revisit of 0
        [2.9, 1.5, math.radians(29)],  # 7  0.4 cell and 29 deg from 1 -> revisit of 1
        [2.5, 2.01, 0.0],             # 8  0.51 cell from 1 -> not
        [2.5, 1.5, math.radians(31)],  # 9  31 degrees -> not
        [5.5, 5.5, 0.0],              # 10 same as frame 4, but 4 is in the short window -> not
        [3.4, 1.5, 0.05],             # 11 near 2 (0.1) and 1 (0.9): revisit of 2
        [3.5, 2.0, 0.0],              # 12 exactly 0.5 from 2 (inclusive) -> revisit of 2
    ], dtype=np.float32)
    mask, source = revisit_mask(poses, context, window)
    assert mask.tolist() == [True, True, False, False, False, True, True]
    assert source.tolist() == [0, 1, -1, -1, -1, 2, 2]
    # the same frame 10 counts once frame 4 has left the window (window 2 -> it holds 5, 6; old = 0..4)
    mask1, source1 = revisit_mask(poses, context, 2)
    assert mask1[4] and source1[4] == 4
    # a window covering the whole context and the new frame: nothing is old, nothing is a revisit
    mask2, source2 = revisit_mask(poses, context, context + 1)
    assert not mask2.any() and (source2 == -1).all()
    # the memory's reach: frames back to the latest matching old frame, -1 where none
    assert metrics.revisit_age(poses, context, window).tolist() == [6, 6, -1, -1, -1, 9, 10]


def test_revisit_boundaries_hold_for_float32_poses_as_datasets_store_them():
    """Poses are stored in float32: a view three 10-degree turns (exactly 30 degrees) or exactly
    0.5 cell from an old one is a revisit, whatever the rounding. With a 1e-9 slack 3% of the
    test split's revisits (those at exactly 30 degrees) were counted as the rest."""
    turn = math.radians(10.0)
    yaws = [np.float32(np.float32(-math.pi) + k * np.float32(turn)) for k in range(36)]  # the maze's turns, as float32
    misses = []
    for k, yaw in enumerate(yaws):
        for x0 in (1.5, 7.35, 10.65):
            old = [x0, 3.2, yaw]
            poses = np.array([old, [9.0, 9.0, 0.0], [9.0, 9.0, 0.0],
                              [x0, 3.2, yaws[(k + 3) % 36]],     # exactly 30 degrees on: a revisit
                              [x0, 3.2, yaws[(k + 4) % 36]],     # 40 degrees: not
                              [x0 + 0.5, 3.2, yaw],               # exactly 0.5 cell: a revisit
                              [x0 + 0.5001, 3.2, yaw]], dtype=np.float32)
            mask, _ = revisit_mask(poses, 3, 2)
            if mask.tolist() != [True, False, True, False]:
                misses.append((k, x0, mask.tolist()))
    assert misses == []


def test_revisit_age_counts_back_to_the_latest_sighting_not_the_closest_pose():
    # old frames 0..3 (window 2, context 5): the place is seen at frames 0 (exactly) and 2 (0.3 off)
    poses = np.array([[1.5, 1.5, 0.0], [4.5, 4.5, 0.0], [1.8, 1.5, 0.0], [4.5, 4.5, 0.0], [6.5, 6.5, 0.0],
                      [1.5, 1.5, 0.0], [6.5, 6.5, 0.0]], dtype=np.float64)
    mask, source = revisit_mask(poses, 5, 2)
    assert mask.tolist() == [True, False] and source[0] == 0  # the closest view
    assert metrics.revisit_age(poses, 5, 2).tolist() == [3, -1]  # the latest one: frame 2


def test_summarize():
    s = metrics.summarize(np.array([1.0, 2.0, 3.0]), np.array([True, False, True]))
    assert s == {"mean": 2.0, "std": 1.0, "n": 2}
    assert metrics.summarize(np.array([1.0]), np.array([False]))["mean"] is None


def test_paired_gap_pools_frames_or_averages_episodes_and_brackets_the_gap():
    # episode 0: 3 selected frames, first better by 1 dB; episode 1: 1 selected frame, worse by 3 dB
    first = [np.array([11.0, 11.0, 11.0, 50.0]), np.array([7.0, 50.0])]
    second = [np.array([10.0, 10.0, 10.0, 0.0]), np.array([10.0, 0.0])]
    masks = [np.array([True, True, True, False]), np.array([True, False])]
    pooled = metrics.paired_gap(first, second, masks, pooled=True)
    assert pooled["gap"] == pytest.approx((3 * 1.0 - 3.0) / 4)  # frames pooled: 0
    assert (pooled["episodes"], pooled["episodes_positive"], pooled["frames"]) == (2, 1, 4)
    per_episode = metrics.paired_gap(first, second, masks, pooled=False)
    assert per_episode["gap"] == pytest.approx((1.0 - 3.0) / 2)
    for g in (pooled, per_episode):
        # resampling two episodes can give either one twice: the interval spans both episodes' means
        assert g["ci_low"] == pytest.approx(-3.0) and g["ci_high"] == pytest.approx(1.0)
        assert g["ci_low"] <= g["gap"] <= g["ci_high"]
    # the same seed gives the same interval; an episode without selected frames is left out
    assert metrics.paired_gap(first, second, masks, seed=3) == metrics.paired_gap(first, second, masks, seed=3)
    none = metrics.paired_gap(first + [np.array([1.0])], second + [np.array([0.0])], masks + [np.array([False])])
    assert none["episodes"] == 2 and none["gap"] == pooled["gap"]


def test_paired_gap_of_consistent_episodes_and_of_nothing():
    rng = np.random.default_rng(0)
    second = [rng.normal(12, 1, 50) for _ in range(12)]
    first = [s + 3.0 + rng.normal(0, 0.5, 50) for s in second]
    g = metrics.paired_gap(first, second, pooled=True)
    assert 2.5 < g["ci_low"] < g["gap"] < g["ci_high"] < 3.5 and g["episodes_positive"] == 12
    one = metrics.paired_gap([np.array([3.0, 5.0])], [np.array([1.0, 1.0])])
    assert one["gap"] == 3.0 and one["ci_low"] is None and one["ci_high"] is None  # no interval from 1 episode
    assert metrics.paired_gap(first, second, seed=-1)["ci_low"] is not None  # any int seed
    empty = metrics.paired_gap([np.array([1.0])], [np.array([2.0])], [np.array([False])])
    assert empty["gap"] is None and empty["episodes"] == 0
    with pytest.raises(ValueError, match="one array per episode"):
        metrics.paired_gap([np.array([1.0])], [])


def test_revisit_source_is_the_nearest_place_first_and_the_nearest_yaw_among_equals():
    """`source` is the old view nearest in position; yaw only breaks ties (metrics.revisit_mask).
    Window 1, context 4: frames 0..3 are old when frame 4 is generated."""
    deg = math.radians
    poses = np.array([
        [1.5, 1.5, deg(25)],   # 0  the very place, 25 degrees off
        [1.8, 1.5, 0.0],       # 1  0.3 cell off, the same yaw
        [6.5, 6.5, deg(20)],   # 2  another place, 20 degrees off
        [6.5, 6.5, deg(5)],    # 3  the same place, 5 degrees off
        [1.5, 1.5, 0.0],       # 4  generated: nearest place is frame 0, not the better-aligned frame 1
        [6.5, 6.5, 0.0],       # 5  generated: frames 2 and 3 at the same spot, 3 nearer in yaw
    ], dtype=np.float64)
    mask, source = revisit_mask(poses, 4, 1)
    assert mask.tolist() == [True, True]
    assert source.tolist() == [0, 3]


def test_paired_gap_interval_has_the_asked_level_and_its_seed_draws_the_resamples():
    """The bootstrap interval of a mean of 400 episodes is close to the normal one,
    gap +- z(level) * sd / sqrt(n): checked against that independent formula (within 8%; a 90%
    interval given for a 95% one is 16% narrower). The seed picks the resamples, not the gap."""
    from statistics import NormalDist

    rng = np.random.default_rng(7)
    d = rng.normal(0.3, 1.0, 400)
    first, second = [np.array([x]) for x in d], [np.zeros(1)] * len(d)
    se = d.std() / math.sqrt(len(d))
    for level in (0.95, 0.5):
        g = metrics.paired_gap(first, second, pooled=False, level=level, seed=0)
        assert g["gap"] == pytest.approx(d.mean()) and g["level"] == level
        half = NormalDist().inv_cdf(0.5 + level / 2) * se
        assert (g["ci_high"] - g["ci_low"]) / 2 == pytest.approx(half, rel=0.08)
        assert (g["ci_high"] + g["ci_low"]) / 2 == pytest.approx(g["gap"], abs=0.1 * half)
    other = metrics.paired_gap(first, second, pooled=False, seed=1)
    same = metrics.paired_gap(first, second, pooled=False, seed=0)
    assert other["gap"] == same["gap"] and other["ci_low"] != same["ci_low"]


def test_an_episode_with_no_difference_is_not_counted_positive():
    """'k of n episodes positive' in results.md: an episode where both conditions score the same
    (two identical frames both at the 100 dB cap, say) is not a win."""
    first = [np.array([11.0, 12.0]), np.array([100.0, 20.0]), np.array([9.0])]
    second = [np.array([10.0, 11.0]), np.array([100.0, 20.0]), np.array([10.0])]
    g = metrics.paired_gap(first, second, pooled=False)
    assert (g["episodes"], g["episodes_positive"]) == (3, 1)


def test_revisit_distance_is_euclidean_and_the_ratio_is_generated_over_truth():
    # 0.3 and 0.4 cell off diagonally is 0.5 cell (a revisit, inclusive); 0.4 and 0.4 is 0.57 (not)
    poses = np.array([[1.5, 1.5, 0.0], [6.5, 6.5, 0.0], [1.8, 1.9, 0.0], [1.9, 1.9, 0.0]], dtype=np.float64)
    assert revisit_mask(poses, 2, 1)[0].tolist() == [True, False]
    # half the detail of the truth reads 0.5 (smoother), not 2
    assert metrics.ratio_to_truth([np.array([1.0, 1.0]), np.array([1.0])], [np.array([2.0, 2.0]), np.array([2.0])]) \
        == pytest.approx(0.5)
