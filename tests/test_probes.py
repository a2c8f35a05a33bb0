"""scripts/probe_rollout.py: the history-guided cache interpolates between its two caches."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _eval_fixtures import record_tiny_dataset  # noqa: E402
from test_cache import context, tiny_world  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "probe_rollout.py"


def _probe_module():
    spec = importlib.util.spec_from_file_location("probe_rollout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rollout(world, cache, n: int = 6) -> torch.Tensor:
    frames, actions = context(9)  # longer than the tiny window (4): L2 holds frames
    s = world.new_session(frames, actions, cache_mode=cache, steps=2, cfg=1.0, seed=3)
    return torch.stack([s.step_latent(a) for a in (1, 3, 3, 0, 4, 2)[:n]])


def test_history_guidance_weight_one_is_the_long_context_and_zero_the_sliding_window():
    probe = _probe_module()
    world = tiny_world()
    long, short = _rollout(world, "multilevel"), _rollout(world, "sliding")
    assert not torch.allclose(long, short)  # the memory changes the frames: the test can tell them apart
    torch.testing.assert_close(_rollout(world, probe.HistoryGuidedContext(world.far, 1.0)), long)
    torch.testing.assert_close(_rollout(world, probe.HistoryGuidedContext(world.far, 0.0)), short,
                               rtol=1e-4, atol=1e-4)
    guided = _rollout(world, probe.HistoryGuidedContext(world.far, 2.0))
    assert not torch.allclose(guided, long) and torch.isfinite(guided).all()


def test_revisit_fraction_of_a_navigator_dataset(tmp_path):
    """The navigator turns in place and returns, so some window frames revisit older ones."""
    data = record_tiny_dataset(tmp_path / "nav", episodes=1, length=40)
    script = SCRIPT.parent / "revisit_fraction.py"
    res = subprocess.run([sys.executable, str(script), str(data), "--split", "test", "--seq-len", "12", "40",
                          "--window", "4", "--samples", "50"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    fractions = [float(x) for x in re.findall(r": ([0-9.]+) of window frames", res.stdout)]
    assert len(fractions) == 2 and all(0.0 < f <= 1.0 for f in fractions), res.stdout
