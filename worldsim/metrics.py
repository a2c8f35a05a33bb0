"""Frame metrics (PSNR, SSIM, LPIPS where installed) and the revisit rule.

Everything here is a pure function of arrays, so the evaluation can score any "generated"
frames against any ground truth (a test feeds the ground truth itself and gets perfect scores).

Definitions (the ones FAR's table uses, i.e. TECO's ``teco/metrics.py``):

* **PSNR** per frame: ``10 * log10(255^2 / MSE)`` with the MSE over all H*W*3 values of the
  uint8 frames (equivalently ``[0, 1]`` images with ``data_range=1``). At the default range of 255,
  float frames whose values all lie in [-1, 1] (scaled to [0, 1] or [-1, 1] by mistake) are
  refused with a clear error. Identical frames have an infinite
  PSNR; we *cap* every per-frame value at :data:`PSNR_CAP_DB` = 100 dB (MSE below
  ``255^2 * 1e-10``) so that means stay finite and the JSON stays valid JSON.
* **SSIM** per frame (Wang et al. 2004, as ``tf.image.ssim`` and TECO): an 11x11 Gaussian
  window with sigma 1.5 (normalised), K1 = 0.01, K2 = 0.03, dynamic range 255, population
  (not sample) statistics, the SSIM map computed only where the window fits inside the
  image ("valid", 54x54 positions on 64x64), averaged over positions and then over the three
  RGB channels. This equals ``skimage.metrics.structural_similarity(a, b, channel_axis=-1,
  data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``; the tests
  check it against scikit-image when that is installed.
* **LPIPS** (Zhang et al. 2018, AlexNet, v0.1 linear layers, inputs scaled to [-1, 1]) only
  when the ``lpips`` package *and* both of its weight files (the linear layers shipped in the
  package and torchvision's AlexNet backbone in the torch hub cache) are already on disk.
  Nothing is downloaded; otherwise LPIPS is reported as unavailable, never approximated.

Two more numbers catch what PSNR rewards by mistake (a blurred or frozen frame sits nearer the
average of what could come next, so it can score well):

* **detail** per frame (:func:`detail`): the mean absolute difference between horizontally and
  between vertically adjacent uint8 values, summed. Blur lowers it.
* **change** per frame (:func:`frame_change`): the mean absolute difference from the frame before
  (for the first frame, a given previous one). A view that stops turning lowers it.

The evaluation reports each as the ratio of its sum over the generated frames to its sum over the
ground-truth frames (:func:`ratio_to_truth`): sharpness and motion, 1 as in reality, below 1
smoother or stiller.

Revisit rule (:func:`revisit_mask`): a generated frame is a revisit when its pose is within
0.5 cell (Euclidean distance of (x, y) in maze cells, inclusive) and 30 degrees (absolute
yaw difference wrapped to [-pi, pi], inclusive) of some context frame with index
``< context - window + 1``, i.e. a frame that has already left the model's short window when the
first frame is generated. :func:`revisit_age` says how many frames back the latest such context
frame is: the reach the memory needs there.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

PSNR_CAP_DB = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
REVISIT_DISTANCE_CELLS = 0.5
REVISIT_YAW_DEGREES = 30.0


def _as_frames(x: np.ndarray, name: str, data_range: float = 255.0) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name}: expected frames [N, H, W, 3] or [H, W, 3], got shape {list(x.shape)}")
    _check_scale(x, name, data_range)
    return x


def _check_scale(x: np.ndarray, name: str, data_range: float = 255.0) -> None:
    """Refuse float frames scaled to [0, 1] or [-1, 1] where 0..255 values are expected: they would
    score tens of dB too high in silence. A 0..255 frame whose every value lies within [-1, 1] would
    be black to the eye, so such input is taken for a scaling mistake (all-zero frames pass). And the
    other way round: uint8 frames scored with data_range=1.0 came out near -31 dB in silence."""
    if not (isinstance(data_range, (int, float, np.integer, np.floating)) and math.isfinite(data_range)
            and data_range > 0):  # 0 gave -inf dB for every frame
        raise ValueError(f"data_range must be a positive number (255 for uint8 frames), got {data_range!r}")
    if not x.size:
        return
    top = float(np.max(x))
    if top > 2 * data_range:  # far beyond: a scale mistake, not a float frame a little over its range
        raise ValueError(f"{name}: values up to {top:.4g} with data_range={data_range:g}; uint8 frames (and floats "
                         "on the 0..255 scale) take the default data_range=255")
    if data_range != 255.0 or not np.issubdtype(x.dtype, np.floating):
        return
    lo, hi = float(np.min(x)), top
    if -1.0 <= lo and hi <= 1.0 and (lo, hi) != (0.0, 0.0):
        raise ValueError(f"{name}: float frames with every value in [{lo:.3g}, {hi:.3g}]; the metrics expect "
                         "0..255 values (uint8, or floats on that scale): rescale them first (or pass "
                         "data_range=1.0 to psnr / ssim for [0, 1] frames)")


def _pair(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> tuple[np.ndarray, np.ndarray, bool]:
    single = np.asarray(a).ndim == 3
    a, b = _as_frames(a, "first", data_range), _as_frames(b, "second", data_range)
    if a.shape != b.shape:
        raise ValueError(f"frame shapes differ: {list(a.shape)} vs {list(b.shape)}")
    return a, b, single


def mse(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Mean squared error per frame, in (0..data_range)^2 units (float64)."""
    a, b, single = _pair(a, b, data_range)
    d = a.astype(np.float64) - b.astype(np.float64)
    out = np.mean(d * d, axis=(1, 2, 3))
    return out[0] if single else out


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """PSNR in dB per frame (``[N,H,W,3]`` -> ``[N]``; one frame -> a scalar), capped at 100 dB."""
    m = np.asarray(mse(a, b, data_range), dtype=np.float64)
    floor = data_range**2 * 10.0 ** (-PSNR_CAP_DB / 10.0)
    with np.errstate(divide="ignore"):
        val = 10.0 * np.log10(data_range**2 / np.maximum(m, floor))
    return np.minimum(val, PSNR_CAP_DB)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-0.5 * coords**2 / sigma**2)
    return g / g.sum()


def _valid_filter_matrix(n: int, g: np.ndarray) -> np.ndarray:
    """[n, n - len(g) + 1] matrix M with (x @ M)[j] = sum_k g[k] x[j + k] (valid correlation)."""
    m = np.zeros((n, n - len(g) + 1), dtype=np.float64)
    for j in range(m.shape[1]):
        m[j:j + len(g), j] = g
    return m


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, win_size: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA, batch: int = 64) -> np.ndarray:
    """SSIM per frame (Gaussian 11x11, sigma 1.5, valid positions, channel-averaged), float64."""
    a, b, single = _pair(a, b, data_range)
    n, h, w, c = a.shape
    if h < win_size or w < win_size:
        raise ValueError(f"SSIM needs frames of at least {win_size}x{win_size}, got {h}x{w}")
    g = _gaussian_window(win_size, sigma)
    mw = _valid_filter_matrix(w, g)  # separable Gaussian as two small matrix products (BLAS)
    mh = _valid_filter_matrix(h, g)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2

    def blur(x: np.ndarray) -> np.ndarray:  # [B, C, H, W] -> [B, C, W', H'] (transposed; only means are taken)
        bsz = x.shape[0]
        t = (x.reshape(-1, w) @ mw).reshape(bsz, c, h, -1).swapaxes(2, 3)
        return (t.reshape(-1, h) @ mh).reshape(bsz, c, t.shape[2], -1)

    out = np.empty(n, dtype=np.float64)
    for s in range(0, n, batch):
        x = np.moveaxis(a[s:s + batch].astype(np.float64), -1, 1)
        y = np.moveaxis(b[s:s + batch].astype(np.float64), -1, 1)
        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cxy = blur(x * y) - mx * my
        smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out[s:s + batch] = smap.mean(axis=(2, 3)).mean(axis=1)
    return out[0] if single else out


# ----------------------------------------------------------------------------- LPIPS


ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def lpips_status() -> tuple[bool, str]:
    """Whether LPIPS can run from files already on disk (never downloads), and why not."""
    try:
        import lpips  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or a broken install
        return False, f"the 'lpips' package is not installed ({type(exc).__name__})"
    linear = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    if not linear.is_file():
        return False, f"LPIPS linear weights not found at {linear}"
    import torch  # here and in Lpips only: `worldsim eval --help` imports this module, and torch takes seconds

    # the exact file torchvision's alexnet(pretrained=True) looks for; any other name downloads
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not backbone.is_file():
        return False, f"torchvision AlexNet weights not found at {backbone} (would need a download)"
    return True, f"lpips {getattr(lpips, '__version__', '?')} alex v0.1 ({linear}, {backbone})"


class Lpips:
    """LPIPS-Alex scorer built only from local files (check :func:`lpips_status` first)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        ok, why = lpips_status()
        if not ok:
            raise RuntimeError(f"LPIPS unavailable: {why}")
        import lpips  # type: ignore[import-not-found]
        import torch

        self.device = torch.device(device)
        self.net = lpips.LPIPS(net="alex", version="0.1", verbose=False).to(self.device).eval()

    def __call__(self, a: np.ndarray, b: np.ndarray, batch: int = 64) -> np.ndarray:
        import torch

        a, b, single = _pair(a, b)
        out = []
        for s in range(0, len(a), batch):
            x = torch.from_numpy(a[s:s + batch]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = torch.from_numpy(b[s:s + batch]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                out.append(self.net(x, y).flatten().double().cpu().numpy())
        res = np.concatenate(out) if out else np.zeros(0)
        return res[0] if single else res


def score_frames(generated: np.ndarray, truth: np.ndarray, lpips: Lpips | None = None) -> dict[str, np.ndarray]:
    """Per-frame ``psnr``, ``ssim`` (and ``lpips`` when a scorer is given) of any frames vs truth."""
    generated, truth, _ = _pair(generated, truth)
    out = {"psnr": psnr(generated, truth), "ssim": ssim(generated, truth)}
    if lpips is not None:
        out["lpips"] = lpips(generated, truth)
    return out


def detail(frames: np.ndarray) -> np.ndarray:
    """Per-frame mean |horizontal| + mean |vertical| difference of adjacent uint8 values, [N]."""
    f = _as_frames(frames, "frames").astype(np.float32)  # (N, H, W, C)
    return (np.abs(np.diff(f, axis=2)).mean(axis=(1, 2, 3)) + np.abs(np.diff(f, axis=1)).mean(axis=(1, 2, 3))).astype(np.float64)


def frame_change(frames: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Per-frame mean absolute difference from the frame before, [N]; `previous` [H, W, C] precedes frames[0]."""
    f = _as_frames(frames, "frames").astype(np.float32)  # (N, H, W, C)
    if np.shape(previous) != f.shape[1:]:
        raise ValueError(f"previous frame {list(np.shape(previous))} does not match frames {list(f.shape[1:])}")
    _check_scale(np.asarray(previous), "previous frame")
    before = np.concatenate([np.asarray(previous, dtype=np.float32)[None], f[:-1]])
    return np.abs(f - before).mean(axis=(1, 2, 3)).astype(np.float64)


def ratio_to_truth(generated: list[np.ndarray], truth: list[np.ndarray]) -> float | None:
    """sum(generated) / sum(truth) over all frames of all episodes (None when the truth sums to 0)."""
    g = float(sum(np.sum(np.asarray(x, dtype=np.float64)) for x in generated))
    t = float(sum(np.sum(np.asarray(x, dtype=np.float64)) for x in truth))
    return g / t if t > 0 else None


# ----------------------------------------------------------------------------- poses


def wrap_angle(a: np.ndarray | float) -> np.ndarray:
    """Angles wrapped to [-pi, pi)."""
    return (np.asarray(a, dtype=np.float64) + np.pi) % (2 * np.pi) - np.pi


POSE_SLACK = 1e-5  # cells and radians: far above float32 rounding, far below any step the simulators take


def pose_match(p: np.ndarray, q: np.ndarray, distance: float, yaw_degrees: float) -> np.ndarray:
    """Boolean [..] matrix: pose p[i] within `distance` cells and `yaw_degrees` of q[j]."""
    p = np.asarray(p, dtype=np.float64)[:, None, :]
    q = np.asarray(q, dtype=np.float64)[None, :, :]
    dist = np.hypot(p[..., 0] - q[..., 0], p[..., 1] - q[..., 1])
    dyaw = np.abs(wrap_angle(p[..., 2] - q[..., 2]))
    # poses are stored in float32, whose rounding (~1e-7 rad near pi, ~1e-6 cell at 10 cells)
    # would otherwise decide the inclusive boundaries: a 30-degree turn is three 10-degree turns
    return (dist <= distance + POSE_SLACK) & (dyaw <= math.radians(yaw_degrees) + POSE_SLACK)


def _old_context_matches(poses: np.ndarray, context: int, window: int, distance: float,
                         yaw_degrees: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(poses as float64, generated poses [G, 3], match [G, n_old] bool against the old context frames)."""
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 2 or poses.shape[1] != 3:
        raise ValueError(f"poses must be [T, 3], got {list(poses.shape)}")
    if not 0 <= context <= len(poses):
        raise ValueError(f"context {context} outside the {len(poses)} poses")
    gen = poses[context:]
    n_old = max(0, context - int(window) + 1)
    return poses, gen, pose_match(gen, poses[:n_old], distance, yaw_degrees)


def revisit_mask(poses: np.ndarray, context: int, window: int,
                 distance: float = REVISIT_DISTANCE_CELLS,
                 yaw_degrees: float = REVISIT_YAW_DEGREES) -> tuple[np.ndarray, np.ndarray]:
    """Which generated frames revisit a place seen only in the long-term context.

    ``poses`` float [T, 3] (x, y in cells, yaw in radians) of the whole episode; frames
    ``context..T-1`` are the generated ones. Returns ``(mask [T - context] bool,
    source [T - context] int)``: ``source`` is the index of the closest matching old context
    frame (smallest position distance, then yaw; -1 where there is none). Old context frames
    are those no longer in the short window when the first frame is generated: the window then
    holds frames ``context - window + 1 .. context`` (the new one included), so old frames have
    index ``< context - window + 1``; with ``context < window`` nothing is a revisit.
    """
    poses, gen, match = _old_context_matches(poses, context, window, distance, yaw_degrees)
    mask = match.any(axis=1)
    source = np.full(len(gen), -1, dtype=np.int64)
    if mask.any():
        old = poses[: match.shape[1]]
        dist = np.hypot(gen[:, None, 0] - old[None, :, 0], gen[:, None, 1] - old[None, :, 1])
        dyaw = np.abs(wrap_angle(gen[:, None, 2] - old[None, :, 2]))
        cost = np.where(match, dist + 1e-3 * dyaw, np.inf)
        source[mask] = np.argmin(cost, axis=1)[mask]
    return mask, source


def revisit_age(poses: np.ndarray, context: int, window: int,
                distance: float = REVISIT_DISTANCE_CELLS,
                yaw_degrees: float = REVISIT_YAW_DEGREES) -> np.ndarray:
    """How far back the memory must reach for each generated frame: int [T - context], the frames
    between it and the latest old context frame (as in :func:`revisit_mask`) with its pose; -1
    where it revisits none. The latest sighting, not the closest pose: an older view adds nothing
    a newer one of the same place lacks, so this is the shortest reach that would do. Only the
    context counts (a place the generated stretch passed again is still aged from the context),
    and a frame g steps into the generated stretch is at least W + g back."""
    _, gen, match = _old_context_matches(poses, context, window, distance, yaw_degrees)
    mask = match.any(axis=1)
    age = np.full(len(gen), -1, dtype=np.int64)
    if mask.any():
        latest = match.shape[1] - 1 - np.argmax(match[:, ::-1], axis=1)
        age[mask] = (context + np.arange(len(gen)) - latest)[mask]
    return age


def summarize(values: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
    """Mean, standard deviation and count of `values[mask]` (None where empty)."""
    v = np.asarray(values, dtype=np.float64)
    if mask is not None:
        v = v[np.asarray(mask, dtype=bool)]
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def paired_gap(first: list[np.ndarray], second: list[np.ndarray], masks: list[np.ndarray] | None = None,
               pooled: bool = True, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Paired difference `first - second` of per-frame values, with a bootstrap CI over episodes.

    Each list holds one array per episode, the two conditions scored on the same frames (and
    `masks` selects frames, e.g. revisits). `pooled=True` averages over all selected frames of all
    episodes (as the revisit numbers are); `pooled=False` averages each episode first, then the
    episodes (as the overall numbers are). Episodes, not frames, are resampled with replacement
    (frames of one episode are far from independent), `resamples` times from a fixed `seed`, and
    the interval is the central `level` percentile range of the resampled gaps (None with fewer
    than 2 episodes: resampling one episode says nothing; with a handful the percentile interval
    is too narrow, so read it as a lower bound on the uncertainty). Also returned: how many
    episodes (with selected frames) have a positive mean difference.
    """
    if len(first) != len(second) or (masks is not None and len(masks) != len(first)):
        raise ValueError("paired_gap: one array per episode in every list")
    sums, counts = [], []
    for i, (a, b) in enumerate(zip(first, second)):
        d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        if masks is not None:
            d = d[np.asarray(masks[i], dtype=bool)]
        if d.size:
            sums.append(float(d.sum()))
            counts.append(int(d.size))
    n = len(sums)
    s, c = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    per_episode = s / c  # every kept episode has >= 1 frame

    def statistic(idx: np.ndarray) -> np.ndarray:  # idx (R, n) -> (R,)
        return s[idx].sum(-1) / c[idx].sum(-1) if pooled else per_episode[idx].mean(-1)

    gap = float(statistic(np.arange(n)[None])[0]) if n else None
    low = high = None
    if n >= 2:
        rng = np.random.default_rng(seed % 2**32)  # any int seed (eval accepts negative ones)
        boot = statistic(rng.integers(0, n, size=(resamples, n)))
        tail = (1.0 - level) / 2.0 * 100.0
        low, high = (float(v) for v in np.percentile(boot, [tail, 100.0 - tail]))
    return {"gap": gap, "ci_low": low, "ci_high": high, "level": level, "episodes": n,
            "episodes_positive": int((per_episode > 0).sum()), "frames": int(c.sum())}
