"""Procedural textures for the embedded maze, built once per process.

Everything here is made from a fixed internal seed so that every process (and every
machine) draws the same pixels: textures are part of what a dataset means.

Textures are stored as mip chains in one flat colour table so that the raycaster can
turn every screen pixel into a single integer index and gather all colours at once.
Mip levels matter at 64x64: without them a wall five cells away samples one texel out
of twenty and shimmers from frame to frame, which a small world model cannot predict.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

WALL_TEX = 64   # texels per wall face side (one face = one cell wide, one wall high)
FLOOR_TEX = 32  # texels per floor cell side
FLOOR_VARIANTS = 4  # noise variants per floor colour, picked per cell to break tiling

SKY_COLOUR = np.array([150, 224, 255], np.uint8)  # DeepMind Lab's flat sky
SKY_INDEX = 0

# Wall tints multiply a light grey panel. Neutral grey first: corridors mostly use it,
# as DeepMind Lab's corridors are grey; the others echo its green / blue-stone / salmon walls.
WALL_TINTS = np.array([
    [1.00, 1.00, 1.00],   # neutral grey
    [1.02, 0.90, 0.72],   # warm beige
    [0.70, 0.80, 0.95],   # blue stone
    [0.55, 0.78, 0.50],   # green
    [1.05, 0.66, 0.58],   # salmon
    [0.85, 0.74, 0.98],   # lavender
], dtype=np.float32)

# Poster colours: saturated and far apart in hue/brightness so they survive 64x64.
POSTER_COLOURS = np.array([
    [215, 35, 35],    # red
    [250, 215, 30],   # yellow
    [35, 75, 225],    # blue
    [30, 160, 55],    # green
    [200, 45, 195],   # magenta
    [250, 130, 15],   # orange
    [30, 205, 215],   # cyan
    [25, 25, 30],     # black
], dtype=np.float32)

# Floor colours: index 0 is the corridor grass green; rooms draw from the rest.
FLOOR_COLOURS = np.array([
    [135, 200, 95],   # corridor green (DeepMind Lab's grass)
    [65, 120, 200],   # blue water
    [225, 165, 50],   # orange
    [215, 205, 130],  # sand
    [150, 105, 195],  # purple
    [190, 85, 70],    # brick red
    [60, 170, 160],   # teal
    [225, 140, 175],  # pink
    [85, 135, 70],    # dark green
], dtype=np.float32)


def _value_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """Smooth periodic noise in [0, 1], shape [n, size, size], `cells` lattice cells per side."""
    lattice = rng.random((n, cells, cells)).astype(np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) * cells / size - 0.5
    i0 = np.floor(t).astype(np.int64)
    f = t - i0
    f = f * f * (3 - 2 * f)  # smoothstep: no visible lattice creases
    i0, i1 = i0 % cells, (i0 + 1) % cells
    rows = lattice[:, i0] * (1 - f)[None, :, None] + lattice[:, i1] * f[None, :, None]
    return rows[:, :, i0] * (1 - f) + rows[:, :, i1] * f


def _fractal_noise(rng: np.random.Generator, n: int, size: int, base: int = 4, octaves: int = 3):
    out = np.zeros((n, size, size), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = min(base * 2**o, size)
        out += amp * _value_noise(rng, n, size, cells)
        total += amp
        amp *= 0.5
    return out / total


def _shape_sdfs(size: int, supersample: int = 4) -> np.ndarray:
    """Signed distances (positive inside) of the poster shapes on a [-1, 1]^2 face, at
    `supersample` x resolution so that coverage can be box-filtered into smooth edges."""
    s = size * supersample
    c = (np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1
    x = c[None, :]
    y = -c[:, None]  # texture rows run downward; shapes are defined with y up
    ax, ay = np.abs(x), np.abs(y)
    r = np.sqrt(x * x + y * y)

    def bar(a, b, half_a, half_b):  # axis-aligned box
        return np.minimum(half_a - a, half_b - b)

    def triangle(yy):  # apex (0, .62), base y = -.5 from x = -.62 to .62
        side = (-1.12 * ax - 0.62 * (yy - 0.62)) / np.hypot(1.12, 0.62)
        return np.minimum(yy + 0.5, side)

    u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)  # 45-degree frame for the X
    sdfs = [
        0.62 - r,                                                      # disc
        0.52 - np.maximum(ax, ay),                                     # square
        triangle(y + 0.04),                                            # triangle
        (0.74 - (ax + ay)) / np.sqrt(2),                               # diamond
        np.maximum(bar(ax, ay, 0.2, 0.66), bar(ax, ay, 0.66, 0.2)),    # plus
        0.17 - np.abs(r - 0.47),                                       # ring
        np.maximum(bar(np.abs(u), np.abs(v), 0.17, 0.78),
                   bar(np.abs(u), np.abs(v), 0.78, 0.17)),             # X
        np.minimum(0.66 - ax, 0.12 - np.abs(np.abs(y) - 0.42)),        # two horizontal bands
        np.minimum(0.62 - ay, 0.14 - np.abs(ax - 0.36)),               # two vertical bars
        np.maximum(0.3 - np.hypot(x, y - 0.36), 0.3 - np.hypot(x, y + 0.36)),  # two dots
    ]
    return np.stack(sdfs).astype(np.float32)


def _coverage(sdf: np.ndarray, size: int, supersample: int) -> np.ndarray:
    inside = (sdf > 0).astype(np.float32)
    n = sdf.shape[0]
    return inside.reshape(n, size, supersample, size, supersample).mean(axis=(2, 4))


def _wall_base(rng: np.random.Generator, size: int) -> np.ndarray:
    """Light grey panel [size, size] in 0..1: stone noise, pale pillars at both edges so
    that cell boundaries show (as in DeepMind Lab), and a darker plinth at the bottom."""
    noise = _fractal_noise(rng, 1, size, base=4, octaves=4)[0]
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    stone = 0.76 + 0.14 * noise
    u = (np.arange(size) + 0.5) / size
    # Faint stone blocks (four courses, joints staggered), like DeepMind Lab's stone walls.
    course = np.floor(u * 4)[:, None]
    joint = ((u[None, :] + 0.25 * (course % 2)) * 2) % 1.0
    bed = np.abs(u * 4 - np.rint(u * 4))[:, None] < 0.06
    mortar = bed | (np.minimum(joint, 1 - joint) < 0.025)
    stone = np.where(mortar, stone * 0.88, stone)
    edge = np.minimum(u, 1 - u)
    stone = np.where(edge[None, :] < 0.06, 0.93, stone)
    stone = np.where((edge[None, :] >= 0.06) & (edge[None, :] < 0.085), 0.66, stone)
    v = u[:, None]
    stone = np.where(v > 0.93, stone * 0.72, stone)
    return stone.astype(np.float32)


def _mip_chain(tex: np.ndarray, min_size: int = 2) -> list[np.ndarray]:
    """[N, T, T, 3] float textures -> list of uint8 levels, each half the size (box filter)."""
    levels = [tex]
    while levels[-1].shape[1] > min_size:
        t = levels[-1]
        n, s = t.shape[0], t.shape[1] // 2
        levels.append(t.reshape(n, s, 2, s, 2, 3).mean(axis=(2, 4)))
    return [np.clip(np.rint(t), 0, 255).astype(np.uint8) for t in levels]


@dataclass(frozen=True)
class Atlas:
    """One flat colour table holding mip chains of the wall and floor textures.

    Texel (level l, texture k, row v, column u) of the walls is
    `table[wall_offsets[l] + k * s*s + v * s + u]` with `s = wall_sizes[l]`; same for floors.
    """
    table: np.ndarray          # uint8 [N, 3]; entry SKY_INDEX is the sky
    wall_offsets: np.ndarray   # int64 [levels]
    wall_sizes: np.ndarray     # int64 [levels]
    floor_offsets: np.ndarray
    floor_sizes: np.ndarray
    n_tints: int
    n_shapes: int
    n_colours: int
    n_floor_colours: int

    def wall_texture_id(self, tint: int, shape: int, colour: int) -> int:
        return (tint * self.n_shapes + shape) * self.n_colours + colour


@lru_cache(maxsize=1)
def build_atlas() -> Atlas:
    """All wall textures (tint x shape x poster colour) and floor textures, as mip chains."""
    rng = np.random.default_rng(20250325)
    ss = 4
    cover = _coverage(_shape_sdfs(WALL_TEX, ss), WALL_TEX, ss)                  # [S, T, T]
    # A dark outline keeps a poster readable when its colour is close to the wall's.
    outline = _coverage(_shape_sdfs(WALL_TEX, ss) + 0.07, WALL_TEX, ss) - cover
    base = _wall_base(rng, WALL_TEX)                                            # [T, T]
    paint = 0.88 + 0.12 * _fractal_noise(rng, 1, WALL_TEX, base=8, octaves=2)[0]

    tints = 0.7 * WALL_TINTS + 0.3  # keep walls light and greyish, as in DeepMind Lab
    wall = base[None, :, :, None] * 235.0 * tints[:, None, None, :]          # [Ti, T, T, 3]
    wall = wall[:, None, None]                                                   # [Ti,1,1,T,T,3]
    cov = cover[None, :, None, :, :, None]
    out = outline[None, :, None, :, :, None]
    colour = POSTER_COLOURS[None, None, :, None, None, :] * paint[None, None, None, :, :, None]
    tex = wall * (1 - cov - out) + colour * cov + 20.0 * out                    # [Ti,S,C,T,T,3]
    n_t, n_s, n_c = tex.shape[:3]
    wall_levels = _mip_chain(tex.reshape(-1, WALL_TEX, WALL_TEX, 3).astype(np.float32))

    # Floors: grass-like noise, a few variants per colour; slightly darker cell seams give
    # the model a motion cue when walking over a uniformly coloured room.
    noise = _fractal_noise(rng, FLOOR_VARIANTS, FLOOR_TEX, base=2, octaves=4)      # [V, T, T]
    u = (np.arange(FLOOR_TEX) + 0.5) / FLOOR_TEX
    seam = np.minimum(np.minimum(u, 1 - u)[None, :], np.minimum(u, 1 - u)[:, None]) < 0.03
    lo, hi = noise.min(axis=(1, 2), keepdims=True), noise.max(axis=(1, 2), keepdims=True)
    light = 0.82 + 0.3 * (noise - lo) / (hi - lo) - 0.07 * seam[None]
    floor = FLOOR_COLOURS[:, None, None, None, :] * light[None, :, :, :, None]    # [F,V,T,T,3]
    floor_levels = _mip_chain(floor.reshape(-1, FLOOR_TEX, FLOOR_TEX, 3))

    chunks, offsets, offset = [SKY_COLOUR[None]], {"wall": [], "floor": []}, 1
    for name, levels in (("wall", wall_levels), ("floor", floor_levels)):
        for level in levels:
            offsets[name].append(offset)
            flat = level.reshape(-1, 3)
            chunks.append(flat)
            offset += flat.shape[0]
    return Atlas(
        table=np.ascontiguousarray(np.concatenate(chunks)),
        wall_offsets=np.array(offsets["wall"], np.int64),
        wall_sizes=np.array([lv.shape[1] for lv in wall_levels], np.int64),
        floor_offsets=np.array(offsets["floor"], np.int64),
        floor_sizes=np.array([lv.shape[1] for lv in floor_levels], np.int64),
        n_tints=n_t, n_shapes=n_s, n_colours=n_c, n_floor_colours=len(FLOOR_COLOURS),
    )
