"""`worldsim bench`: the real entry point at tiny sizes (speeds are printed, never asserted)."""
from __future__ import annotations

import re

from worldsim.cli import main


def test_bench_times_every_mode_and_context_beside_the_paper_and_the_simulator(capsys):
    rc = main(["bench", "--preset", "tiny", "--ae-preset", "tiny", "--contexts", "2", "4", "--frames", "1",
               "--none-frames", "1", "--steps", "1", "--threads", "1", "--simulator", "true", "--sim-steps", "20"])
    out = capsys.readouterr().out
    assert rc == 0
    for mode in ("none", "kv", "multilevel"):
        for context in (2, 4):
            assert re.search(rf"^  {mode} +context +{context}: +[0-9.]+ s/frame", out, re.M), (mode, context)
    # the summary table: one row per mode with both contexts, the estimate and the paper's anchor
    for mode, paper in (("none", 1341), ("kv", 171), ("multilevel", 104)):
        assert re.search(rf"^{mode} +[0-9.]+ +[0-9.]+ +[0-9.]+ s +{paper} s$", out, re.M), mode
    assert re.search(r"^none/multi +[0-9.]+x +[0-9.]+x", out, re.M)
    assert "1 Euler steps" in out and "(1 thread)" in out and "precision fp32" in out
    sim = out.split("simulator:", 1)[1]
    assert "env_id: worldsim/Maze-v0" in sim and "steps: 20" in sim and re.search(r"frames_per_s: [0-9.]+", sim)


def test_a_device_this_machine_lacks_is_one_line(capsys, tmp_path):
    assert main(["bench", "--preset", "tiny", "--device", "nonsense"]) == 2
    assert "worldsim bench: device 'nonsense' is not a torch device" in capsys.readouterr().err
    # the same check in eval, before any episode is scored
    assert main(["eval", "--data", str(tmp_path), "--device", "nonsense", "--out", str(tmp_path / "e")]) == 2
    assert "worldsim eval: device 'nonsense' is not a torch device" in capsys.readouterr().err


def test_a_device_type_worldsim_does_not_run_on_is_one_line(capsys):
    """`--device mps` passed pick_device unchecked: a traceback where PyTorch lacks MPS, and on a Mac
    the float64 RoPE angles fail (MPS has no float64). Only cpu and cuda are taken."""
    import pytest

    from worldsim.model import DeviceError, pick_device

    for name in ("mps", "xpu", "meta"):
        with pytest.raises(DeviceError, match=f"device '{name}': worldsim runs on cpu or cuda only"):
            pick_device(name)
    assert pick_device("cpu").type == "cpu" and pick_device("auto").type in ("cpu", "cuda")
    assert main(["bench", "--preset", "tiny", "--device", "mps"]) == 2
    err = capsys.readouterr().err
    assert "worldsim bench: device 'mps': worldsim runs on cpu or cuda only" in err and "Traceback" not in err


def test_bench_times_the_precision_play_uses(capsys):
    """bench timed fp32 only and did not say so, while play runs bf16 on CPUs that have it."""
    rc = main(["bench", "--preset", "tiny", "--ae-preset", "tiny", "--contexts", "2", "--frames", "1", "--steps", "1",
               "--threads", "1", "--modes", "multilevel", "--precision", "bf16"])
    assert rc == 0
    assert "precision bf16" in capsys.readouterr().out


def test_bench_says_the_uncached_mode_runs_fp32_under_bf16_kv(capsys):
    """bf16-kv stores the KV cache in bf16 over fp32 arithmetic: mode none has no cache and runs fp32,
    while the table's one precision said bf16-kv for it too."""
    rc = main(["bench", "--preset", "tiny", "--ae-preset", "tiny", "--contexts", "2", "--frames", "1",
               "--none-frames", "1", "--steps", "1", "--threads", "1", "--modes", "none", "kv", "--precision", "bf16-kv"])
    out = capsys.readouterr().out
    assert rc == 0 and "precision bf16-kv, random weights" in out
    assert re.search(r"^none runs fp32 \(it stores no KV cache to keep in bf16\)$", out, re.M), out
    assert "kv runs" not in out


def test_bench_shows_a_progress_bar_over_every_timed_frame_on_a_terminal(monkeypatch, capsys):
    """DESIGN: every long job shows a progress bar; bench's uncached mode at long contexts takes
    minutes and showed none. The bar goes to stderr (a terminal only); the rows stay on stdout."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from worldsim.bench import BenchConfig, time_generation

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    rows = time_generation(BenchConfig(preset="tiny", ae_preset="tiny", contexts=(2, 3), frames=2, none_frames=1,
                                       steps=1, threads=1))
    assert len(rows) == 6
    # per context: none 1 + kv 2 + multilevel 2 timed frames, each mode with one warm-up frame
    assert "worldsim bench: 100%" in terminal.getvalue() and "16/16" in terminal.getvalue()
    assert "kv         context    3:" in capsys.readouterr().out


def test_progress_false_hides_the_bars_of_bench_and_headless_play(monkeypatch, capsys):
    """record, train and eval take --progress false; bench and headless play showed their bars on a
    terminal with no way to turn them off, and refused the option (exit 2)."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from worldsim.cli import main

    bench = ["bench", "--preset", "tiny", "--ae-preset", "tiny", "--contexts", "2", "--frames", "1",
             "--none-frames", "1", "--steps", "1", "--threads", "1"]
    play = ["play", "--headless", "--world", "sim", "--actions", "random:5", "--scale", "1"]
    for argv, bar in ((bench, "worldsim bench: 100%"), (play, "worldsim play (sim): 100%")):
        for progress, shown in (("true", True), ("false", False)):
            terminal = Terminal()
            monkeypatch.setattr(sys, "stderr", terminal)
            assert main([*argv, "--progress", progress]) == 0
            assert (bar in terminal.getvalue()) == shown, terminal.getvalue()
    capsys.readouterr()
