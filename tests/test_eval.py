"""`worldsim eval`: the scorer, the self-consistency pairing and tiny end-to-end runs."""
from __future__ import annotations

import dataclasses
import errno
import gc
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _eval_fixtures import FakeWorld, record_tiny_dataset, save_tiny_checkpoint  # noqa: E402

from worldsim import evaluate  # noqa: E402
from worldsim.evaluate import EvalConfig, EvalError, probe_pairs, run_eval, score_episode  # noqa: E402
from worldsim.metrics import PSNR_CAP_DB  # noqa: E402

OUTPUTS = ("results.json", "results.md", "psnr_vs_frame.png")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster than two on a shared, loaded CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return record_tiny_dataset(tmp_path_factory.mktemp("eval") / "data", episodes=2, length=20)


def _numbers(results: dict) -> dict:
    """Everything but timings, environment and paths."""
    r = {k: v for k, v in results.items() if k not in ("timing", "environment")}
    r["config"] = {k: v for k, v in r["config"].items() if k not in ("out", "dataset")}
    return r


def test_ground_truth_as_generation_scores_perfectly(tiny_data):
    from worldsim.dataset import Dataset

    ep = Dataset(tiny_data, split="test")[0]
    k = 12
    truth = ep.video
    gens = {"multilevel": truth[k:].copy(), "other": truth[k:].copy()}
    scored = score_episode(truth, gens, ep.poses, k, window=4)
    for name in gens:
        assert np.all(scored["conditions"][name]["psnr"] == PSNR_CAP_DB)
        np.testing.assert_allclose(scored["conditions"][name]["ssim"], 1.0, atol=1e-12)
    assert scored["revisit"].shape == (len(truth) - k,)
    summary = evaluate.aggregate([scored], ["multilevel"], lpips_on=False)
    assert summary["multilevel"]["psnr"]["overall"] == PSNR_CAP_DB
    assert summary["multilevel"]["ssim"]["overall"] == pytest.approx(1.0)
    assert summary["multilevel"]["lpips"]["overall"] is None
    assert summary["multilevel"]["sharpness"] == pytest.approx(1.0) and summary["multilevel"]["motion"] == pytest.approx(1.0)
    # what PSNR can reward by mistake shows in the ratios: a frozen view has no motion, a blurred one less detail
    frozen = np.repeat(truth[k - 1:k], len(truth) - k, axis=0)
    blurred = ((truth[k:].astype(np.float64) + np.roll(truth[k:], 1, axis=2) + np.roll(truth[k:], 1, axis=1)) / 3)
    summary = evaluate.aggregate([score_episode(truth, {"frozen": frozen, "blurred": blurred.astype(np.uint8)},
                                                ep.poses, k, window=4)], ["frozen", "blurred"], lpips_on=False)
    assert summary["frozen"]["motion"] == 0.0 and summary["frozen"]["sharpness"] > 0
    assert summary["blurred"]["sharpness"] < 0.9
    # a wrong shape is an error, not a silent broadcast
    with pytest.raises(ValueError, match="generated frames"):
        score_episode(truth, {"x": truth[k + 1:]}, ep.poses, k, window=4)


def test_revisit_gap_by_reach_bins_frames_by_age_and_reports_each_bin():
    """gaps()['revisit_by_age']: each revisit frame counted in the bin of its age (edges 64, 128,
    192, the last open), the bins' own PSNR means and differences, JSON-safe, and a table row each."""
    ages = np.array([-1, 16, 63, 64, 127, 128, 191, 192, 300])
    revisit = ages >= 0
    long = np.arange(9, dtype=np.float64) + 10.0  # 10 .. 18
    sliding = np.full(9, 10.0)

    def episode(shift: float) -> dict:
        return {"conditions": {"multilevel": {"psnr": long + shift}, "sliding": {"psnr": sliding},
                               "copy_last": {"psnr": sliding}}, "revisit": revisit, "revisit_age": ages}

    gp = evaluate.gaps([episode(0.0), episode(2.0)], [], seed=0)
    rows = gp["revisit_by_age"]
    assert [r["ages"] for r in rows] == [[0, 64], [64, 128], [128, 192], [192, None]]
    assert [r["frames"] for r in rows] == [4, 4, 4, 4]  # 2 per episode; the non-revisit frame in none
    # bin 64-127 holds frames 3 and 4: long 13, 14 (+2 in the second episode), sliding 10
    assert rows[1]["psnr"]["multilevel"] == pytest.approx(14.5) and rows[1]["psnr"]["sliding"] == 10.0
    assert [r["gap"] for r in rows] == pytest.approx([2.5, 4.5, 6.5, 8.5])
    assert rows[0]["episodes_positive"] == 2 and rows[0]["ci_low"] <= rows[0]["gap"] <= rows[0]["ci_high"]
    json.dumps(evaluate._jsonable(gp), allow_nan=False)  # no inf or numpy left
    md = evaluate.results_markdown({
        "config": {"checkpoint": "c", "dataset": "d", "dataset_split": "test", "context": 144, "generate": 156,
                   "window": 16, "steps": 4, "cfg": 1.0, "seed": 0, "checkpoint_config": {"data": {"seq_len": 96}}},
        "ground_truth": {"episodes_evaluated": 2, "gaps": gp},
        "metrics": {"lpips": {"status": "off"}, "definitions": {"psnr": "", "ssim": ""}}})
    assert "trained on 96-frame sequences" in md
    assert "| 16-63 | 4 | 12.50 | 10.00 | +2.50 |" in md and "| 192+ | 4 | 18.50 | 10.00 | +8.50 |" in md



def test_gaps_pool_the_revisit_and_rest_frames_and_average_episodes_overall():
    """gaps() on hand-made PSNRs: the revisit and rest gaps are pooled over the selected frames of all
    episodes (as the revisit / rest numbers are), the overall ones a mean of per-episode means (TECO)."""
    control = evaluate.MEMORY_CONTROL

    def episode(revisit, multilevel, sliding, other):
        psnr = {"multilevel": multilevel, "sliding": sliding, control: other, "copy_last": [0.0] * len(revisit)}
        return {"revisit": np.array(revisit), "revisit_age": None,
                "conditions": {k: {"psnr": np.array(v, dtype=np.float64)} for k, v in psnr.items()}}

    episodes = [episode([True, True, True, False], [20, 20, 20, 10], [10, 10, 10, 10], [15, 15, 15, 10]),
                episode([True, False, False, False], [12, 30, 30, 30], [14, 10, 10, 10], [12, 20, 20, 20])]
    g = evaluate.gaps(episodes, [], seed=0)
    assert g["revisit_multilevel_vs_sliding"]["gap"] == pytest.approx((10 + 10 + 10 - 2) / 4)  # not (10 - 2) / 2
    assert g["revisit_multilevel_vs_other_memory"]["gap"] == pytest.approx((5 + 5 + 5 + 0) / 4)
    assert g["rest_multilevel_vs_other_memory"]["gap"] == pytest.approx((0 + 10 + 10 + 10) / 4)
    assert g["rest_multilevel_vs_other_memory"]["frames"] == 4
    assert g["overall_multilevel_vs_sliding"]["gap"] == pytest.approx((30 / 4 + 58 / 4) / 2)
    assert g["overall_multilevel_vs_other_memory"]["gap"] == pytest.approx((15 / 4 + 30 / 4) / 2)


def test_probe_pairs_on_a_turn_in_place():
    step = math.radians(90)
    yaws = [0.0] * 2 + [-(j + 1) * step for j in range(8)]  # 2 context frames, then 2 full turns left
    poses = np.array([[1.5, 1.5, y] for y in yaws])
    pairs = probe_pairs(poses, context=2, pos_tol=0.1, yaw_tol=step / 2)
    # frame 5 (-360 deg) matches context frame 0; frames 6..9 match 2..5 (the first turn)
    assert pairs == [(5, 0), (6, 2), (7, 3), (8, 4), (9, 0)]
    # the control of each pair: the earlier frame at the spot that looks most the other way
    # (frame 5 faces 0 deg: frame 3 at -180; frame 7 at -540 = 180: frame 0 at 0, the earliest)
    assert evaluate.opposite_view_pairs(poses, pairs, pos_tol=0.1) == [(5, 3), (6, 4), (7, 0), (8, 2), (9, 3)]
    elsewhere = poses.copy()
    elsewhere[:5, 0] += 1.0  # nothing earlier at the same spot: no control
    assert evaluate.opposite_view_pairs(elsewhere, [(5, 0)], pos_tol=0.1) == []
    # standing still (a blocked move) is not a revisit
    still = np.array([[1.5, 1.5, 0.0]] * 4)
    assert probe_pairs(still, context=1, pos_tol=0.1, yaw_tol=0.1) == []


def test_probe_maze_seeds_stay_in_the_simulators_range_for_any_seed():
    """--seed 3000000 drew probe mazes from 3e9 on: the maze's 'maze_seed must be in [0, 2**31)' traceback."""
    from worldsim.dataset import split_for_maze_seed

    for seed in (0, 5, 3_000_000, 2**62):
        seeds = evaluate._pick_probe_maze_seeds(None, 3, seed)
        assert all(0 <= s < 2**31 and split_for_maze_seed(s) == "test" for s in seeds), (seed, seeds)
    assert evaluate._pick_probe_maze_seeds(None, 1, 5)[0] >= 1_005_000  # small seeds draw as before


def test_probe_paths_use_the_turn_step():
    names = ("noop", "forward", "backward", "turn_left", "turn_right")
    paths = evaluate._probe_paths(names, math.radians(10), forward=3, loops=2, with_forward=True)
    assert paths["turn_360"] == [3] * 72
    assert paths["out_and_back"] == ([1] * 3 + [3] * 18 + [1] * 3 + [3] * 18) * 2
    assert "out_and_back" not in evaluate._probe_paths(names, math.radians(10), 3, 1, with_forward=False)


def test_end_to_end_with_a_stand_in_model(tiny_data, tmp_path):
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "a"), episodes=2, context=12, generate=8, videos=1,
                     probe_episodes=1, probe_forward=2, progress=False)
    world = FakeWorld()
    res = run_eval(cfg, world=world)
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).is_file()
    assert len(list((tmp_path / "a").glob("episode_*.*"))) == 1
    assert not list((tmp_path / "a").glob(".*.tmp*"))  # atomic_write's temp twins
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    assert on_disk["ground_truth"]["summary"]["multilevel"]["psnr"]["overall"] == pytest.approx(
        res["ground_truth"]["summary"]["multilevel"]["psnr"]["overall"])
    # sessions are seeded with seed + episode index, the same for every condition
    assert sorted(set(s for _, s in world.sessions)) == [0, 1]
    assert {m for m, _ in world.sessions} == {"multilevel", "sliding"}
    summary = res["ground_truth"]["summary"]
    assert set(summary) == {"multilevel", "sliding", "copy_last", "autoencoder", "other_memory"}
    # the stand-in has no autoencoder: its "reconstruction" is the ground truth itself
    assert summary["autoencoder"]["psnr"]["overall"] == pytest.approx(PSNR_CAP_DB)
    assert res["metrics"]["lpips"]["available"] == evaluate.metrics.lpips_status()[0]
    md = (tmp_path / "a" / "results.md").read_text()
    assert "22.3" in md and "paper" in md and "copy last context frame" in md
    # the bars' differences, paired per frame, with an interval; they agree with the summary
    gp = res["ground_truth"]["gaps"]
    assert set(gp) == {"revisit_multilevel_vs_sliding", "overall_multilevel_vs_sliding",
                       "overall_multilevel_vs_copy_last", "teacher_forced_vs_copy_previous",
                       "revisit_multilevel_vs_other_memory", "rest_multilevel_vs_other_memory",
                       "overall_multilevel_vs_other_memory", "revisit_by_age"}
    ml, sl = summary["multilevel"]["psnr"], summary["sliding"]["psnr"]
    assert gp["overall_multilevel_vs_sliding"]["gap"] == pytest.approx(ml["overall"] - sl["overall"])
    # every revisit frame falls in exactly one reach bin, and the bins add up to the revisit gap
    by_age = gp["revisit_by_age"]
    assert sum(row["frames"] for row in by_age) == ml["revisit"]["n"] > 0
    assert gp["revisit_multilevel_vs_sliding"]["gap"] == pytest.approx(ml["revisit"]["mean"] - sl["revisit"]["mean"])
    assert gp["revisit_multilevel_vs_sliding"]["gap"] == pytest.approx(
        sum(row["gap"] * row["frames"] for row in by_age if row["frames"]) / ml["revisit"]["n"])
    assert "how far back the memory must reach" in md
    tf = res["ground_truth"]["teacher_forced_summary"]
    assert gp["teacher_forced_vs_copy_previous"]["gap"] == pytest.approx(
        tf["teacher_forced"]["psnr"]["overall"] - tf["teacher_copy"]["psnr"]["overall"])
    assert "Paired PSNR differences" in md and "teacher-forced - copy-previous-frame floor" in md
    # the plot can be redrawn from results.json alone
    evaluate.plot_results(on_disk, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sc = res["self_consistency"]["summary"]
    assert sc["turn_360"]["multilevel"]["psnr"]["n"] > 0
    assert sc["turn_360"]["multilevel"]["psnr_opposite_view"]["n"] == sc["turn_360"]["multilevel"]["psnr"]["n"]
    assert "against the opposite view" in md
    # sharpness and motion against reality: the ground truth's for the conditions, the simulator's for the probes
    assert summary["copy_last"]["motion"] == 0.0 and summary["autoencoder"]["motion"] == pytest.approx(1.0)
    assert 0 < summary["multilevel"]["motion"] and 0 < summary["multilevel"]["sharpness"]
    assert sc["turn_360"]["multilevel"]["motion"] > 0 and sc["turn_360"]["sliding"]["sharpness"] > 0
    assert "| sharpness | motion |" in md and "copying the last frame has motion 0" in md
    # the same seed gives the same numbers; another seed other numbers
    res_b = run_eval(cfg.__class__(**{**cfg.__dict__, "out": str(tmp_path / "b")}), world=FakeWorld())
    assert _numbers(res_b) == _numbers(res)
    res_c = run_eval(cfg.__class__(**{**cfg.__dict__, "out": str(tmp_path / "c"), "seed": 5, "videos": 0,
                                      "probe_episodes": 0}), world=FakeWorld())  # only its numbers are read
    assert res_c["ground_truth"]["summary"]["multilevel"] != summary["multilevel"]


def test_an_episode_without_poses_leaves_the_revisit_numbers_of_the_others(tiny_data, tmp_path):
    """One episode file without poses among posed ones blanked the revisit and rest numbers, their
    gaps and the by-age table of the whole run, without a word."""
    from worldsim.dataset import Dataset, write_episode_atomic

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    second = Dataset(data).episodes[1].file
    with np.load(second) as z:
        arrays = {k: z[k] for k in z.files if k != "poses"}
    write_episode_atomic(second, **arrays)
    cfg = EvalConfig(data=str(data), out=str(tmp_path / "a"), episodes=2, context=12, generate=8, videos=0,
                     probe_episodes=0, progress=False)
    res = run_eval(cfg, world=FakeWorld())
    assert "1 of 2 episodes have no poses: the revisit and rest numbers pool the other 1" in res["notes"]
    assert res["ground_truth"]["summary"]["multilevel"]["psnr"]["rest"] is not None
    assert "revisit_multilevel_vs_sliding" in res["ground_truth"]["gaps"]


def test_records_test_mazes_without_data(tmp_path):
    cfg = EvalConfig(out=str(tmp_path), episodes=1, context=6, generate=4, videos=0, probe_episodes=0,
                     teacher_forcing=False, progress=False)
    res = run_eval(cfg, world=FakeWorld())
    assert res["config"]["dataset_recorded_here"] is True
    from worldsim.dataset import Dataset, split_for_maze_seed

    ds = Dataset(tmp_path / "data")
    assert len(ds) == 1 and split_for_maze_seed(ds.episodes[0].maze_seed) == "test"


def test_an_interrupted_recording_of_test_mazes_stops_the_eval(tmp_path, monkeypatch):
    """record() keeps what it wrote and returns on Ctrl-C; the eval went on to score the few episodes
    recorded so far as if they were all it had been asked for."""
    from envs import recorder

    real = recorder._record_task
    calls = []

    def interrupted_at_the_second(task):
        calls.append(task["id"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(recorder, "_record_task", interrupted_at_the_second)
    cfg = EvalConfig(out=str(tmp_path), episodes=3, context=6, generate=4, videos=0, probe_episodes=0,
                     teacher_forcing=False, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, world=FakeWorld())
    assert not (tmp_path / "results.json").exists()


def test_split_val_scores_validation_mazes_and_never_test_ones(tiny_data, tmp_path):
    """--split val: for choosing sampler settings without looking at the mazes the bars are measured on."""
    from worldsim.dataset import Dataset, split_for_maze_seed

    cfg = EvalConfig(out=str(tmp_path / "v"), episodes=1, context=6, generate=4, videos=0, probe_episodes=1,
                     probe_forward=2, teacher_forcing=False, progress=False, split="val")
    res = run_eval(cfg, world=FakeWorld())
    ds = Dataset(tmp_path / "v" / "data")
    assert len(ds) == 1 and split_for_maze_seed(ds.episodes[0].maze_seed) == "val"
    assert res["config"]["dataset_split"] == "val"
    assert "(split: val)" in (tmp_path / "v" / "results.md").read_text()
    assert {split_for_maze_seed(p["maze_seed"]) for p in res["self_consistency"]["probes"]} == {"val"}
    with pytest.raises(EvalError, match=rf"{tiny_data}: no episodes in the val split"):
        run_eval(EvalConfig(**{**cfg.__dict__, "data": str(tiny_data)}), world=FakeWorld())


def test_clear_errors(tiny_data, tmp_path):
    with pytest.raises(EvalError, match=r"64x64.*32x32"):
        run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path), progress=False, context=4, generate=2),
                 world=FakeWorld(resolution=(64, 64)))
    with pytest.raises(EvalError, match="no test episode has 300 frames"):
        run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path), progress=False, context=200, generate=100),
                 world=FakeWorld())
    # --episodes 0 used to end as "interrupted" with nothing written
    with pytest.raises(EvalError, match="--episodes must be >= 1, got 0"):
        run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path), progress=False, context=4, generate=2, episodes=0),
                 world=FakeWorld())
    with pytest.raises(EvalError, match="--steps must be from 1 to 1000, got 0"):
        run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path), progress=False, context=4, generate=2, steps=0),
                 world=FakeWorld())
    # with --data nothing is recorded, so --record-length is not checked against the episodes asked for
    run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path / "given"), progress=False, context=4, generate=2,
                        episodes=1, probe_episodes=0, videos=0, record_length=3), world=FakeWorld())
    for bad in (-1, 0, 5):  # -1 named record's options, 0 meant the default, 5 recorded a dataset first
        with pytest.raises(EvalError, match=f"--record-length must be at least --context \\+ --generate = 6, got {bad}"):
            run_eval(EvalConfig(out=str(tmp_path / "rec"), progress=False, context=4, generate=2, record_length=bad),
                     world=FakeWorld())
        assert not (tmp_path / "rec").exists()
    # 99999999999999999999 overflowed torch's seeding; 2**32 scored exactly the sessions of --seed 0
    for seed in (99999999999999999999, 2**32):
        with pytest.raises(EvalError, match=rf"--seed must be from 0 to 2\*\*32 - 1, got {seed}"):
            run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path), progress=False, context=4, generate=2,
                                seed=seed), world=FakeWorld())
    # the second episode's session seed would be 2**32, refused by new_session after the first was scored
    with pytest.raises(EvalError, match=r"--seed 4294967295: the sessions take --seed \+ the episode index, up to "
                                        r"2\*\*32 - 1; give --seed <= 4294967294 for 2 episodes"):
        run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path), progress=False, context=4, generate=2,
                            episodes=2, probe_episodes=0, seed=2**32 - 1), world=FakeWorld())
    in_the_way = tmp_path / "results"
    in_the_way.write_text("not a folder")
    with pytest.raises(EvalError, match=f"--out {in_the_way}: exists and is not a folder"):
        run_eval(EvalConfig(data=str(tiny_data), out=str(in_the_way), progress=False, context=4, generate=2),
                 world=FakeWorld())
    assert in_the_way.read_text() == "not a folder"


@pytest.fixture()
def fake_lpips(tmp_path, monkeypatch):
    """A stand-in `lpips` package whose weight files exist (empty: nothing loads them, nothing is
    downloaded), so `metrics.lpips_status()` says it can run. `lpips.LPIPS(net=...)` returns a module
    whose distance is the mean absolute difference of each image pair, so the expected numbers follow
    from the frames; it checks that its inputs are frames scaled to [-1, 1] (uint8 v -> v / 127.5 - 1)
    and logs each call's batch size and smallest and largest input."""
    import types

    import torch

    package = tmp_path / "fake-lpips" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "weights" / "v0.1" / "alex.pth").write_bytes(b"")
    hub = tmp_path / "fake-hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / evaluate.metrics.ALEXNET_WEIGHTS).write_bytes(b"")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    log = types.SimpleNamespace(made=[], batches=[], low=math.inf, high=-math.inf)

    class MeanAbsoluteDifference(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            for t in (x, y):
                assert t.dtype == torch.float32 and t.ndim == 4 and t.shape[1] == 3  # N, C, H, W
                assert -1.0 <= float(t.min()) and float(t.max()) <= 1.0
                levels = (t + 1) * 127.5  # the uint8 values back: whole numbers only for v / 127.5 - 1
                assert torch.allclose(levels, levels.round(), atol=1e-3)
                log.low, log.high = min(log.low, float(t.min())), max(log.high, float(t.max()))
            log.batches.append(len(x))
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)  # [N, 1, 1, 1], as lpips.LPIPS gives

    def LPIPS(net="alex", version="0.1", **kwargs):
        log.made.append((net, version))
        return MeanAbsoluteDifference()

    module = types.ModuleType("lpips")
    module.__file__ = str(package / "__init__.py")
    module.__version__ = "0.0-stand-in"
    module.LPIPS = LPIPS
    monkeypatch.setitem(sys.modules, "lpips", module)
    return log


def _mean_abs_difference(frames: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per frame: what the stand-in LPIPS gives for uint8 frames, in the [-1, 1] scale."""
    return np.abs(frames.astype(np.float64) - truth.astype(np.float64)).mean(axis=(1, 2, 3)) / 127.5


def test_lpips_scores_frames_scaled_to_plus_minus_one_in_batches(fake_lpips):
    frames = np.random.default_rng(0).integers(0, 256, (2, 7, 8, 8, 3), dtype=np.uint8)
    ok, why = evaluate.metrics.lpips_status()
    assert ok, why
    scorer = evaluate.metrics.Lpips(device="cpu")
    assert fake_lpips.made == [("alex", "0.1")]
    got = scorer(frames[0], frames[1], batch=3)
    assert fake_lpips.batches == [3, 3, 1]
    np.testing.assert_allclose(got, _mean_abs_difference(frames[0], frames[1]), rtol=1e-5)
    assert scorer(frames[0, 0], frames[1, 0]) == pytest.approx(_mean_abs_difference(frames[0, :1], frames[1, :1])[0])
    assert fake_lpips.low == -1.0 and fake_lpips.high == 1.0  # uint8 0 and 255


def test_eval_reports_the_lpips_of_its_frames_when_lpips_can_run(tiny_data, tmp_path, fake_lpips):
    """With lpips installed (a stand-in here: the package is not), results.json and results.md carry
    each condition's LPIPS: per episode the mean over its generated frames, then the mean over episodes."""
    from worldsim.dataset import Dataset

    k, g = 12, 8
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "lp"), episodes=2, context=k, generate=g, videos=0,
                     probe_episodes=0, progress=False)
    res = run_eval(cfg, world=FakeWorld())
    assert res["metrics"]["lpips"]["available"] is True
    assert res["metrics"]["lpips"]["status"].startswith("lpips 0.0-stand-in alex v0.1")
    assert fake_lpips.made == [("alex", "0.1")] and fake_lpips.low < -0.5 and fake_lpips.high > 0.5

    # the frames each condition scores, made here again: the stand-in world is seeded with seed + episode
    expected: dict[str, list[float]] = {n: [] for n in ("multilevel", "sliding", "copy_last", "autoencoder",
                                                        "teacher_forced", "teacher_copy")}
    episodes = [e for e in Dataset(tiny_data, split="test").episodes if e.length >= k + g][:2]
    assert len(episodes) == 2
    for seed, info in enumerate(episodes):
        ep = Dataset(tiny_data, split="test").load(info)
        truth, acts = ep.video[: k + g], ep.actions[: k + g]
        target = truth[k:]
        frames = {}
        for mode in ("multilevel", "sliding"):
            session = FakeWorld().new_session(truth[:k], acts[:k], cache_mode=mode, seed=seed)
            frames[mode] = np.stack([session.step(int(a)) for a in acts[k:]])
        session = FakeWorld().new_session(truth[:k], acts[:k], cache_mode="multilevel", seed=seed)
        forced = []
        for t in range(k, k + g):
            forced.append(session.predict(int(acts[t])))
            session.append(truth[t], int(acts[t]))
        frames["teacher_forced"] = np.stack(forced)
        frames["teacher_copy"] = truth[k - 1: k + g - 1]
        frames["copy_last"] = np.repeat(truth[k - 1: k], g, axis=0)
        frames["autoencoder"] = target  # the stand-in world has no autoencoder: the truth itself
        for name, f in frames.items():
            expected[name].append(float(_mean_abs_difference(f, target).mean()))
    expected_overall = {name: float(np.mean(v)) for name, v in expected.items()}
    assert expected_overall["autoencoder"] == 0.0 and expected_overall["copy_last"] > 0.01

    on_disk = json.loads((tmp_path / "lp" / "results.json").read_text())
    for results in (res, on_disk):
        gt = results["ground_truth"]
        for name in ("multilevel", "sliding", "copy_last", "autoencoder"):
            assert gt["summary"][name]["lpips"]["overall"] == pytest.approx(expected_overall[name], rel=1e-5, abs=1e-9)
            assert gt["summary"][name]["lpips"]["overall_std_over_episodes"] == pytest.approx(
                float(np.std(expected[name])), rel=1e-4, abs=1e-9)
        for name in ("teacher_forced", "teacher_copy"):
            assert gt["teacher_forced_summary"][name]["lpips"]["overall"] == pytest.approx(
                expected_overall[name], rel=1e-5)
        assert gt["summary"]["other_memory"]["lpips"]["overall"] > 0
    md = (tmp_path / "lp" / "results.md").read_text()
    assert "LPIPS: lpips 0.0-stand-in alex v0.1" in md
    for name in ("multilevel", "sliding", "copy_last", "autoencoder"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {evaluate.CONDITION_LABELS[name]} |"))
        assert row.split(" | ")[3] == f"{expected_overall[name]:.3f}", row  # condition | PSNR | SSIM | LPIPS


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_end_to_end_tiny_checkpoint_cli_is_deterministic(tiny_data, tiny_checkpoint, tmp_path, capsys):
    from worldsim.cli import main

    outs = []
    for name in ("a", "b"):
        argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data), "--out", str(tmp_path / name),
                "--episodes", "2", "--context", "12", "--generate", "8", "--steps", "2", "--seed", "3",
                "--videos", "1", "--probe-episodes", "1", "--probe-forward", "2", "--probe-loops", "2",
                "--progress", "false", "--device", "cpu"]
        assert main(argv) == 0
        for f in OUTPUTS:
            assert (tmp_path / name / f).is_file()
        assert list((tmp_path / name).glob("episode_*.*"))
        outs.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert "FAR paper" in capsys.readouterr().out
    a, b = outs
    assert a["config"]["checkpoint"] == str(tiny_checkpoint)
    assert a["config"]["checkpoint_config"]["far"]["window"] == a["config"]["window"]
    assert a["config"]["session_seeds"] == [3, 4]
    assert _numbers(a) == _numbers(b)
    ml = a["ground_truth"]["episodes"][0]["per_frame"]
    assert len(ml["multilevel"]["psnr"]) == 8 and len(ml["sliding"]["ssim"]) == 8


def test_sampler_options_reach_the_real_model_through_the_cli(tiny_data, tiny_checkpoint, tmp_path, capsys):
    """--shift, --temperature, --generated-noise and --long-cache on the real (tiny) world model:
    each changes the generated frames and is reported; teacher forcing ignores the generated-frame
    noise (it generates nothing it keeps). The option tests above use a stand-in world model."""
    from worldsim.cli import main

    def run(name: str, *extra: str) -> dict:
        argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data), "--out", str(tmp_path / name),
                "--episodes", "1", "--context", "12", "--generate", "4", "--steps", "2", "--seed", "3", "--videos", "0",
                "--probe-episodes", "0", "--memory-control", "false", "--progress", "false", "--device", "cpu", *extra]
        assert main(argv) == 0
        return json.loads((tmp_path / name / "results.json").read_text())

    def frames(res: dict, key: str = "multilevel") -> list[float]:
        return res["ground_truth"]["episodes"][0]["per_frame"][key]["psnr"]

    def teacher_forced(res: dict) -> list[float]:
        return res["ground_truth"]["teacher_forced_episodes"][0]["per_frame"]["teacher_forced"]["psnr"]

    base = run("base")
    runs = {}
    for name, extra, used in (("shift", ("--shift", "3"), {"shift": 3.0}),
                              ("temperature", ("--temperature", "0.5"), {"temperature": 0.5}),
                              ("noise", ("--generated-noise", "0.5"), {"generated_noise": 0.5})):
        runs[name] = res = run(name, *extra)
        assert {k: res["config"]["sampler_used"][k] for k in used} == used, name
        assert frames(res) != frames(base), name
    assert teacher_forced(runs["noise"]) == teacher_forced(base)
    # the play cache changes the long-context condition only (the sliding window keeps its own)
    fast = run("fast", "--long-cache", "multilevel-fast")
    assert fast["config"]["long_cache"] == "multilevel-fast" and frames(fast) != frames(base)
    assert frames(fast, "sliding") == frames(base, "sliding")
    # a long-term memory bounded below the context forgets its oldest frames: the long context and
    # teacher forcing change, the window alone does not
    bounded = run("bounded", "--memory-frames", "2")
    assert bounded["config"]["memory_frames"] == 2 and frames(bounded) != frames(base)
    assert teacher_forced(bounded) != teacher_forced(base)
    assert frames(bounded, "sliding") == frames(base, "sliding")
    assert frames(run("roomy", "--memory-frames", "100")) == frames(base)  # a bound never reached changes nothing
    # a memory span below the context moves the long-term memory's time positions: the long context and
    # teacher forcing change, the window alone does not; the span used is recorded
    assert base["config"]["memory_span_used"] == 0
    spread = run("spread", "--memory-span", "5")
    assert spread["config"]["memory_span_used"] == 5 and frames(spread) != frames(base)
    assert teacher_forced(spread) != teacher_forced(base)
    assert frames(spread, "sliding") == frames(base, "sliding")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data), "--out", str(tmp_path / "x"),
                 "--memory-span", "4"]) == 2
    assert "--memory-span: memory_span must be 0 (frame indices) or greater than the window (4)" in capsys.readouterr().err


class _InterruptingWorld(FakeWorld):
    """Ctrl-C arrives while the second episode is being generated."""

    def new_session(self, *args, **kwargs):
        if len(self.sessions) >= 4:  # multilevel, sliding, memory control, teacher-forced of episode 0 done
            raise KeyboardInterrupt
        return super().new_session(*args, **kwargs)


def test_interrupt_keeps_the_finished_episodes(tiny_data, tmp_path):
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path), episodes=2, context=12, generate=8, videos=0,
                     progress=False)
    res = run_eval(cfg, world=_InterruptingWorld())
    assert res["interrupted"] is True
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["ground_truth"]["episodes_evaluated"] == 1
    assert on_disk["self_consistency"] == {"skipped": "interrupted"}
    assert len(on_disk["config"]["memory_donor_episode_ids"]) == 1  # one per evaluated episode
    # the ids and seeds of the episodes scored, not of those asked for (compare_evals pairs by them)
    assert len(on_disk["config"]["episode_ids"]) == len(on_disk["config"]["session_seeds"]) == 1
    assert "**Note:** interrupted after 1 of 2 episodes." in (tmp_path / "results.md").read_text()


def test_an_interrupt_during_the_probes_is_named_so(tiny_data, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "self_consistency", interrupted)
    res = run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path / "a"), episodes=2, context=12, generate=4,
                              videos=0, progress=False), world=FakeWorld())
    assert res["interrupted"] is True and res["ground_truth"]["episodes_evaluated"] == 2
    assert res["notes"] == ["interrupted during the self-consistency probes"]
    # a Ctrl-C while the last episode's video is written: the probes never ran
    monkeypatch.setattr(evaluate, "write_video", interrupted)
    res = run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path / "b"), episodes=1, context=12, generate=4,
                              videos=1, progress=False), world=FakeWorld())
    assert res["notes"] == ["interrupted after 1 of 1 episodes"]


def test_an_out_folder_it_cannot_write_is_refused_before_anything_is_generated(tiny_data, tmp_path, monkeypatch):
    """A read-only --out was found at the end: the whole eval (22 minutes for the bars) generated, then lost."""
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro" / ".write-check-x"))

    monkeypatch.setattr(evaluate.tempfile, "mkstemp", refused)
    world = FakeWorld()
    with pytest.raises(PermissionError) as caught:  # the file system's refusal: exit 1 naming the folder
        run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path / "ro"), episodes=1, context=12, generate=4,
                            videos=0, progress=False), world=world)
    assert caught.value.filename == str(tmp_path / "ro")
    assert world.sessions == []
    from worldsim.cli import main

    assert main(["eval", "--data", str(tiny_data), "--out", str(tmp_path / "ro"), "--episodes", "1"]) == 1


def test_a_video_the_disk_cannot_hold_keeps_the_episodes_scored_and_names_the_file(tiny_data, tmp_path, monkeypatch):
    """A full disk at the second episode's video lost both episodes' scores (no results.json)."""
    real = evaluate.write_video
    written = []

    def disk_full_at_the_second(path, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "write_video", disk_full_at_the_second)
    out = tmp_path / "full"
    with pytest.raises(OSError, match="No space left on device") as caught:
        run_eval(EvalConfig(data=str(tiny_data), out=str(out), episodes=2, context=12, generate=4, videos=2,
                            progress=False), world=FakeWorld())
    assert caught.value.filename.endswith(".mp4") and Path(caught.value.filename).parent == out  # not the staging folder
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["interrupted"] is True and on_disk["ground_truth"]["episodes_evaluated"] == 2
    assert on_disk["outputs"]["videos"] == [written[0].name]
    assert on_disk["notes"][-1].startswith("stopped: a video could not be written (")
    assert on_disk["notes"][-1].endswith(": No space left on device); 2 of 2 episodes scored, no probes")
    assert (out / "results.md").is_file() and (out / "psnr_vs_frame.png").is_file()


def test_a_second_ctrl_c_while_the_results_are_written_keeps_them(tiny_data, tmp_path, monkeypatch):
    """After the first Ctrl-C the outputs take seconds to write; a second one there left an empty folder."""
    import os
    import signal

    real = evaluate._write_text

    def interrupted_while_writing(path, text):
        os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt at the next bytecode
        real(path, text)

    monkeypatch.setattr(evaluate, "_write_text", interrupted_while_writing)
    # Ctrl-C raising KeyboardInterrupt, as in a terminal: a test run started in the background by a
    # shell (`cmd &`) inherits SIGINT ignored, and the kill above was then no interrupt at all
    own = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path), episodes=2, context=12, generate=4, videos=0,
                                progress=False), world=_InterruptingWorld())
    finally:
        signal.signal(signal.SIGINT, own)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["ground_truth"]["episodes_evaluated"] == 1
    assert (tmp_path / "results.md").is_file() and (tmp_path / "psnr_vs_frame.png").is_file()


def _video_inputs(context: int = 4, generate: int = 3):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (context + generate, 32, 32, 3), dtype=np.uint8)
    return truth, {m: truth[context:] for m in evaluate.GEN_CONDITIONS}, context, None


@pytest.mark.parametrize("failure", ["full disk", "read-only folder"])
def test_a_video_the_file_system_refuses_is_said_so_not_written_as_a_gif(tmp_path, monkeypatch, full_disk, unraisable,
                                                                         failure):
    """Any MP4 failure fell back to a GIF: on a full disk or a read-only folder the error named an
    episode_N.gif that never existed, hid the MP4's, and a PluginV3.__del__ traceback followed."""
    import imageio.v2 as imageio

    path = tmp_path / "episode_000007.mp4"
    if failure == "full disk":  # what imageio's ffmpeg writer says then; the file system has 0 bytes free
        def mimwrite(*args, **kwargs):
            raise OSError("[Errno 32] Broken pipe\n\nFFMPEG COMMAND:\n/bin/ffmpeg -y -f rawvideo x.mp4\n")

        monkeypatch.setattr(imageio, "mimwrite", mimwrite)
        monkeypatch.setattr("worldsim.dataset.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
        full_disk(tmp_path)
        want = "No space left on device"
    else:
        def mkstemp(suffix=None, prefix=None, dir=None, text=False):  # it names the temp file it tried
            raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / f"{prefix}x1y2{suffix}"))

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        want = "Read-only file system"
    with pytest.raises(OSError) as caught:
        evaluate.write_video(path, *_video_inputs())
    assert (caught.value.filename, caught.value.strerror) == (str(path), want)  # what the command line says
    del caught
    gc.collect()
    assert unraisable == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [
    RuntimeError("No ffmpeg exe could be found. Install ffmpeg on your system"),  # imageio-ffmpeg without its binary
    OSError("[Errno 32] Broken pipe\n\nFFMPEG COMMAND:\n/bin/ffmpeg -y -c:v libx264 x.mp4\n"),  # one without libx264
])
def test_a_video_without_an_mp4_encoder_is_a_gif(tmp_path, monkeypatch, failure):
    """Not an error: the eval's results matter more than its videos' format (an ffmpeg that cannot
    encode, on a disk with room, used to end the eval before results.json)."""
    import imageio.v2 as imageio

    real = imageio.mimwrite

    def no_ffmpeg(uri, ims, format=None, **kwargs):
        if format == "FFMPEG":
            raise failure
        return real(uri, ims, format=format, **kwargs)

    monkeypatch.setattr(imageio, "mimwrite", no_ffmpeg)
    truth, gens, context, revisit = _video_inputs()
    written = evaluate.write_video(tmp_path / "episode_000007.mp4", truth, gens, context, revisit)
    assert written == tmp_path / "episode_000007.gif" and [p.name for p in tmp_path.iterdir()] == [written.name]
    assert len(imageio.mimread(written)) == len(truth)


def test_probe_options_are_checked_before_the_ground_truth_run(tiny_data, tmp_path):
    """The probes run after every episode: a bad probe option used to fail there, and lose it all."""
    for option, value, message in (("probe_loops", 0, "--probe-loops must be >= 1, got 0"),
                                   ("probe_forward", -2, "--probe-forward must be >= 0, got -2"),
                                   ("probe_context", 0, "--probe-context must be >= 1, got 0"),
                                   ("probe_episodes", -3, "--probe-episodes must be >= 0, got -3"),
                                   ("videos", -1, "--videos must be >= 0, got -1"),
                                   ("seed", -1, r"--seed must be from 0 to 2\*\*32 - 1, got -1")):
        world = FakeWorld()
        with pytest.raises(EvalError, match=message):
            run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path / option), progress=False, context=4,
                                generate=2, **{option: value}), world=world)
        assert not (tmp_path / option).exists()


def test_probes_that_cannot_run_are_skipped_with_the_reason_and_the_ground_truth_kept(tiny_data, tmp_path):
    world = FakeWorld(simulator={"id": "worldsim/NotInstalled-v0", "settings": {"turn_step_deg": 10.0}})
    res = run_eval(EvalConfig(data=str(tiny_data), out=str(tmp_path), progress=False, context=12, generate=4,
                              videos=0, probe_episodes=1, probe_context=100), world=world)
    assert "fewer than --probe-context 100" in res["self_consistency"]["skipped"]
    assert json.loads((tmp_path / "results.json").read_text())["ground_truth"]["episodes_evaluated"] == 2


def test_fewer_episodes_than_asked_a_foreign_simulator_and_stale_videos_are_said(tiny_data, tmp_path, capsys):
    out = tmp_path / "reused"
    out.mkdir()
    (out / "episode_999999.mp4").write_bytes(b"an older run's video")
    (out / "episode_mine.mp4").write_bytes(b"a video the user keeps here")
    (out / "results.json").write_text(json.dumps({"outputs": {"videos": ["episode_999999.mp4"]}}))
    world = FakeWorld()
    world.simulator = {"id": "worldsim/Maze-v0", "settings": {"maze_size": [11, 11], "turn_step_deg": 10.0}}
    res = run_eval(EvalConfig(data=str(tiny_data), out=str(out), progress=False, context=12, generate=4,
                              episodes=5, videos=0, probe_episodes=0), world=world)
    err = capsys.readouterr().err
    assert "2 of the 5 episodes asked for" in err
    assert "the dataset's simulator differs from the one the checkpoint was trained on (maze_size:" in err
    assert res["notes"] and all(f"**Note:** {n}." in (out / "results.md").read_text() for n in res["notes"])
    assert not (out / "episode_999999.mp4").exists()  # the older run's, which its results.json listed
    assert (out / "episode_mine.mp4").is_file()  # a file no eval wrote stays


DMLAB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dmlab_example_300f.npz"


@pytest.mark.skipif(not DMLAB.is_file(), reason="the shared DMLab example file is not beside the checkout")
def test_paper_protocol_on_the_dmlab_file_without_poses(tmp_path):
    from worldsim.dataset import Dataset

    names = Dataset(DMLAB).action_names
    world = FakeWorld(resolution=(64, 64), window=16, simulator={})
    world.action_names = names
    cfg = EvalConfig(data=str(DMLAB), out=str(tmp_path), episodes=1, videos=0, probe_episodes=1,
                     teacher_forcing=False, progress=False)  # defaults: 144 -> 156
    res = run_eval(cfg, world=world)
    ml = res["ground_truth"]["summary"]["multilevel"]
    assert ml["psnr"]["overall"] is not None and ml["psnr"]["revisit"] is None  # no poses: no revisit split
    assert res["config"]["dataset_split"].startswith("all episodes")
    assert "skipped" in res["self_consistency"]  # no simulator, no turn step
    assert "Note: this run used" not in (tmp_path / "results.md").read_text()


def test_dmlab_clip_takes_the_checkpoint_action_names(tmp_path, dmlab_example_path):
    """A FAR/TECO DMLab .npz that never uses the last action still matches a 3-action checkpoint."""
    from types import SimpleNamespace

    data = np.load(dmlab_example_path)
    clip = tmp_path / "clip.npz"
    np.savez(clip, video=data["video"][:20], actions=np.zeros(20, np.int64))  # only action 0
    world = SimpleNamespace(resolution=(64, 64), action_names=("action_0", "action_1", "action_2"))
    ds, note = evaluate.load_test_split(clip, world)
    assert tuple(ds.action_names) == world.action_names and len(ds) == 1 and "no split" in note


def test_split_less_files_the_checkpoint_trained_on_score_only_the_hash_held_out_episodes(tmp_path, dmlab_example_path):
    """Files without split information are taken whole as held-out, unless the checkpoint's config
    names them as training data: then only the episodes training held out (hash of the id) count,
    and files with none held out are refused by name."""
    from types import SimpleNamespace

    data = np.load(dmlab_example_path)
    folder = tmp_path / "clips"
    folder.mkdir()
    # ep001 / ep002 hash to "test", ep000 / ep003 to "train" (latents.open_split's rule)
    for name in ("ep000", "ep001", "ep002", "ep003"):
        np.savez(folder / f"{name}.npz", video=data["video"][:20], actions=data["actions"][:20])
    names = ("action_0", "action_1", "action_2")
    stranger = SimpleNamespace(resolution=(64, 64), action_names=names, config={"data": {"datasets": ["elsewhere"]}})
    ds, note = evaluate.load_test_split(folder, stranger)
    assert len(ds) == 4 and note.startswith("all episodes")

    trained = SimpleNamespace(resolution=(64, 64), action_names=names,
                              config={"data": {"datasets": [str(folder)]}})
    ds, note = evaluate.load_test_split(folder, trained)
    assert sorted(e.id for e in ds.episodes) == ["ep001", "ep002"] and "held out" in note

    for name in ("ep001", "ep002"):
        (folder / f"{name}.npz").unlink()
    with pytest.raises(evaluate.EvalError, match="trained on these files"):
        evaluate.load_test_split(folder, trained)


def test_teco_layout_scores_the_test_folder_and_splits_the_other_files_as_training_did(tmp_path):
    """TECO's dmlab/{train,test}/<shard>/<n>.npz: the test split is the test folder's files, for a checkpoint
    trained on them or not; files beside them outside split folders are held out by their id hash, as
    training holds them out."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    root = tmp_path / "dmlab"
    for name in ("train/0/0", "train/0/9", "test/0/0", "test/1/0"):  # train-0-9's id hash says "test"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        np.savez(root / f"{name}.npz", video=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
                 actions=rng.integers(0, 3, 8))
    names = ("action_0", "action_1", "action_2")
    for data in ({"datasets": ["elsewhere"]}, {"datasets": [str(root)]}):
        world = SimpleNamespace(resolution=(16, 16), action_names=names, config={"data": data})
        ds, note = evaluate.load_test_split(root, world)
        assert [e.id for e in ds.episodes] == ["test-0-0", "test-1-0"] and note == "test"
        ds, note = evaluate.load_test_split(root / "test", world)
        assert [e.id for e in ds.episodes] == ["0-0", "1-0"] and note == "test"
    fake = FakeWorld(resolution=(16, 16), simulator={})
    fake.action_names = names
    with pytest.raises(evaluate.EvalError, match="no episodes in the test split"):  # a train folder holds none out
        run_eval(EvalConfig(data=str(root / "train"), out=str(tmp_path / "e"), progress=False), world=fake)
    # files outside split folders beside them: ep001 / ep002 hash to "test", ep000 to "train"
    for name in ("ep000", "ep001", "ep002"):
        np.savez(root / f"{name}.npz", video=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
                 actions=rng.integers(0, 3, 8))
    ds, note = evaluate.load_test_split(root, world)
    assert [e.id for e in ds.episodes] == ["ep001", "ep002", "test-0-0", "test-1-0"] and "hash of their id" in note


def test_turn_probe_without_a_simulator_or_poses_pairs_the_full_turn_with_the_last_context_frame(tmp_path):
    """When the simulator cannot start here and the episode has no poses, the turn probe knows only
    where the last context frame stands: the full turn is scored against that frame, not against an
    earlier context frame the recorded agent may have left."""
    from worldsim.dataset import Dataset

    folder = tmp_path / "clips"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.savez(folder / "ep.npz", video=rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8),
             actions=rng.integers(0, 5, 12))
    world = FakeWorld(simulator={"id": "worldsim/NotInstalled-v0", "settings": {"turn_step_deg": 30}})
    cfg = EvalConfig(data=str(folder), out=str(tmp_path / "e"), probe_episodes=1, probe_context=4, probe_loops=1,
                     progress=False)
    ds = Dataset(folder, action_names=world.action_names)
    res = evaluate.self_consistency(world, cfg, ds, bar_enabled=False)
    assert res["context_source"] == "test episode (first frames)"
    (probe,) = res["probes"]
    assert probe["pairs"] and probe["pairs"][0] == [4 + 12 - 1, 3]  # 12 turns of 30 degrees, back at frame 3



@pytest.mark.parametrize("window, beyond", [(12, 1), (13, 0)])
def test_a_probe_view_a_whole_window_back_counts_as_beyond_the_window(tmp_path, window, beyond):
    """Generating frame t, the short window holds t - W + 1 .. t, so the frame W back is only in L2:
    the full turn of 12 steps (age 12) is beyond a window of 12 and inside one of 13."""
    from worldsim.dataset import Dataset

    folder = tmp_path / "clips"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.savez(folder / "ep.npz", video=rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8),
             actions=rng.integers(0, 5, 12))
    world = FakeWorld(window=window, simulator={"id": "worldsim/NotInstalled-v0", "settings": {"turn_step_deg": 30}})
    cfg = EvalConfig(data=str(folder), out=str(tmp_path / "e"), probe_episodes=1, probe_context=4, probe_loops=1,
                     progress=False)
    res = evaluate.self_consistency(world, cfg, Dataset(folder, action_names=world.action_names), bar_enabled=False)
    assert res["probes"][0]["pair_age"] == [12]
    for mode in evaluate.GEN_CONDITIONS:
        row = res["summary"]["turn_360"][mode]
        assert row["psnr"]["n"] == 1 and row["psnr_beyond_window"]["n"] == beyond


def test_probes_walk_past_the_simulators_own_step_limit(tmp_path):
    """A checkpoint whose simulator settings keep a `max_steps` shorter than a probe (Maze-v0's
    default is 1000): the probes take the simulator without its limit, as play does."""
    from _eval_fixtures import MAZE_ID, TINY_SIM_SETTINGS

    world = FakeWorld(simulator={"id": MAZE_ID, "settings": {**TINY_SIM_SETTINGS, "max_steps": 5}})
    cfg = EvalConfig(out=str(tmp_path), probe_episodes=1, probe_forward=2, probe_loops=2, progress=False)
    res = evaluate.self_consistency(world, cfg, None, bar_enabled=False)
    assert [p["frames"] for p in res["probes"]] and all(p["frames"] > 5 for p in res["probes"])


def test_long_cache_runs_the_long_context_condition_in_the_play_cache(tiny_data, tmp_path):
    """--long-cache multilevel-fast: the long-context condition, teacher forcing and the probes
    use the cache `play` uses by default; the sliding baseline stays."""
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "f"), episodes=1, context=12, generate=4, videos=0,
                     probe_episodes=1, probe_forward=2, progress=False, long_cache="multilevel-fast")
    world = FakeWorld()
    res = run_eval(cfg, world=world)
    assert {m for m, _ in world.sessions} == {"multilevel-fast", "sliding"}
    assert res["config"]["long_cache"] == "multilevel-fast"
    assert "long-context cache = multilevel-fast" in (tmp_path / "f" / "results.md").read_text()


@pytest.fixture(scope="module")
def run_without_options(tiny_data, tmp_path_factory) -> tuple[FakeWorld, dict, Path]:
    """The world, results and --out of one run with no sampler option given (the checkpoint's settings
    apply), with the sizes of the option tests below; they only read it."""
    out = tmp_path_factory.mktemp("without-options") / "d"
    world = FakeWorld()
    res = run_eval(EvalConfig(data=str(tiny_data), out=str(out), episodes=1, context=12, generate=4, videos=0,
                              probe_episodes=1, probe_forward=2, progress=False), world=world)
    return world, res, out


def test_shift_option_reaches_every_session_and_the_results(tiny_data, tmp_path, run_without_options):
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "s"), episodes=1, context=12, generate=4, videos=0,
                     probe_episodes=1, probe_forward=2, progress=False, shift=2.5)
    world = FakeWorld()
    res = run_eval(cfg, world=world)
    assert len(world.shifts) > 4 and set(world.shifts) == {2.5}  # conditions, control, teacher forcing, probes
    assert res["config"]["sampler_used"] == {"steps": 1, "cfg": 1.0, "shift": 2.5, "temperature": 1.0,
                                             "generated_noise": 0.0, "context_noise": 0.0}
    assert "shift = 2.5," in (tmp_path / "s" / "results.md").read_text()
    # without the option the checkpoint's setting applies, 1 (uniform steps) where it has none
    world, res, _ = run_without_options  # this run with shift None
    assert set(world.shifts) == {None} and res["config"]["sampler_used"]["shift"] == 1.0
    with pytest.raises(EvalError, match="--shift must be a finite number > 0, got 0.0"):
        run_eval(EvalConfig(**{**cfg.__dict__, "shift": 0.0}), world=FakeWorld())


def test_temperature_option_reaches_every_session_and_the_results(tiny_data, tmp_path, run_without_options):
    """--temperature reaches teacher forcing too: it shapes every frame the model samples."""
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "t"), episodes=1, context=12, generate=4, videos=0,
                     probe_episodes=1, probe_forward=2, progress=False, temperature=0.7)
    world = FakeWorld()
    res = run_eval(cfg, world=world)
    assert len(world.temperatures) > 4 and set(world.temperatures) == {0.7}  # conditions, control, TF, probes
    assert res["config"]["sampler_used"]["temperature"] == 0.7
    assert "temperature = 0.7," in (tmp_path / "t" / "results.md").read_text()
    world, res, _ = run_without_options  # this run with temperature None: the checkpoint's, 1 where it has none
    assert set(world.temperatures) == {None} and res["config"]["sampler_used"]["temperature"] == 1.0
    with pytest.raises(EvalError, match="--temperature must be a finite number >= 0, got -0.5"):
        run_eval(EvalConfig(**{**cfg.__dict__, "temperature": -0.5}), world=FakeWorld())


def test_memory_frames_option_reaches_every_long_context_session_and_the_results(tiny_data, tmp_path,
                                                                                 run_without_options):
    """--memory-frames bounds the long-term memory of every long-context session (conditions, control,
    teacher forcing, probes), as play's option does; 0, the default, keeps every frame."""
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "m"), episodes=1, context=12, generate=4, videos=0,
                     probe_episodes=1, probe_forward=2, progress=False, memory_frames=6)
    world = FakeWorld()
    res = run_eval(cfg, world=world)
    long_sessions = [bound for (mode, _), bound in zip(world.sessions, world.memory_frames) if mode != "sliding"]
    assert len(long_sessions) > 3 and set(long_sessions) == {6}  # conditions, control, TF, probes
    assert res["config"]["memory_frames"] == 6
    assert "long-term memory bounded to 6 frames" in (tmp_path / "m" / "results.md").read_text()
    world, res, out = run_without_options  # this run with memory_frames 0
    assert set(world.memory_frames) == {None} and res["config"]["memory_frames"] == 0
    assert "bounded" not in (out / "results.md").read_text()
    with pytest.raises(EvalError, match="--memory-frames must be >= 0"):
        run_eval(EvalConfig(**{**cfg.__dict__, "memory_frames": -1}), world=FakeWorld())
    out = tmp_path / "negative-span"  # refused before anything runs: no results folder is left behind
    with pytest.raises(EvalError, match="--memory-span must be >= 0"):
        run_eval(EvalConfig(**{**cfg.__dict__, "memory_span": -1, "out": str(out)}), world=FakeWorld())
    assert not out.exists()


def test_threads_option_sets_torchs_threads_and_refuses_zero(tiny_data, tmp_path):
    """As play, train and bench take it: on a shared machine one thread is faster than torch's default."""
    import torch

    before = torch.get_num_threads()
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "t"), episodes=1, context=12, generate=2, videos=0,
                     probe_episodes=0, progress=False, threads=1)
    try:
        torch.set_num_threads(2)  # (OMP_NUM_THREADS=1 in a test run would make 1 the default)
        run_eval(cfg, world=FakeWorld())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(EvalError, match="--threads must be >= 1, got 0"):
        run_eval(EvalConfig(**{**cfg.__dict__, "threads": 0}), world=FakeWorld())


def test_generated_noise_option_reaches_every_generating_session_and_the_results(tiny_data, tmp_path,
                                                                                  run_without_options):
    """--generated-noise reaches every session that feeds the model its own frames (conditions, memory
    control, probes); teacher forcing feeds it none, so there it is not passed."""
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "g"), episodes=1, context=12, generate=4, videos=0,
                     probe_episodes=1, probe_forward=2, progress=False, generated_noise=0.25)
    world = FakeWorld()
    res = run_eval(cfg, world=world)
    assert world.generated_noise.count(0.25) >= 4 and set(world.generated_noise) == {0.25, None}
    assert world.generated_noise.count(None) == 1  # the teacher-forced session
    assert res["config"]["sampler_used"]["generated_noise"] == 0.25
    assert "generated noise = 0.25," in (tmp_path / "g" / "results.md").read_text()
    world, res, _ = run_without_options  # generated_noise None: the checkpoint's level, 0 where it has none
    assert set(world.generated_noise) == {None} and res["config"]["sampler_used"]["generated_noise"] == 0.0
    with pytest.raises(EvalError, match=r"--generated-noise must be in \[0, 1\), got 1.5"):
        run_eval(EvalConfig(**{**cfg.__dict__, "generated_noise": 1.5}), world=FakeWorld())


def test_still_frames_go_before_the_context_of_every_generated_condition_only(tiny_data, tmp_path,
                                                                               run_without_options):
    """--still-frames starts the generated conditions (and the memory control) as play starts a game: copies
    of the episode's first frame before its context. Teacher forcing and the probes keep the frames given."""
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "p"), episodes=1, context=12, generate=4, videos=0,
                     probe_episodes=1, probe_forward=2, progress=False, still_frames=3)
    world = FakeWorld()
    res = run_eval(cfg, world=world)
    lengths = [len(c) for c in world.contexts]
    generated = [(c, a) for c, a in zip(world.contexts, world.context_actions) if len(c) == 15]
    assert len(generated) == len(evaluate.GEN_CONDITIONS) + 1  # the conditions and the memory control
    plain, _, plain_out = run_without_options  # this run with still_frames 0: its contexts are the frames given
    given = [(c, a) for c, a in zip(plain.contexts, plain.context_actions) if len(c) == 12][:len(generated)]
    noop = world.action_names.index("noop")
    for (c, a), (g, ga) in zip(generated, given):
        np.testing.assert_array_equal(c[3:], g)  # the recorded context, whole and in order
        np.testing.assert_array_equal(c[:3], np.repeat(g[:1], 3, axis=0))  # after 3 copies of its first frame
        assert a[:3].tolist() == [noop] * 3 and a[3:].tolist() == ga.tolist()
    assert not np.array_equal(generated[0][0][0], generated[-1][0][0])  # the control's copies: the donor's frame
    assert 12 in lengths and cfg.probe_context in lengths  # teacher forcing, the probes: as given
    assert res["config"]["still_frames"] == 3
    assert "still frames before the context = 3" in (tmp_path / "p" / "results.md").read_text()
    assert 15 not in [len(c) for c in plain.contexts]
    assert "still frames" not in (plain_out / "results.md").read_text()
    with pytest.raises(EvalError, match="--still-frames must be from 0 to 10000, got -1"):
        run_eval(EvalConfig(**{**cfg.__dict__, "still_frames": -1}), world=FakeWorld())
    no_noop = FakeWorld()
    no_noop.action_names = ("action_0", *no_noop.action_names[1:])
    with pytest.raises(EvalError, match="--still-frames 3 needs a 'noop' action"):
        run_eval(cfg, world=no_noop)


def test_precision_option_loads_the_transformer_in_bf16_and_says_so(tiny_data, tiny_checkpoint, tmp_path):
    """--precision bf16 (what play uses by default on CPUs with native bf16) is recorded with the
    results; the default stays exact fp32."""
    from worldsim.cli import main

    for precision in ("bf16", None):
        out = tmp_path / str(precision)
        argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data), "--out", str(out),
                "--episodes", "1", "--context", "12", "--generate", "4", "--steps", "1", "--videos", "0",
                "--probe-episodes", "0", "--progress", "false", "--device", "cpu"]
        assert main(argv + (["--precision", precision] if precision else [])) == 0
        res = json.loads((out / "results.json").read_text())
        used = precision or "fp32"
        assert res["config"]["precision_used"] == used
        assert f"precision = {used}." in (out / "results.md").read_text()


def test_memory_control_swaps_only_the_long_term_context(tiny_data, tmp_path):
    """The control condition: the frames already in L2 when generation starts (index < K - W + 1)
    come from another test maze, the short window and everything after it are the episode's own."""
    from worldsim.dataset import Dataset

    k, window = 12, 4
    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "a"), episodes=2, context=k, generate=8, videos=0,
                     probe_episodes=0, teacher_forcing=False, progress=False)
    world = FakeWorld(window=window)
    res = run_eval(cfg, world=world)
    ds = Dataset(tiny_data, split="test")
    eps = [ds[0], ds[1]]
    assert eps[0].maze_seed != eps[1].maze_seed
    assert res["config"]["memory_control_status"] == "on"
    assert res["config"]["memory_donor_episode_ids"] == [eps[1].id, eps[0].id]
    old = k - window + 1
    assert res["config"]["memory_control_old_frames"] == old
    # per episode: multilevel, sliding, control - the control's context is the spliced one
    assert [m for m, _ in world.sessions] == ["multilevel", "sliding", "multilevel"] * 2
    for i, (me, donor) in enumerate([(eps[0], eps[1]), (eps[1], eps[0])]):
        plain, control = world.contexts[3 * i], world.contexts[3 * i + 2]
        np.testing.assert_array_equal(plain, me.video[:k])
        np.testing.assert_array_equal(control[:old], donor.video[:old])
        np.testing.assert_array_equal(control[old:], me.video[old:k])
    # the stand-in only looks at the last context frame, so its control equals its long context
    gp = res["ground_truth"]["gaps"]["overall_multilevel_vs_other_memory"]
    assert gp["gap"] == pytest.approx(0.0) and gp["ci_low"] == pytest.approx(0.0)
    assert "long context from another maze" in (tmp_path / "a" / "results.md").read_text()

    # off: no control session; a context that fits in the window: skipped, and said so
    world = FakeWorld(window=window)
    res = run_eval(EvalConfig(**{**cfg.__dict__, "out": str(tmp_path / "b"), "memory_control": False}), world=world)
    assert "other_memory" not in res["ground_truth"]["summary"] and len(world.sessions) == 4
    res = run_eval(EvalConfig(**{**cfg.__dict__, "out": str(tmp_path / "c"), "context": 2, "generate": 4}),
                   world=FakeWorld(window=window))
    assert "other_memory" not in res["ground_truth"]["summary"]
    assert res["config"]["memory_control_status"].startswith("skipped: the context (2) fits in the short window")
    assert "Memory control skipped" in (tmp_path / "c" / "results.md").read_text()


def test_swapping_nothing_or_more_than_an_episode_is_refused():
    video, actions = np.zeros((10, 4, 4, 3), np.uint8), np.zeros(10, np.int64)
    for old in (0, 11):
        with pytest.raises(ValueError, match=f"cannot swap the first {old} frames"):
            evaluate.with_other_memory(video, actions, video, actions, old)


def test_memory_control_needs_another_maze(tmp_path):
    data = record_tiny_dataset(tmp_path / "one", episodes=1, length=20)
    cfg = EvalConfig(data=str(data), out=str(tmp_path / "a"), episodes=1, context=12, generate=8, videos=0,
                     probe_episodes=0, teacher_forcing=False, progress=False)
    res = run_eval(cfg, world=FakeWorld())
    assert res["config"]["memory_control_status"] == \
        "skipped: no test episode of another maze to take the long context from"
    assert "other_memory" not in res["ground_truth"]["summary"]


def test_an_episode_too_short_to_score_can_still_give_its_memory(tiny_data, tmp_path):
    """The control takes only the donor's first K - W + 1 frames: a second episode too short for
    K + G frames used to leave the control "skipped" although it could serve."""
    import shutil

    from worldsim.dataset import Dataset

    data = tmp_path / "mixed"
    shutil.copytree(tiny_data, data)
    index = json.loads((data / "index.json").read_text())
    short = index["episodes"][1]
    ep = Dataset(data)[1]
    np.savez(data / short["file"], video=ep.video[:10], actions=ep.actions[:10], poses=ep.poses[:10])
    short["length"] = 10
    (data / "index.json").write_text(json.dumps(index))
    res = run_eval(EvalConfig(data=str(data), out=str(tmp_path / "a"), episodes=2, context=12, generate=8, videos=0,
                              probe_episodes=0, teacher_forcing=False, progress=False), world=FakeWorld())
    assert res["ground_truth"]["episodes_evaluated"] == 1  # K + G = 20 frames: only the first is scored
    assert res["config"]["memory_control_status"] == "on"  # K - W + 1 = 9 frames: the second gives them
    assert res["config"]["memory_donor_episode_ids"] == [short["id"]]


def test_rescore_recomputes_the_differences_of_an_earlier_run(tiny_data, tmp_path, capsys):
    from worldsim.cli import main

    cfg = EvalConfig(data=str(tiny_data), out=str(tmp_path / "a"), episodes=2, context=12, generate=8, videos=0,
                     probe_episodes=1, probe_forward=2, progress=False)
    res = run_eval(cfg, world=FakeWorld())
    path = tmp_path / "a" / "results.json"
    older = json.loads(path.read_text())
    del older["ground_truth"]["gaps"]  # as written before the differences existed
    path.write_text(json.dumps(older))
    (tmp_path / "a" / "results.md").write_text("stale")
    assert main(["eval", "--rescore", str(tmp_path / "a")]) == 0
    again = json.loads(path.read_text())
    assert again["ground_truth"]["gaps"] == json.loads(json.dumps(res["ground_truth"]["gaps"]))
    assert again["ground_truth"]["summary"] == json.loads(json.dumps(res["ground_truth"]["summary"]))
    assert "Paired PSNR differences" in (tmp_path / "a" / "results.md").read_text()
    assert "rewrote" in capsys.readouterr().out
    # a file from before the reach split: rescored without it, the rest as before
    for e in older["ground_truth"]["episodes"]:
        del e["revisit_age"]
    path.write_text(json.dumps(older))
    assert main(["eval", "--rescore", str(tmp_path / "a")]) == 0
    again = json.loads(path.read_text())["ground_truth"]["gaps"]
    assert "revisit_by_age" not in again
    assert again["revisit_multilevel_vs_sliding"] == json.loads(json.dumps(res["ground_truth"]["gaps"]["revisit_multilevel_vs_sliding"]))
    # options that a rescore cannot honour were dropped without a word: refused, and nothing is rewritten
    before = path.read_text()
    capsys.readouterr()
    assert main(["eval", "--rescore", str(tmp_path / "a"), "--out", str(tmp_path / "elsewhere"),
                 "--precision", "bf16"]) == 2
    assert "from its results.json alone; drop --out, --precision" in capsys.readouterr().err
    assert path.read_text() == before and not (tmp_path / "elsewhere").exists()
    # a folder without a results file: a clear error, exit code 2
    assert main(["eval", "--rescore", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{}")
    assert main(["eval", "--rescore", str(tmp_path / "bad")]) == 2
    assert "not a worldsim eval results file" in capsys.readouterr().err
    # valid JSON of the wrong shape (a list, a key or the episodes gone): named, no traceback, nothing rewritten
    good = json.loads(json.dumps(res))
    no_config = {k: v for k, v in good.items() if k != "config"}
    no_episodes = json.loads(json.dumps(good))
    del no_episodes["ground_truth"]["episodes"]
    bad_episode = json.loads(json.dumps(good))
    bad_episode["ground_truth"]["episodes"][0] = "episode"
    no_condition = json.loads(json.dumps(good))
    no_condition["ground_truth"]["summary"].pop("multilevel")
    no_tf_summary = json.loads(json.dumps(good))
    no_tf_summary["ground_truth"].pop("teacher_forced_summary")
    later_episode = json.loads(json.dumps(good))  # a later episode without a condition the others have
    later_episode["ground_truth"]["episodes"][-1]["per_frame"].pop("multilevel")
    other_version = json.loads(json.dumps(good))  # numbers of another format version may mean other things
    other_version["format_version"] = 99
    no_window = json.loads(json.dumps(good))  # was a KeyError traceback from results.md
    no_window["config"].pop("window")
    no_metrics = {k: v for k, v in good.items() if k != "metrics"}
    no_tf_episodes = json.loads(json.dumps(good))
    no_tf_episodes["ground_truth"].pop("teacher_forced_episodes")
    for damaged in ([], no_config, no_episodes, bad_episode, no_condition, no_tf_summary, later_episode,
                    other_version, no_window, no_metrics, no_tf_episodes):
        (tmp_path / "bad" / "results.json").write_text(json.dumps(damaged))
        assert main(["eval", "--rescore", str(tmp_path / "bad")]) == 2
        assert f"{tmp_path / 'bad' / 'results.json'}: not a worldsim eval results file" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["results.json"]


def test_teacher_forcing_predicts_each_frame_from_the_ground_truth_past():
    """The teacher-forced number (a headline bar) must see the real frames, never its own: with a
    model that predicts "the last frame I was given", teacher forcing returns the ground truth
    shifted by one frame (the copy-previous floor), and free generation repeats the context's last."""

    class LastFrameSession:
        def __init__(self, frames: np.ndarray, actions: np.ndarray) -> None:
            self.given, self.actions = [np.asarray(f) for f in frames], list(actions)

        def predict(self, action: int) -> np.ndarray:
            return self.given[-1].copy()

        def append(self, frame: np.ndarray, action: int) -> None:
            self.given.append(np.asarray(frame).copy())
            self.actions.append(int(action))

        def step(self, action: int) -> np.ndarray:
            frame = self.predict(action)
            self.append(frame, action)
            return frame

    class LastFrameWorld:
        def new_session(self, frames, actions, **kwargs):
            self.session = LastFrameSession(frames, actions)
            return self.session

    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    actions = rng.integers(0, 5, 12)
    world = LastFrameWorld()
    out = evaluate.teacher_forced(world, video, actions, context=5, count=7, steps=None, cfg=None, seed=0)
    np.testing.assert_array_equal(out, video[4:11])
    assert world.session.actions == list(actions)  # each frame appended with the action that produced it
    generated = evaluate.generate(world, video, actions, context=5, count=7, cache_mode="multilevel", steps=None,
                                  cfg=None, seed=0)
    np.testing.assert_array_equal(generated, np.repeat(video[4:5], 7, axis=0))


def test_the_opposite_view_control_takes_a_view_exactly_90_degrees_off_in_float32():
    """Poses come in float32: with a 1e-9 slack a view nine 10-degree turns (exactly 90 degrees) away
    was no control for 22 of the 36 headings, by rounding alone."""
    turn = np.float32(math.radians(10.0))
    missed = []
    for k in range(36):
        yaw = np.float32(-math.pi) + k * turn
        poses = np.array([[3.5, 2.5, yaw + 9 * turn], [6.5, 6.5, 0.0], [3.5, 2.5, yaw]], dtype=np.float32)
        if evaluate.opposite_view_pairs(poses, [(2, 0)], pos_tol=0.075) != [(2, 0)]:
            missed.append(k)
    assert missed == []


def test_max_frame_difference_reports_the_largest_per_frame_psnr_change(tmp_path, capsys):
    """scripts/max_frame_difference.py: how far any single frame moved between two runs of the same
    episodes (the means in compare_evals.py round to 0.01 dB)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mfd", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "max_frame_difference.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(gt: list[float], probe: list[float]) -> dict:
        return {"ground_truth": {"episodes": [{"per_frame": {"multilevel": {"psnr": gt, "ssim": [0.5] * len(gt)}}}]},
                "self_consistency": {"probes": [{"conditions": {"sliding": {"psnr": probe}}}]}}

    (tmp_path / "a.json").write_text(json.dumps(run([20.0, 21.0, 22.0], [15.0])))
    (tmp_path / "b.json").write_text(json.dumps(run([20.0, 21.25, 22.0], [15.0, 16.0])))
    assert script.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ground_truth: largest per-frame PSNR difference 0.25000 dB",  # SSIM lists are not PSNR: ignored
        "self_consistency: not the same frames in both runs (other episodes, probes or lengths)"]
    two = run([20.0, 21.0, 22.0], [15.0])
    two["ground_truth"]["episodes"].append(two["ground_truth"]["episodes"][0])  # a run of more episodes
    (tmp_path / "c.json").write_text(json.dumps(two))
    assert script.main([str(tmp_path / "c.json"), str(tmp_path / "a.json")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "ground_truth: not the same frames in both runs (other episodes, probes or lengths)")


def test_psnr_plot_marks_frames_that_hit_the_100_db_cap(tmp_path, monkeypatch):
    """runs/s31/evalR/psnr_vs_frame.png: the copy-last floor jumped by ~3.5 dB at frames 149 and 179, each a
    single episode's frame equal to the last context frame (PSNR capped at 100 dB in a mean over 24
    episodes); nothing on the plot said so. Those frames are marked and the legend explains the mark."""
    import matplotlib.figure

    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k)))
    per_frame = {"multilevel": np.full(6, 13.0), "copy_last": np.array([12.0, 12, 15.5, 12, 12, 12])}
    capped = {"multilevel": np.zeros(6, bool), "copy_last": np.array([False, False, True, False, False, False])}
    evaluate.write_plot(tmp_path / "a.png", per_frame, None, 10, "t", capped)
    evaluate.write_plot(tmp_path / "b.png", per_frame, None, 10, "t")
    marked, plain = ([t.get_text() for t in f.axes[0].get_legend().get_texts()] for f in figures)
    assert marked[-1] == "frame equal to the truth in an episode (100 dB cap)" and len(marked) == 3, marked
    assert len(plain) == 2 and not any("cap" in t for t in plain), plain
    (xs, ys) = figures[0].axes[0].lines[-1].get_data()
    assert list(xs) == [12] and list(ys) == [15.5]  # at the capped frame, on its condition's curve


def test_the_cap_markers_legend_entry_is_written_once_for_several_conditions(tmp_path, monkeypatch):
    """c35e7e7 dropped the "x  " the legend entry started with but kept looking for it, so every
    condition with a capped frame (copy floor and teacher-forced copy, say) added its own entry."""
    import matplotlib.figure

    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k)))
    per_frame = {"multilevel": np.array([13.0, 13, 16, 13]), "copy_last": np.array([12.0, 12, 15.5, 12])}
    capped = {"multilevel": np.array([False, False, True, False]), "copy_last": np.array([False, True, True, False])}
    evaluate.write_plot(tmp_path / "a.png", per_frame, None, 10, "t", capped)
    texts = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert sum("100 dB cap" in t for t in texts) == 1 and len(texts) == 3, texts
    marks = [ln for ln in figures[0].axes[0].lines if ln.get_marker() == "x"]
    assert [list(ln.get_xdata()) for ln in marks] == [[12], [11, 12]]  # both conditions still marked


def _psnr_plot_results(teacher_forcing: bool) -> dict:
    """A results dict as plot_results reads it: 2 episodes of 4 generated frames after K = 3."""
    def ep(names, revisit):
        return {"per_frame": {n: {"psnr": [20.0, 19.0, 18.5, 18.0]} for n in names}, "revisit": revisit}

    names = ("multilevel", "sliding", "copy_last")
    gt = {"episodes": [ep(names, [False, True, True, False]), ep(names, [False, False, True, False])],
          "teacher_forced_episodes": [ep(("teacher_forced", "teacher_copy"), None)] * 2 if teacher_forcing else [],
          "summary": dict.fromkeys(names)}
    return {"ground_truth": gt, "config": {"context": 3, "window": 2, "split": "test"}}


@pytest.mark.parametrize("teacher_forcing", [True, False])
def test_psnr_plot_title_covers_the_teacher_forced_lines_and_the_revisit_panel_says_what_it_counts(
        tmp_path, monkeypatch, teacher_forcing):
    """psnr_vs_frame.png's title said "PSNR per generated frame" over the teacher-forced lines too (one-step
    predictions from the recorded frames, not generated rollouts), and the lower panel's "revisit
    fraction" did not say of what: it is the share of the episodes whose frame at that index is a revisit."""
    import matplotlib.figure

    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k)))
    evaluate.plot_results(_psnr_plot_results(teacher_forcing), tmp_path / "psnr_vs_frame.png")
    top, bottom = figures[0].axes
    title = top.get_title().splitlines()
    assert title[0] == "PSNR against the recorded frames (2 test episodes, K=3, W=2)"
    assert "generated frame" not in top.get_title()
    if teacher_forcing:
        assert title[1] == "teacher-forced lines: one-step predictions from the recorded frames before, not rollouts"
        assert any(t.get_text().startswith("teacher-forced") for t in top.get_legend().get_texts())
    else:
        assert len(title) == 1
    assert bottom.get_title() == "revisits: share of the episodes whose frame at this index is a revisit"
    assert bottom.get_ylabel() == "share of\nepisodes"
    assert [p.get_height() for p in bottom.patches] == [0.0, 0.5, 1.0, 0.0]  # the share, per frame index


def test_the_videos_panels_are_parted_by_a_dark_line(tmp_path, monkeypatch):
    """The three panels of an episode video had no seam: the context frames, the same in all three,
    ran into each other. A dark 2-pixel line now parts them (as in play's dream | reality recordings),
    added between the panels so none of a panel is hidden, and the frame size stays even for yuv420p."""
    import imageio.v2 as imageio

    context, generate = 4, 3
    truth = np.full((context + generate, 32, 32, 3), 200, np.uint8)  # one grey: no edge of its own
    truth[:, :, 0] = 255  # the panel's edge columns differ from the seam's colour
    gens = {m: truth[context:] for m in evaluate.GEN_CONDITIONS}
    written_frames = []
    real = imageio.mimwrite
    monkeypatch.setattr(imageio, "mimwrite", lambda uri, ims, **kw: (written_frames.extend(ims), real(uri, ims, **kw)))
    written = evaluate.write_video(tmp_path / "episode_000001.mp4", truth, gens, context, None)
    frame = written_frames[0]
    panel = 32 * 8  # scaled to 256 pixels
    assert frame.shape[1] == 3 * panel + 2 * 2 and frame.shape[0] % 2 == 0 and frame.shape[1] % 2 == 0
    body = frame[16:16 + panel]  # below the caption strip
    for x in (panel, 2 * panel + 2):
        assert (body[:, x:x + 2] == 16).all()
    for x0 in (0, panel + 2, 2 * panel + 4):  # every panel whole, its edges included
        assert np.array_equal(body[:, x0:x0 + panel], np.kron(truth[0], np.ones((8, 8, 1), np.uint8)))
    if written.suffix == ".mp4":  # and the encoded video shows it
        decoded = imageio.mimread(written, format="FFMPEG")[0].astype(int)
        assert decoded.shape == frame.shape
        seam = decoded[16:16 + panel, panel:panel + 2].mean()
        assert seam < 60 and decoded[16:16 + panel, panel - 4:panel - 2].mean() > 150, seam


def test_a_second_eval_into_the_same_out_is_refused_while_the_first_runs(tiny_data, tiny_checkpoint, tmp_path,
                                                                           capsys):
    """Two evals into one --out wrote the same episode_<id>.mp4 and results.* names and each removed
    the videos the other's results.json listed: the folder ended up mixing two runs."""
    from worldsim.cli import main
    from worldsim.dataset import try_lock

    out = tmp_path / "same"
    out.mkdir()
    first = try_lock(out / ".lock")  # the first eval, still running
    args = ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data), "--out", str(out),
            "--episodes", "1", "--context", "4", "--generate", "2", "--steps", "1", "--teacher-forcing", "false",
            "--memory-control", "false", "--probe-episodes", "0", "--videos", "0"]
    try:
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: another `worldsim eval` is writing its results there" in err
        assert not (out / "results.json").exists()
    finally:
        first.close()
    assert main(args) == 0  # once it is done
    assert (out / "results.json").is_file()


def test_a_refused_eval_leaves_the_running_evals_lock_and_folder(tiny_data, tiny_checkpoint, tmp_path, monkeypatch,
                                                                  capsys):
    """Two evals started together into a new --out: the one refused by the other's lock took the
    folder for its own (it was not there when it looked) and its cleanup removed the other's .lock
    and the still-empty folder, so the running eval lost its folder and a third could lock it again."""
    import tempfile

    from worldsim.cli import main
    from worldsim.dataset import try_lock

    out = tmp_path / "new"
    held = []
    real = tempfile.mkstemp

    def first_eval_takes_the_lock(*a, **k):  # between this eval's look at --out and its lock
        if not held:
            held.append(try_lock(out / ".lock"))
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", first_eval_takes_the_lock)
    args = ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data), "--out", str(out),
            "--episodes", "1", "--context", "4", "--generate", "2", "--steps", "1", "--teacher-forcing", "false",
            "--memory-control", "false", "--probe-episodes", "0", "--videos", "0"]
    try:
        assert main(args) == 2
        assert "another `worldsim eval` is writing its results there" in capsys.readouterr().err
        assert (out / ".lock").is_file()
        assert try_lock(out / ".lock") is None  # still the first eval's
        assert list(out.iterdir()) == [out / ".lock"]
    finally:
        held[0].close()


class _Killed(BaseException):
    """Stands for SIGKILL or the out-of-memory killer: nothing of the eval's own handles it."""


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def test_an_eval_killed_in_a_reused_out_leaves_the_earlier_runs_outputs_as_they_were(tiny_data, tmp_path,
                                                                                        monkeypatch):
    """A second eval into the same --out, killed after its videos and before its results.json (written at
    the end), left its videos under the first run's names beside the first run's results.json, which
    then presented them (and its own plot) as its results."""
    out = tmp_path / "reused"
    cfg = EvalConfig(data=str(tiny_data), out=str(out), episodes=2, context=12, generate=4, videos=2,
                     probe_episodes=0, progress=False)
    first = run_eval(cfg, world=FakeWorld())
    before = _files(out)
    assert set(first["outputs"]["videos"]) < set(before)

    def killed(*args, **kwargs):  # after every episode and its video, before the outputs are written
        raise _Killed

    monkeypatch.setattr(evaluate, "self_consistency", killed)
    with pytest.raises(_Killed):  # one video of its own, of other frames (seed), is enough to be seen
        run_eval(dataclasses.replace(cfg, seed=5, videos=1), world=FakeWorld())
    assert _files(out) == before  # every file of the first run, byte for byte, and nothing else beside them
    monkeypatch.undo()

    # what SIGKILL leaves (no cleanup runs) goes with the next eval, whose outputs are then all its own
    (out / evaluate.UNFINISHED).mkdir()
    (out / evaluate.UNFINISHED / "episode_000000.mp4").write_bytes(b"a killed eval's video")
    third = run_eval(dataclasses.replace(cfg, seed=5, videos=1), world=FakeWorld())
    assert not (out / evaluate.UNFINISHED).exists()
    after = _files(out)
    assert set(after) == {*OUTPUTS, *third["outputs"]["videos"]} and len(third["outputs"]["videos"]) == 1
    assert json.loads(after["results.json"])["config"]["seed"] == 5
    assert after[third["outputs"]["videos"][0]] != before[third["outputs"]["videos"][0]]
    assert after["psnr_vs_frame.png"] != before["psnr_vs_frame.png"]


def test_a_plot_the_disk_cannot_hold_leaves_no_earlier_plot_beside_the_new_results(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "reused"
    cfg = EvalConfig(data=str(tiny_data), out=str(out), episodes=1, context=12, generate=4, videos=0,
                     probe_episodes=0, progress=False)
    run_eval(cfg, world=FakeWorld())

    def disk_full(results, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evaluate, "plot_results", disk_full)
    with pytest.raises(OSError, match="No space left on device") as caught:
        run_eval(dataclasses.replace(cfg, seed=5), world=FakeWorld())
    assert caught.value.filename == str(out / "psnr_vs_frame.png")  # where the user looks, not the staging folder
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 5  # the numbers are kept
    assert (out / "results.md").is_file() and not (out / "psnr_vs_frame.png").exists()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "results.json", "results.md"]


def test_a_results_json_the_disk_cannot_hold_names_it_in_out_and_keeps_the_earlier_run(tiny_data, tmp_path,
                                                                                       monkeypatch):
    """A full disk at results.json (the first file of the end) named the hidden staging folder's
    `.unfinished-eval/results.json`, a file the user never sees (and that is gone by the time they look)."""
    out = tmp_path / "reused"
    cfg = EvalConfig(data=str(tiny_data), out=str(out), episodes=1, context=12, generate=4, videos=1,
                     probe_episodes=0, progress=False)
    run_eval(cfg, world=FakeWorld())
    before = _files(out)
    write_text = Path.write_text

    def disk_full(self, *args, **kwargs):  # the temp file of results.json: what atomic_write then names
        if ".results.json." in self.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left on device") as caught:
        run_eval(dataclasses.replace(cfg, seed=5), world=FakeWorld())
    assert caught.value.filename == str(out / "results.json")  # where the user looks, not the staging folder
    monkeypatch.undo()
    assert _files(out) == before  # nothing had moved: the earlier run's outputs, whole


def test_a_rescore_waits_for_an_eval_writing_into_the_folder(tiny_data, tmp_path, capsys):
    """A rescore reads results.json and writes it back later: an eval running into the same folder moves
    its new results in at its end, and a rescore around that move put the old run's numbers back over
    them. It is refused while the folder's lock is held, and leaves no .lock where there was none."""
    from worldsim.cli import main
    from worldsim.dataset import try_lock

    out = tmp_path / "a"
    run_eval(EvalConfig(data=str(tiny_data), out=str(out), episodes=2, context=12, generate=8, videos=0,
                        probe_episodes=0, progress=False), world=FakeWorld())
    before = (out / "results.json").read_text()
    running = try_lock(out / ".lock")  # flock is per open file: held here as by another process's eval
    try:
        assert main(["eval", "--rescore", str(out)]) == 2
        assert "a `worldsim eval` is writing its results there" in capsys.readouterr().err
        assert (out / "results.json").read_text() == before
    finally:
        running.close()
    assert main(["eval", "--rescore", str(out)]) == 0
    copy = tmp_path / "copy"  # a results folder copied without its .lock
    copy.mkdir()
    shutil.copy(out / "results.json", copy / "results.json")
    assert main(["eval", "--rescore", str(copy)]) == 0
    assert not (copy / ".lock").exists() and (copy / "results.md").exists()
