"""Probe scripts: the history-guided cache interpolates between its two caches; revisit fraction; eval comparison."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def _compare_evals(monkeypatch, capsys, *args) -> subprocess.CompletedProcess:
    """scripts/compare_evals.py run in this process (a fresh interpreter costs seconds; the pooling test
    below runs the script as users do), read back as a subprocess's result: its refusals are
    SystemExit(message), which Python prints to stderr with exit status 1. Any other exception, a
    traceback in a real run, propagates and fails the test."""
    spec = importlib.util.spec_from_file_location("compare_evals", SCRIPT.parent / "compare_evals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["compare_evals.py", *map(str, args)])
    capsys.readouterr()
    try:
        module.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    return subprocess.CompletedProcess(["compare_evals.py", *map(str, args)], code or 0, out, err)


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


def _eval_results(path: Path, checkpoint: str, psnr: list[list[float]], revisit: list[list[bool]], seed: int = 0,
                  ratios: dict[str, float] | None = None, dataset: str = "data/maze-test", window: int = 16,
                  detail: float | None = None):
    """A results.json as `worldsim eval` writes it, reduced to what the comparison reads; `detail`
    stands for the recorded frames (each episode's `truth`), None for an eval older than it."""
    import json

    import numpy as np

    from worldsim.evaluate import aggregate

    path.mkdir(parents=True)
    episodes = [{"id": f"{i:06d}", "revisit": r, "per_frame": {"multilevel": {"psnr": p, "ssim": [0.5] * len(p)}}}
                for i, (p, r) in enumerate(zip(psnr, revisit))]
    if detail is not None:
        for e in episodes:
            e["truth"] = {"detail": [detail] * len(e["revisit"]), "change": [0.1] * len(e["revisit"])}
    summary = aggregate([{"conditions": {"multilevel": {"psnr": np.asarray(p), "ssim": np.full(len(p), 0.5)}},
                          "revisit": None if r is None else np.asarray(r)} for p, r in zip(psnr, revisit)],
                        ["multilevel"], False)
    summary["multilevel"].update(ratios or {})  # sharpness / motion, as newer evals report them
    results = {"format": "worldsim-eval", "format_version": 1, "metrics": {"lpips": {"status": "not installed"}},
               "config": {"checkpoint": checkpoint, "dataset": dataset, "dataset_split": "test",
                          "episode_ids": [e["id"] for e in episodes], "seed": 0, "window": window,
                          "session_seeds": [seed + i for i in range(len(psnr))], "context": 8, "generate": 4},
               "ground_truth": {"episodes": episodes, "summary": summary, "teacher_forced_episodes": []}}
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_compare_evals_pools_the_revisits_of_the_episodes_with_poses(tmp_path):
    """One episode without poses blanked the revisit rows, as it blanked eval's own numbers."""
    script = SCRIPT.parent / "compare_evals.py"
    revisit = [[False, False, True, True], None, [True, False, False, False]]
    old_psnr = [[12.0, 13.0, 11.0, 10.0], [14.0, 12.0, 12.0, 13.0], [9.0, 10.0, 11.0, 12.0]]
    new_psnr = [[p + 1.5 * bool(r and r[i]) for i, p in enumerate(ps)] for ps, r in zip(old_psnr, revisit)]
    old = _eval_results(tmp_path / "old", "ckpt-old", old_psnr, revisit)
    new = _eval_results(tmp_path / "new", "ckpt-new", new_psnr, revisit)
    res = subprocess.run([sys.executable, str(script), str(new), str(old)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line.strip("|").split("|")[4].strip()
            for line in res.stdout.splitlines() if line.startswith("| long context")}
    assert rows[("long context (multilevel)", "revisit frames")] == "+1.50"
    assert rows[("long context (multilevel)", "other frames")] == "+0.00"


def test_compare_evals_pairs_the_same_frames_of_two_checkpoints(tmp_path, monkeypatch, capsys):
    """NEW - OLD per frame: a checkpoint better only where the view repeats shows it on revisit frames only;
    two runs over different episodes or seeds are refused rather than compared."""
    revisit = [[False, False, True, True], [False, True, True, False], [True, False, False, False]]
    old_psnr = [[12.0, 13.0, 11.0, 10.0], [14.0, 12.0, 12.0, 13.0], [9.0, 10.0, 11.0, 12.0]]
    new_psnr = [[p + 1.5 * r for p, r in zip(ps, rs)] for ps, rs in zip(old_psnr, revisit)]
    old = _eval_results(tmp_path / "old", "ckpt-old", old_psnr, revisit)
    new = _eval_results(tmp_path / "new", "ckpt-new", new_psnr, revisit, ratios={"sharpness": 0.6, "motion": 0.45})
    res = _compare_evals(monkeypatch, capsys, str(new), str(old))
    assert res.returncode == 0, res.stderr
    # the new run reports sharpness and motion, the old one (an older eval) does not
    assert "| long context (multilevel) | 0.60 | n/a | 0.45 | n/a |" in res.stdout.split("Sharpness and motion")[1]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line.strip("|").split("|")[4].strip()
            for line in res.stdout.splitlines() if line.startswith("| long context")}
    assert rows[("long context (multilevel)", "revisit frames")] == "+1.50"
    assert rows[("long context (multilevel)", "other frames")] == "+0.00"
    assert "ckpt-new" in res.stdout and "ckpt-old" in res.stdout and "still frames" not in res.stdout

    # two starts of the same frames are compared, each named: still frames before the context (session 24)
    config = json.loads((new / "results.json").read_text())
    config["config"]["still_frames"] = 44
    (new / "results.json").write_text(json.dumps(config))
    res = _compare_evals(monkeypatch, capsys, str(new), str(old))
    assert res.returncode == 0, res.stderr
    assert ", 44 still frames" in res.stdout.splitlines()[0] and ", 0 still frames" in res.stdout.splitlines()[1]
    assert "settings that differ" not in res.stdout

    # two samplers or precisions on the same frames compare, but the differences are named (they were silent)
    config["config"].update(sampler_used={"steps": 1, "cfg": 1.0}, precision_used="fp32")
    (new / "results.json").write_text(json.dumps(config))
    config_old = json.loads((old / "results.json").read_text())
    config_old["config"].update(sampler_used={"steps": 4, "cfg": 1.0}, precision_used="bf16")
    (old / "results.json").write_text(json.dumps(config_old))
    res = _compare_evals(monkeypatch, capsys, str(new), str(old))
    assert res.returncode == 0, res.stderr
    assert "settings that differ (new vs old): precision 'fp32' vs 'bf16'; steps 1 vs 4" in res.stdout
    # an older run that did not record a setting differs in nothing it did not record
    config_old["config"].update(sampler_used={"steps": 1}, precision_used=None)
    (old / "results.json").write_text(json.dumps(config_old))
    res = _compare_evals(monkeypatch, capsys, str(new), str(old))
    assert res.returncode == 0 and "settings that differ" not in res.stdout, res.stdout + res.stderr
    # a bounded long-term memory is named against a run from before eval had the bound (it kept every frame)
    config["config"]["memory_frames"] = 64
    (new / "results.json").write_text(json.dumps(config))
    res = _compare_evals(monkeypatch, capsys, str(new), str(old))
    assert res.returncode == 0 and "settings that differ (new vs old): memory_frames 64 vs 0" in res.stdout, res.stdout
    config["config"]["memory_frames"] = 0
    (new / "results.json").write_text(json.dumps(config))

    # by generated-frame range: frames 1-2 gain 0 / 0.75 / 0.75 dB in the three episodes, frames 3-4 1.5 / 0.75 / 0
    res = _compare_evals(monkeypatch, capsys, str(new), str(old), "--by-frame", "2")
    assert res.returncode == 0, res.stderr
    by_frame = res.stdout.split("By generated-frame range")[1]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line.strip("|").split("|")[4].strip()
            for line in by_frame.splitlines() if line.startswith("| long context")}
    assert rows == {("long context (multilevel)", "frames 1-2"): "+0.50",
                    ("long context (multilevel)", "frames 3-4"): "+0.75"}
    res = _compare_evals(monkeypatch, capsys, str(new), str(old), "--by-frame", "0")
    assert res.returncode != 0 and "--by-frame" in res.stderr

    other_seed = _eval_results(tmp_path / "seed1", "ckpt-new", new_psnr, revisit, seed=1)
    res = _compare_evals(monkeypatch, capsys, str(other_seed), str(old))
    assert res.returncode != 0 and "did not score the same frames" in res.stderr and "session_seeds" in res.stderr

    # the window decides which frames are revisits: runs of two windows are not paired
    other_window = _eval_results(tmp_path / "w8", "ckpt-new", new_psnr, revisit, window=8)
    res = _compare_evals(monkeypatch, capsys, str(other_window), str(old))
    assert res.returncode != 0 and "'window' differs (8 vs 16)" in res.stderr

    # the dataset is told by its frames: one dataset under two paths pairs, two under one path do not
    runs = {name: _eval_results(tmp_path / name, "ckpt", old_psnr, revisit, dataset=dataset, detail=detail)
            for name, dataset, detail in (("a", "data/maze-test", 0.5), ("b", "/abs/data/maze-test", 0.5),
                                          ("c", "data/maze-test", 0.7))}
    res = _compare_evals(monkeypatch, capsys, str(runs["b"]), str(runs["a"]))
    assert res.returncode == 0, res.stderr
    res = _compare_evals(monkeypatch, capsys, str(runs["c"]), str(runs["a"]))
    assert res.returncode != 0 and "episode 000000's recorded frames differ" in res.stderr

    not_eval = tmp_path / "checkpoint"  # a folder of another kind is named, not compared
    not_eval.mkdir()
    (not_eval / "results.json").write_text('{"format": "worldsim-checkpoint"}')
    res = _compare_evals(monkeypatch, capsys, str(not_eval), str(old))
    assert res.returncode != 0 and str(not_eval / "results.json") in res.stderr and "not a worldsim eval" in res.stderr
    for damaged in ([], {"format": "worldsim-eval", "config": {}, "ground_truth": {"summary": {}}}):
        (not_eval / "results.json").write_text(json.dumps(damaged))  # valid JSON of the wrong shape: named too
        res = _compare_evals(monkeypatch, capsys, str(not_eval), str(old))
        assert res.returncode != 0 and str(not_eval / "results.json") in res.stderr and "Traceback" not in res.stderr


def test_sharpness_probe_replays_the_eval_turn_probe_and_measures_motion(tmp_path):
    """scripts/probe_sharpness.py scores the same 360-degree-turn pairs as `worldsim eval` (same
    maze, context and seed), and its motion and sharpness ratios tell a still image from reality."""
    import numpy as np

    from _eval_fixtures import save_tiny_checkpoint
    from worldsim.dataset import Dataset
    from worldsim.evaluate import EvalConfig, self_consistency
    from worldsim.world import WorldModel

    spec = importlib.util.spec_from_file_location("probe_sharpness", SCRIPT.parent / "probe_sharpness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = record_tiny_dataset(tmp_path / "nav", episodes=1, length=8)
    ck = save_tiny_checkpoint(tmp_path / "ck")
    ds = Dataset(data)
    row = module.probe(str(ck), [ds.episodes[0].maze_seed], 4, "multilevel", "fp32")
    cfg = EvalConfig(out=str(tmp_path / "e"), probe_episodes=1, probe_context=4, progress=False)
    sc = self_consistency(WorldModel.load(ck, device="cpu"), cfg, ds, False)
    assert row["self-consistency PSNR"] == sc["summary"]["turn_360"]["multilevel"]["psnr"]["mean"]
    assert row["motion (generated / real)"] > 0 and row["sharpness (generated / real)"] > 0

    still = np.full((5, 8, 8, 3), 90, np.uint8)
    stripes = still.copy()
    stripes[:, :, ::2] = 200
    assert module.gradient_energy(still) == 0
    assert module.gradient_energy(stripes) == 110.0  # every horizontal step changes by 110, no vertical one


def test_probe_play_scores_dream_v0_against_reality_on_the_same_walks(tmp_path, capsys, one_torch_thread):
    """scripts/probe_play.py plays each maze through Dream-v0 with the real simulator beside it.
    Every checkpoint gets the same walks: the baseline against itself differs by exactly 0, and
    another checkpoint's paired difference is the difference of the two means over mazes.
    Its main() runs in this process (a fresh interpreter's torch import costs seconds); the test
    below runs the script as users do."""
    from _eval_fixtures import save_tiny_checkpoint

    data = record_tiny_dataset(tmp_path / "nav", episodes=2, length=12)
    base, other = str(save_tiny_checkpoint(tmp_path / "a")), str(save_tiny_checkpoint(tmp_path / "b", seed=1))
    spec = importlib.util.spec_from_file_location("probe_play", SCRIPT.parent / "probe_play.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    module.main([base, base, other, "--data", str(data), "--mazes", "3", "--context", "3", "--frames", "20",
                 "--precision", "fp32", "--device", "cpu"])  # a refusal would be SystemExit: the test fails
    res = subprocess.CompletedProcess("probe_play.py", 0, *capsys.readouterr())
    assert "has 2 episodes, fewer than --mazes 3" in res.stdout
    assert "| frame 1 | frames 2-16 | frames 17-20 | sharpness | motion |" in res.stdout
    scores_part, diff_part = res.stdout.split("| checkpoint - ")
    scores = [[float(x) for x in line.split("|")[2:-1]] for line in scores_part.splitlines()
              if line.startswith(f"| {tmp_path}")]  # base, base, other: all, frame 1, 2-16, 17-20, sharpness, motion
    diffs = [line.split("|")[1:-1] for line in diff_part.splitlines()[2:] if line.startswith("| ")]
    assert len(scores) == 3 and len(diffs) == 2, res.stdout
    assert all(len(row) == 6 and all(np.isfinite(row)) for row in scores) and 0 < scores[0][0] < 100
    assert scores[0] == scores[1] and scores[2] != scores[0]  # the same walks and frames twice; another model
    assert diffs[0][0].strip() == base and diffs[0][1].strip() == "+0.00" and "0 of 2" in diffs[0][3]
    assert diffs[1][0].strip() == other and abs(float(diffs[1][1]) - (scores[2][0] - scores[0][0])) <= 0.011


def test_probe_play_names_a_missing_checkpoint_in_one_line(tmp_path):
    data = record_tiny_dataset(tmp_path / "nav", episodes=1, length=8)
    res = subprocess.run([sys.executable, str(SCRIPT.parent / "probe_play.py"), str(tmp_path / "nope"),
                          "--data", str(data), "--mazes", "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("probe_play: ") and "nope" in res.stderr and "not found" in res.stderr


def test_time_decode_stays_on_the_cpu_where_a_gpu_is_the_default(tmp_path, monkeypatch, capsys):
    """scripts/time_decode.py compares WorldModel.decode with a plain decoder it builds on the CPU.
    On a GPU machine WorldModel.load's default device is CUDA, and the plain decode of CUDA latents
    failed ("Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor) should be the
    same"). Here `cuda is available` is faked: a world loaded onto the default device fails at once
    on this CPU-only torch, so the script must name the CPU itself."""
    import runpy

    from _tiny_world import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    script = Path(__file__).resolve().parents[1] / "scripts" / "time_decode.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--checkpoint", str(ck), "--frames", "1", "--timed", "2",
                                      "--threads", "1", "--precision", "fp32"])
    runpy.run_path(str(script), run_name="__main__")
    assert "decode channels-last" in capsys.readouterr().out
