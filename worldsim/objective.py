"""Flow-matching training objective for FAR with long-short context.

API
    ObjectiveConfig(clean_context_prob=0.5, t_mean=0.0, t_std=1.0, context_noise_prob=0.5,
                    context_noise_max=0.1, action_dropout=0.1, random_context_length=False,
                    self_context_prob=0.0, self_context_level=0.6, blind_window_prob=0.0,
                    blind_window_min_t=0.5)
    training_loss(far, latents [B,T,C,h,w], actions [B,T], generator=None, cfg=ObjectiveConfig())
        -> (loss scalar, stats: dict[str, detached tensor])
    sample_timesteps(shape, generator, device, mean, std) -> logit-normal t in (0, 1)

The data side hands over a sequence of (normalized) latents, up to a whole episode; this module
splits it: the last W = far.config.window frames are the short-term window (fine tokens), the
older frames the long-term context (coarse tokens, always clean). Inside the window each frame
gets its own logit-normal noise level and becomes clean context with probability
`clean_context_prob` (the last frame is always noisy, so every sample has a target). Flow
matching: x_t = t*noise + (1-t)*x0, target velocity = noise - x0; the loss is the MSE on the
noisy frames of the window only. Clean context frames (coarse ones included) may get a small
noise augmentation (x = (1-s)*x0 + s*noise, s ~ U(0, context_noise_max), also given to the
model) against autoregressive drift; with `self_context_prob` some are instead replaced by the
model's own one-step reconstruction of a noised copy (an extra forward pass without gradients),
so the context looks like the frames it generates when it plays. With `blind_window_prob` a
sample's whole window is noisy (levels >= `blind_window_min_t`, nothing clean but the coarse
long-term context): one-step prediction from a clean previous frame never needs the memory (the
eval's memory control measured no teacher-forced difference at all), these samples do. Actions are dropped to the
null class per frame with probability `action_dropout` (label dropout, for classifier-free
guidance).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from worldsim.model import FAR


@dataclass
class ObjectiveConfig:
    clean_context_prob: float = field(default=0.5, metadata={"help": "P(a window frame is clean context); last frame always noisy"})
    t_mean: float = field(default=0.0, metadata={"help": "logit-normal timestep mean"})
    t_std: float = field(default=1.0, metadata={"help": "logit-normal timestep std"})
    context_noise_prob: float = field(default=0.5, metadata={"help": "P(a clean context frame is noise-augmented)"})
    context_noise_max: float = field(default=0.1, metadata={"help": "augmentation level ~ U(0, max); 0 disables"})
    action_dropout: float = field(default=0.1, metadata={"help": "P(an action is replaced by the null class)"})
    random_context_length: bool = field(
        default=False, metadata={"help": "use the last L frames, L ~ U[window + 1, T] per batch (varied long context)"}
    )
    self_context_prob: float = field(default=0.0, metadata={
        "help": "P(a clean window context frame is replaced by the model's own reconstruction of it from a noised "
                "copy): the past then looks like generated frames, against autoregressive drift; 0 disables"})
    self_context_level: float = field(default=0.6, metadata={
        "help": "noise level of those copies ~ U(0, level): higher gives blurrier, more generated-looking frames"})
    blind_window_prob: float = field(default=0.0, metadata={
        "help": "P(a sample's whole window is noisy, at levels >= blind-window-min-t): with nothing clean in the "
                "window only the long-term context can tell the frames, which teaches the model to use it; 0 disables"})
    blind_window_min_t: float = field(default=0.5, metadata={
        "help": "lowest noise level of a blind window's frames (t = min_t + (1 - min_t) * logit-normal draw)"})

    def __post_init__(self) -> None:
        for name in ("clean_context_prob", "context_noise_prob", "action_dropout", "self_context_prob",
                     "blind_window_prob", "blind_window_min_t"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"objective {name} must be in [0, 1], got {getattr(self, name)}")


def _rand(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def sample_timesteps(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """Logit-normal t (SD3): sigmoid(N(mean, std)), concentrates training on mid noise levels."""
    return torch.sigmoid(torch.randn(shape, generator=generator, device=device) * std + mean)


def training_loss(
    far: FAR | torch.nn.Module,
    latents: torch.Tensor,
    actions: torch.Tensor,
    generator: torch.Generator | None = None,
    cfg: ObjectiveConfig | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-matching loss of one batch. `far` may be wrapped (DDP); its config is read through .module."""
    cfg = cfg or ObjectiveConfig()
    core = far.module if hasattr(far, "module") else far
    W, null = core.config.window, core.null_action
    device = latents.device
    B, T = latents.shape[:2]

    if cfg.random_context_length and T > W:
        # at least one coarse frame, so every parameter reaches the loss (DDP then needs no
        # find_unused_parameters, which warns and walks the autograd graph every step)
        L = int(torch.randint(W + 1, T + 1, (1,), generator=generator, device=device).item())
        latents, actions = latents[:, T - L :], actions[:, T - L :]
        T = L
    Wf = min(W, T)
    Tc = T - Wf  # frames 0..Tc-1 are long-term context (coarse, clean)

    x0 = latents
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    t = sample_timesteps((B, T), generator, device, cfg.t_mean, cfg.t_std)

    clean = _rand((B, T), generator, device) < cfg.clean_context_prob
    clean[:, :Tc] = True
    clean[:, -1] = False
    blind = torch.zeros(B, dtype=torch.bool, device=device)
    # (the loss is a mean over noisy frames, so a blind sample, all W frames noisy, weighs about
    # twice an ordinary one: intended, it is the memory signal the ordinary samples lack)
    if cfg.blind_window_prob > 0 and Tc > 0:  # no draws otherwise: the objective stays bit-identical
        blind = _rand((B,), generator, device) < cfg.blind_window_prob
        clean[:, Tc:] &= ~blind[:, None]
        t = torch.where(blind[:, None], cfg.blind_window_min_t + (1 - cfg.blind_window_min_t) * t, t)

    # noise augmentation of clean context: a small level s, also given to the model
    augment = clean & (_rand((B, T), generator, device) < cfg.context_noise_prob)
    s = torch.where(augment, _rand((B, T), generator, device) * cfg.context_noise_max, torch.zeros_like(t))

    x_ctx = x0
    selfed = torch.zeros_like(clean)
    if cfg.self_context_prob > 0 and T > 1:
        x_ctx, selfed = _self_context(core, x0, actions, clean, Tc, cfg, generator)

    level = torch.where(clean, s, t)[..., None, None, None]  # (B, T, 1, 1, 1)
    x_in = level * noise + (1 - level) * x_ctx  # noisy frames: x_ctx == x0 there
    t_in = torch.where(clean, torch.full_like(t, core.config.clean_t), t)

    drop = _rand((B, T), generator, device) < cfg.action_dropout
    actions_in = torch.where(drop, torch.full_like(actions, null), actions)

    v = far(x_in, t_in, actions_in, s)  # (B, Wf, C, h, w) for the fine window
    target = (noise - x0)[:, Tc:]
    per_frame = F.mse_loss(v.float(), target.float(), reduction="none").flatten(2).mean(-1)  # (B, Wf)
    noisy = (~clean[:, Tc:]).float()
    loss = (per_frame * noisy).sum() / noisy.sum().clamp_min(1.0)

    stats = {
        "loss": loss.detach(),
        "noisy_frames": noisy.sum().detach(),
        "clean_frac": clean[:, Tc:].float().mean().detach(),
        "coarse_frames": torch.tensor(float(Tc)),
        "t_mean": (t[:, Tc:] * noisy).sum().detach() / noisy.sum().clamp_min(1.0),
    }
    if cfg.blind_window_prob > 0:
        stats["blind_frac"] = blind.float().mean().detach()
    if cfg.self_context_prob > 0:
        stats["self_frac"] = selfed[:, Tc:].float().mean().detach()
    return loss, stats


@torch.no_grad()
def _self_context(core: FAR, x0: torch.Tensor, actions: torch.Tensor, clean: torch.Tensor, Tc: int,
                  cfg: ObjectiveConfig, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 with some clean window frames replaced by the model's one-step reconstruction x0_hat.

    One extra forward pass without gradients: every window frame noised to its own level
    u ~ U(0, self_context_level) (the coarse frames stay clean, as in training), and
    x0_hat = x_u - u * v. Those frames carry the model's own errors (blur, small shifts), which
    is what the context is made of when it plays. Only clean context frames are replaced, never
    the noisy frames whose velocity is the target, so the loss still targets the ground truth.
    """
    B, T = x0.shape[:2]
    device = x0.device
    u = torch.zeros(B, T, device=device)
    u[:, Tc:] = _rand((B, T - Tc), generator, device) * cfg.self_context_level
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    lv = u[..., None, None, None]  # (B, T, 1, 1, 1)
    x_u = lv * noise + (1 - lv) * x0
    is_window = torch.zeros(B, T, dtype=torch.bool, device=device)
    is_window[:, Tc:] = True
    t_in = torch.where(is_window, u, torch.full_like(u, core.config.clean_t))
    v = core(x_u, t_in, actions, torch.zeros_like(u))  # (B, Wf, C, h, w)
    x0_hat = (x_u[:, Tc:] - lv[:, Tc:] * v.to(x_u.dtype))
    selfed = clean & is_window & (_rand((B, T), generator, device) < cfg.self_context_prob)
    out = x0.clone()
    out[:, Tc:] = torch.where(selfed[:, Tc:, None, None, None], x0_hat, x0[:, Tc:])
    return out, selfed
