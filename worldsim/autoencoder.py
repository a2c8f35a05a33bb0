"""Frame autoencoder in the spirit of DC-AE: 64x64x3 frames <-> (64/f)x(64/f)xC latents.

API
    AutoencoderConfig(resolution=64, in_channels=3, down_factor=8, latent_channels=16, channels=(...),
                      blocks_per_level=1, decoder_blocks_per_level=None)   # None: blocks_per_level
    AE_PRESETS: dict[str, AutoencoderConfig]        # "tiny" (tests), "small" (default), "base"
    Autoencoder(cfg)
      .encode(x [B,3,H,W] in [-1,1], normalize=True) -> z [B,C,h,w]   (normalized: divided by latent_scale)
      .decode(z [B,C,h,w], normalize=True) -> x [B,3,H,W]             (unclamped)
      .forward(x) -> reconstruction (raw path, what the AE trainer optimises)
      .reconstruction_loss(x, recon=None, kind) -> (loss, stats)       # L1 + MSE, or MSE
      .calibrate_scale(raw_latents) -> float     # sets the `latent_scale` buffer to their std
      .latent_scale: buffer (saved with the weights)
    frames_to_tensor(uint8 [...,H,W,3]) -> float [...,3,H,W] in [-1,1]
    tensor_to_frames(float [...,3,H,W]) -> uint8 [...,H,W,3] (numpy)

Design: convolutional residual blocks; every 2x down/up-sampling is a pixel (un)shuffle with a
conv, plus DC-AE's parameter-free "space-to-channel" shortcut (pixel-unshuffle then average
channel groups; up: repeat channels then pixel-shuffle), which makes deep compression train
quickly. The latent scale is measured on data so the FAR transformer sees unit-variance latents.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AutoencoderConfig:
    resolution: int = field(default=64, metadata={"help": "frame height = width in pixels"})
    in_channels: int = field(default=3, metadata={"help": "image channels"})
    down_factor: int = field(default=8, metadata={"help": "spatial down factor f (power of 2)"})
    latent_channels: int = field(default=16, metadata={"help": "latent channels C"})
    channels: tuple[int, ...] = field(
        default=(32, 64, 128, 128),
        metadata={"help": "conv width at each level (full res first); log2(f)+1 entries"},
    )
    blocks_per_level: int = field(default=1, metadata={"help": "residual blocks per level"})
    decoder_blocks_per_level: int | None = field(default=None, metadata={
        "help": "residual blocks per level of the decoder alone (default: blocks_per_level). With --ae-init and "
                "--ae-train decoder a larger value deepens the given decoder: its blocks are kept and the new ones "
                "start as identities, so training starts from the same reconstructions"})

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.in_channels != 3:  # the frames are RGB everywhere (frames_to_tensor); another count crashed mid-run
            raise ValueError(f"in_channels must be 3 (RGB frames), got {self.in_channels}")
        small = {name: v for name, v in (("resolution", self.resolution), ("down_factor", self.down_factor),
                                         ("latent_channels", self.latent_channels)) if v < 1}
        if small or min(self.channels, default=1) < 1:  # else a log2 domain error, a zero division, a negative size
            raise ValueError(", ".join(f"{k} must be >= 1, got {v}" for k, v in small.items())
                             or f"channels must each be >= 1, got {list(self.channels)}")
        if self.blocks_per_level < 1 or (self.decoder_blocks_per_level is not None and self.decoder_blocks_per_level < 1):
            raise ValueError(f"blocks per level must be >= 1, got {self.blocks_per_level} "
                             f"(decoder {self.decoder_blocks_per_level})")
        levels = int(round(math.log2(self.down_factor)))
        if 2**levels != self.down_factor:
            raise ValueError(f"down_factor must be a power of 2, got {self.down_factor}")
        if len(self.channels) != levels + 1:
            raise ValueError(
                f"channels needs log2(down_factor)+1 = {levels + 1} entries, got {len(self.channels)}"
            )
        if self.resolution % self.down_factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by down_factor {self.down_factor}")
        for a, b in zip(self.channels[:-1], self.channels[1:]):
            # the parameter-free shortcuts group or repeat channels, so the widths must divide
            if (4 * a) % b or (4 * b) % a:
                raise ValueError(f"channel widths {a}->{b}: 4*a must divide by b and 4*b by a")

    @property
    def latent_size(self) -> int:
        return self.resolution // self.down_factor

    @property
    def decoder_blocks(self) -> int:
        return self.blocks_per_level if self.decoder_blocks_per_level is None else self.decoder_blocks_per_level

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown autoencoder config keys: {sorted(unknown)}")
        return cls(**d)


AE_PRESETS: dict[str, AutoencoderConfig] = {
    "tiny": AutoencoderConfig(latent_channels=4, channels=(8, 16, 16, 16), blocks_per_level=1),
    "small": AutoencoderConfig(latent_channels=16, channels=(32, 64, 128, 128), blocks_per_level=1),
    "base": AutoencoderConfig(latent_channels=32, channels=(64, 128, 256, 256), blocks_per_level=2),
}

RECONSTRUCTION_LOSSES = ("l1+mse", "mse")


# ----------------------------------------------------------------------------------------------
# frames <-> tensors


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {x.dtype}")
    x = x.movedim(-1, -3).float()
    return x / 127.5 - 1.0


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [-1, 1] -> uint8 numpy [..., H, W, 3] (clamped, rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# building blocks


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(ch, 32), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = _norm(ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = _norm(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as identity: stable deep stacks
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class Downsample(nn.Module):
    """2x down: pixel-unshuffle + conv, plus the space-to-channel averaging shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c_out = c_out
        self.conv = nn.Conv2d(4 * c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(x, 2)  # (B, 4*c_in, H/2, W/2)
        B, C, H, W = x.shape
        shortcut = x.view(B, self.c_out, C // self.c_out, H, W).mean(dim=2)  # (B, c_out, H/2, W/2)
        return self.conv(x) + shortcut


class Upsample(nn.Module):
    """2x up: conv + pixel-shuffle, plus the channel-to-space repeating shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.repeats = 4 * c_out // c_in
        self.conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)  # (B, c_out, 2H, 2W)
        return F.pixel_shuffle(self.conv(x), 2) + shortcut


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(len(ch) - 1):
            layers += [ResBlock(ch[i]) for _ in range(cfg.blocks_per_level)]
            layers.append(Downsample(ch[i], ch[i + 1]))
        layers += [ResBlock(ch[-1]) for _ in range(cfg.blocks_per_level)]
        self.layers = nn.Sequential(*layers)
        self.norm_out = _norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))


def decoder_layout(cfg: AutoencoderConfig) -> list[tuple[str, int, int]]:
    """What each entry of `Decoder.layers` is: ("res", level, block index) or ("up", level, 0)."""
    top, blocks = len(cfg.channels) - 1, cfg.decoder_blocks
    layout = [("res", top, b) for b in range(blocks)]
    for i in reversed(range(top)):
        layout += [("up", i, 0)] + [("res", i, b) for b in range(blocks)]
    return layout


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.layers = nn.Sequential(*[
            ResBlock(ch[level]) if kind == "res" else Upsample(ch[level + 1], ch[level])
            for kind, level, _ in decoder_layout(cfg)])
        self.norm_out = _norm(ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.conv_in(z))
        return self.conv_out(F.silu(self.norm_out(h)))


def deepen_state_dict(state: dict[str, torch.Tensor], src: AutoencoderConfig,
                      dst: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """`src`'s autoencoder weights renamed for `dst`, whose decoder has as many or more blocks per level.

    Everything else must match. The blocks `dst` adds are absent from the result, so they keep
    their construction-time init, which is the identity (`ResBlock` zeroes its last conv): an
    autoencoder loaded with `load_state_dict(..., strict=False)` reconstructs exactly as `src`'s.
    """
    if dataclasses.replace(dst, decoder_blocks_per_level=src.decoder_blocks) != \
            dataclasses.replace(src, decoder_blocks_per_level=src.decoder_blocks):
        raise ValueError(f"only the decoder's blocks per level may differ: {src.to_dict()} vs {dst.to_dict()}")
    if dst.decoder_blocks < src.decoder_blocks:
        raise ValueError(f"cannot drop decoder blocks ({src.decoder_blocks} -> {dst.decoder_blocks} per level)")
    where = {entry: i for i, entry in enumerate(decoder_layout(dst))}
    renamed = {str(i): str(where[entry]) for i, entry in enumerate(decoder_layout(src))}
    out = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            index, rest = key[len("decoder.layers."):].split(".", 1)
            key = f"decoder.layers.{renamed[index]}.{rest}"
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# the autoencoder


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # std of raw latents on data; FAR works on z / latent_scale (unit variance)
        self.register_buffer("latent_scale", torch.ones(()))

    def _fold(self, x: torch.Tensor, feature_dims: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        lead = x.shape[:-feature_dims]
        return x.reshape(-1, *x.shape[-feature_dims:]), lead

    def encode(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[..., 3, H, W] in [-1,1] -> [..., C, h, w] (any leading dims)."""
        flat, lead = self._fold(x, 3)
        z = self.encoder(flat)
        if normalize:
            z = z / self.latent_scale
        return z.reshape(*lead, *z.shape[1:])

    def decode(self, z: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[..., C, h, w] -> [..., 3, H, W] (not clamped)."""
        flat, lead = self._fold(z, 3)
        if normalize:
            flat = flat * self.latent_scale
        x = self.decoder(flat)
        return x.reshape(*lead, *x.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x, normalize=False), normalize=False)

    def reconstruction_loss(
        self, x: torch.Tensor, recon: torch.Tensor | None = None, kind: str = "l1+mse"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L1 + MSE (or MSE alone) in pixel space ([-1,1]); stats are detached tensors (psnr in dB on [0,1]).

        L1 is robust early in training but aims at the median pixel; MSE alone is what PSNR scores,
        so fine-tuning a trained decoder on it trades a little sharpness for PSNR.
        """
        if kind not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"unknown reconstruction loss {kind!r} (known: {', '.join(RECONSTRUCTION_LOSSES)})")
        if recon is None:
            recon = self(x)
        l1 = (recon - x).abs().mean()
        mse = (recon - x).pow(2).mean()
        loss = l1 + mse if kind == "l1+mse" else mse
        psnr = 10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))  # range 2 -> peak^2 = 4
        return loss, {"loss": loss.detach(), "l1": l1.detach(), "mse": mse.detach(), "psnr": psnr}

    @torch.no_grad()
    def calibrate_scale(self, latents: torch.Tensor) -> float:
        """Set `latent_scale` to the std of raw (unnormalized) latents measured on data."""
        std = latents.detach().float().std().item()
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"cannot calibrate latent scale from latents with std {std}")
        self.latent_scale.fill_(std)
        return std
