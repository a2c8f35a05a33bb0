"""`worldsim play`: the pygame loop (scripted keys, dummy video driver), headless mode, keymaps."""
from __future__ import annotations

import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from _tiny_world import ACTIONS, make_checkpoint
from worldsim import cli, dream_env
from worldsim import play as play_mod
from worldsim.cache import MultiLevelCacheContext
from worldsim.keymaps import KeymapError, load_keymap
from worldsim.play import (PlayConfig, PlayError, VideoRecorder, display_problem, open_world, read_actions,
                           run_interactive)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True)
def no_real_display(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    monkeypatch.setenv("PYGAME_HIDE_SUPPORT_PROMPT", "1")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def no_shipped_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(dream_env, "CHECKPOINTS_DIR", tmp_path / "no-checkpoints")


def video_frames(path: Path) -> tuple[int, tuple[int, int]]:
    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return reader.count_frames(), tuple(reader.get_meta_data()["size"])
    finally:
        reader.close()


def scripted(ticks: list[list[tuple[str, str]]]):
    """An event source: one list of (KEYDOWN|KEYUP, key name) per game tick, then QUIT."""
    import pygame

    def code(key: str) -> int:  # pygame.K_UP, pygame.K_w ...
        return getattr(pygame, "K_" + (key.upper() if len(key) > 1 else key))

    queue = [[pygame.event.Event(getattr(pygame, kind), key=code(key)) for kind, key in tick] for tick in ticks]

    def source():
        return queue.pop(0) if queue else [pygame.event.Event(pygame.QUIT)]

    return source


def press(key: str) -> list[tuple[str, str]]:
    return [("KEYDOWN", key), ("KEYUP", key)]


# ----------------------------------------------------------------------------- pieces


def test_actions_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "moves.txt"
    path.write_text("forward\n# a comment\n\nturn_left   # turn\njump\n")
    with pytest.raises(PlayError, match=rf"{path}:5: unknown action 'jump'.*turn_right"):
        read_actions(str(path), ACTIONS)
    path.write_text("forward\n# a comment\n\nturn_left   # turn\n")
    assert read_actions(str(path), ACTIONS) == [1, 3]
    with pytest.raises(PlayError, match="cannot read"):
        read_actions(str(tmp_path / "missing.txt"), ACTIONS)


def test_random_actions_are_seeded():
    a = read_actions("random:50", ACTIONS, seed=3)
    assert a == read_actions("random:50", ACTIONS, seed=3) and len(a) == 50
    assert a != read_actions("random:50", ACTIONS, seed=4)
    with pytest.raises(PlayError, match="random:N"):
        read_actions("random:x", ACTIONS)
    assert len(read_actions("random:1000000", ACTIONS)) == 1_000_000
    with pytest.raises(PlayError, match="N goes up to 1,000,000"):  # was a numpy memory error's traceback
        read_actions("random:100000000000", ACTIONS)


def test_display_detection():
    assert display_problem({}, "linux") is not None
    assert display_problem({"DISPLAY": ":0"}, "linux") is None
    assert display_problem({"WAYLAND_DISPLAY": "wayland-0"}, "linux") is None
    assert display_problem({"SDL_VIDEODRIVER": "dummy"}, "linux") is None
    assert display_problem({}, "darwin") is None


def test_no_display_is_a_clear_error(monkeypatch, capsys):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
        monkeypatch.delenv(name, raising=False)
    if not sys.platform.startswith("linux"):
        pytest.skip("display detection only applies on Linux")
    assert cli.main(["play", "--world", "sim"]) == 2
    assert "--headless" in capsys.readouterr().err


def test_keymaps_are_names_and_checked(tmp_path):
    assert load_keymap("default", ACTIONS) == {  # the arrows and WASD alike (the README's controls)
        "up": "forward", "w": "forward", "down": "backward", "s": "backward", "left": "turn_left",
        "a": "turn_left", "right": "turn_right", "d": "turn_right", "space": "noop"}
    assert "down" not in load_keymap("default", ("noop", "forward", "turn_left", "turn_right"))
    path = tmp_path / "keys.json"
    path.write_text('{"i": "forward", "J": "turn_left"}')
    assert load_keymap(str(path), ACTIONS) == {"i": "forward", "j": "turn_left"}
    # Windows PowerShell 5's `Set-Content -Encoding UTF8` starts the file with a byte-order mark
    path.write_bytes(b'\xef\xbb\xbf{"\xc3\xa9": "forward"}')
    assert load_keymap(str(path), ACTIONS) == {"\u00e9": "forward"}
    path.write_text('{"i": "jump"}')
    with pytest.raises(KeymapError, match="unknown action 'jump'"):
        load_keymap(str(path), ACTIONS)
    path.write_text('{"i": 1}')
    with pytest.raises(KeymapError, match="names"):
        load_keymap(str(path), ACTIONS)
    path.write_text('{"escape": "forward"}')
    with pytest.raises(KeymapError, match="reserved"):
        load_keymap(str(path), ACTIONS)
    path.write_text('{"up": "forward", "UP": "backward"}')  # one key: the last binding won silently
    with pytest.raises(KeymapError, match="key 'UP' is bound twice .* 'forward' and 'backward'"):
        load_keymap(str(path), ACTIONS)



def test_the_builtin_keymaps_walk_and_turn_the_way_their_keys_point():
    for name, keys in (("default", ("up", "down", "left", "right")), ("default", ("w", "s", "a", "d")),
                       ("arrows", ("up", "down", "left", "right")), ("wasd", ("w", "s", "a", "d"))):
        keymap = load_keymap(name, ACTIONS)
        assert [keymap[k] for k in keys] == ["forward", "backward", "turn_left", "turn_right"], name
        assert keymap["space"] == "noop"
    assert not set(load_keymap("arrows", ACTIONS)) & set("wasd")  # a free hand: the letters stay unbound
    assert not set(load_keymap("wasd", ACTIONS)) & {"up", "down", "left", "right"}
    # a world none of whose actions a built-in keymap binds: said, not a game where no key does anything
    with pytest.raises(KeymapError, match="built-in keymap 'wasd' binds none of this world's actions"):
        load_keymap("wasd", ("jump", "crouch"))


def test_a_json_keymap_may_not_take_a_command_key_in_capitals_nor_be_empty(tmp_path):
    path = tmp_path / "keys.json"
    for key, command in (("Escape", "quit"), ("P", "pause"), ("H", "help")):
        path.write_text(json.dumps({key: "forward"}))  # key names ignore case: this would never fire
        with pytest.raises(KeymapError, match=f"key '{key}' is reserved for '{command}'"):
            load_keymap(str(path), ACTIONS)
    path.write_text("{}")
    with pytest.raises(KeymapError, match="non-empty JSON object"):
        load_keymap(str(path), ACTIONS)
    path.write_text('{"up": "forward", "UP": "forward"}')  # one binding written twice: harmless
    assert load_keymap(str(path), ACTIONS) == {"up": "forward"}


def test_the_help_lists_each_actions_keys_and_every_command_key():
    from worldsim.keymaps import help_lines

    lines = help_lines(load_keymap("default", ACTIONS))
    assert "up / w\tforward" in lines and "left / a\tturn_left" in lines and "space\tnoop" in lines
    for key, what in (("escape", "quit"), ("h", "show / hide this help"), ("f", "dream vs reality, side by side")):
        assert f"{key}\t{what}" in lines
    assert not any("dream vs reality" in line for line in help_lines({"up": "forward"}, skip=("reality",)))
    assert "escape\tquit" in help_lines({"up": "forward"}, skip=("reality",))


def test_h_shows_and_hides_the_help(tmp_path, no_shipped_checkpoint):
    config = PlayConfig(world="sim", fps=1000, scale=1, record_dir=str(tmp_path))
    assert run_interactive(config, scripted([press("h")])).show_help
    assert not run_interactive(config, scripted([press("h"), press("h")])).show_help


def test_an_interrupt_during_a_frames_write_keeps_the_video_whole(tmp_path):
    """Ctrl-C (or SIGTERM) landing inside imageio-ffmpeg's write of a frame made it kill ffmpeg, so
    play's "keep what was generated" lost the whole MP4. The interrupt now waits for the frame, also
    with other threads alive (as torch's are), which a signal mask on the main thread let take it."""
    import signal
    import threading
    import time

    done = threading.Event()
    other = threading.Thread(target=done.wait, daemon=True)
    other.start()

    out = tmp_path / "v.mp4"
    rec = VideoRecorder(out, fps=10)
    for i in range(2):
        rec.append(np.full((64, 64, 3), 40 * i, np.uint8))
    write = rec._writer.append_data

    def interrupted_write(frame):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the frame is being written
        time.sleep(0.05)
        return write(frame)

    rec._writer.append_data = interrupted_write
    # Ctrl-C raising KeyboardInterrupt, as in a terminal: a test run started in the background by a
    # shell (`cmd &`) inherits SIGINT ignored, and would then see no interrupt at all
    own = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            rec.append(np.full((64, 64, 3), 200, np.uint8))
    finally:
        signal.signal(signal.SIGINT, own)
        done.set()
    assert rec.close() == out and video_frames(out) == (3, (64, 64))


@pytest.mark.parametrize("kind", ["gif", "mp4"])
def test_an_interrupt_while_the_finished_video_is_saved_keeps_it_whole(tmp_path, no_shipped_checkpoint, monkeypatch,
                                                                       capsys, kind):
    """Ctrl-C while a headless run saved its finished GIF (Pillow writes every frame then, seconds
    for a long clip, just when the progress bar stands at 100%) deleted the whole recording."""
    import signal

    from worldsim.dataset import GifWriter

    out = tmp_path / f"walk.{kind}"
    out.write_bytes(b"an older video")
    # the step that finishes the file: Pillow's save of a GIF, the read-back check of an MP4
    owner, name = (GifWriter, "close") if kind == "gif" else (play_mod, "finished_video_problem")
    real = getattr(owner, name)

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the file is being finished
        return real(*args)

    monkeypatch.setattr(owner, name, interrupted)
    own = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also under `cmd &`
    try:
        code = cli.main(["play", "--headless", "--world", "sim", "--actions", "random:7", "--out", str(out)])
    finally:
        signal.signal(signal.SIGINT, own)
    assert code == 130
    assert f"kept 7 frames in {out}" in capsys.readouterr().err
    if kind == "gif":
        with imageio.get_reader(out) as gif:
            assert len(list(gif)) >= 1  # a GIF merges repeated frames: readable, and not the older bytes
    else:
        assert video_frames(out) == (7, (512, 512))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no partial file left


def test_an_interrupt_while_a_played_recording_is_saved_keeps_it(tmp_path, no_shipped_checkpoint, monkeypatch, capsys):
    """In the window, V stops a recording; a Ctrl-C while it is saved waits for the file, then quits."""
    import signal

    real = play_mod.finished_video_problem

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(play_mod, "finished_video_problem", interrupted)
    config = PlayConfig(world="sim", fps=1000, scale=1, record_dir=str(tmp_path))
    own = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_interactive(config, scripted([press("v"), press("up"), press("up"), press("v"), []]))
    finally:
        signal.signal(signal.SIGINT, own)
    videos = list(tmp_path.glob("*.mp4"))
    assert len(videos) == 1 and video_frames(videos[0])[0] >= 2
    assert f"saved {video_frames(videos[0])[0]} frames to {videos[0]}" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*partial*"))


def test_recorder_is_atomic(tmp_path):
    out = tmp_path / "videos" / "a.mp4"
    rec = VideoRecorder(out, fps=10)
    for i in range(3):
        rec.append(np.full((64, 64, 3), 40 * i, np.uint8))
    assert not out.exists()  # only the hidden partial file exists while recording
    assert rec.close() == out
    assert video_frames(out) == (3, (64, 64))
    assert [p.name for p in out.parent.iterdir()] == ["a.mp4"]
    empty = VideoRecorder(tmp_path / "videos" / "b.mp4", fps=10)
    assert empty.close() is None and [p.name for p in out.parent.iterdir()] == ["a.mp4"]


def test_a_killed_plays_recording_is_kept_visible_and_its_empty_partial_files_go(tmp_path):
    """Every killed recording (SIGKILL, the out-of-memory killer) left its hidden partial file, one per
    run, forever: a GIF's empty (its frames were in memory), an MP4's a playable video of what was played
    (ffmpeg finishes it when the play is gone) that the user would not find. A play still recording
    there keeps its file, and files that are not a recorder's stay."""
    import fcntl

    folder = tmp_path / "videos"
    folder.mkdir()
    imageio.mimwrite(folder / ".s.k3x_9a2b.partial.mp4", [np.full((64, 64, 3), 9 * i, np.uint8) for i in range(4)],
                     format="FFMPEG", fps=10, macro_block_size=16)  # as ffmpeg finishes a killed play's
    (folder / "s.recovered.mp4").write_bytes(b"a file of the user's by that name")
    (folder / ".s.q81lmz0c.partial.gif").write_bytes(b"")  # a killed GIF recording
    (folder / ".t.u7wq1e5n.partial.mp4").write_bytes(b"\x00" * 64)  # its ffmpeg killed too: no frame to read
    os.utime(folder / ".t.u7wq1e5n.partial.mp4", (1e9, 1e9))  # ... long ago
    (folder / ".t.f00bar12.partial.mp4").write_bytes(b"\x00" * 64)  # a moment ago: its ffmpeg may be finishing it
    (folder / ".s.partial.mp4").write_bytes(b"not a recorder's: no random part")
    live = folder / ".u.a1b2c3d4.partial.mp4"  # another play, recording now
    live.write_bytes(b"\x00" * 64)
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        rec = VideoRecorder(folder / "s.gif", fps=10)
        left = sorted(p.name for p in folder.iterdir())
        assert left == sorted([".s.partial.mp4", live.name, rec.tmp.name, "s.recovered-2.mp4", "s.recovered.mp4",
                               ".t.f00bar12.partial.mp4"])
        assert video_frames(folder / "s.recovered-2.mp4") == (4, (64, 64))
        assert (folder / "s.recovered.mp4").read_bytes() == b"a file of the user's by that name"
        assert rec.recovered == [(folder / "s.recovered-2.mp4", 4)]  # what play says it kept
        # this recording's own partial file is held while it records: a second recorder leaves it
        other = VideoRecorder(folder / "s.mp4", fps=10)
        assert rec.tmp.exists() and other.recovered == []
        rec.append(np.zeros((64, 64, 3), np.uint8))
        assert rec.close() == folder / "s.gif" and other.close() is None
    finally:
        os.close(holder)
    assert live.exists()


@pytest.mark.parametrize("missing", ["imageio_ffmpeg", "ffmpeg binary"])
def test_a_gif_recording_without_an_mp4_reader_leaves_a_killed_plays_mp4(tmp_path, monkeypatch, missing):
    """Where imageio-ffmpeg is not installed (the lent GPU machine's image) a GIF is still recorded, but
    a killed play's MP4 in the folder made it a traceback (the ImportError of the MP4 reader), and where
    ffmpeg cannot be found (a RuntimeError) the same; that MP4, which cannot be read here, stays."""
    folder = tmp_path / "videos"
    folder.mkdir()
    dead = folder / ".s.k3x_9a2b.partial.mp4"
    imageio.mimwrite(dead, [np.full((64, 64, 3), 9 * i, np.uint8) for i in range(4)], format="FFMPEG", fps=10,
                     macro_block_size=16)
    os.utime(dead, (1e9, 1e9))  # long dead: its ffmpeg is not finishing it
    if missing == "imageio_ffmpeg":
        monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import imageio_ffmpeg: ImportError
    else:
        import imageio_ffmpeg

        def no_binary():
            raise RuntimeError("No ffmpeg exe could be found.")

        monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_binary)
    rec = VideoRecorder(folder / "s.gif", fps=10)
    assert rec.recovered == [] and dead.exists()
    rec.append(np.zeros((64, 64, 3), np.uint8))
    assert rec.close() == folder / "s.gif"
    monkeypatch.undo()
    assert video_frames(dead)[0] == 4  # untouched: the next recording where ffmpeg is keeps it


def test_a_play_killed_while_recording_leaves_what_it_played_to_the_next(tmp_path):
    """The real thing: `play --headless` killed with SIGKILL mid-recording, then played again into the
    same file: the first one's frames come back as a visible video, and no hidden file is left."""
    import signal
    import time

    out = tmp_path / "s.mp4"
    cmd = [sys.executable, "-m", "worldsim.cli", "play", "--headless", "--world", "sim", "--actions",
           "random:1000000", "--out", str(out), "--progress", "false", "--scale", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        partial = None
        for _ in range(6000):  # until ffmpeg has written frames (it holds the first ones back)
            partial = next(tmp_path.glob(".s.*.partial.mp4"), None)
            if partial is not None and partial.stat().st_size > 0:
                break
            time.sleep(0.01)
        assert partial is not None and partial.stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    from worldsim.dataset import mp4_frames

    for _ in range(6000):  # ffmpeg, its input ended, finishes the file on its own
        if mp4_frames(partial):
            break
        time.sleep(0.01)
    assert cli.main(["play", "--headless", "--world", "sim", "--actions", "random:3", "--out", str(out)]) == 0
    kept = tmp_path / "s.recovered.mp4"
    assert video_frames(kept)[0] > 0 and video_frames(out)[0] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mp4", "s.recovered.mp4"]


def test_an_mp4_without_imageio_ffmpeg_is_a_play_error(tmp_path, monkeypatch):
    """The lent GPU machine's image has imageio but not imageio-ffmpeg: imageio then raises an
    ImportError for format="FFMPEG", which was a traceback in `play --headless --out x.mp4` and
    ended an interactive game on V (it catches PlayError and OSError only)."""
    def no_plugin(*args, **kwargs):  # what imageio raises without the plugin
        raise ImportError("The `FFMPEG` plugin is not installed. Use `pip install imageio[ffmpeg]` to install it.")

    monkeypatch.setattr(imageio, "get_writer", no_plugin)
    with pytest.raises(PlayError, match="imageio-ffmpeg.*gif"):
        VideoRecorder(tmp_path / "v" / "a.mp4", fps=10)
    assert list((tmp_path / "v").iterdir()) == []  # no partial file left behind
    gif = VideoRecorder(tmp_path / "v" / "a.gif", fps=10)  # GIFs need no plugin
    gif.append(np.zeros((64, 64, 3), np.uint8))
    assert gif.close() == tmp_path / "v" / "a.gif"


# ----------------------------------------------------------------------------- headless


def test_headless_sim_without_checkpoint(tmp_path, no_shipped_checkpoint, capsys):
    out = tmp_path / "sim.mp4"
    assert cli.main(["play", "--headless", "--actions", "random:6", "--out", str(out), "--scale", "2"]) == 0
    err = capsys.readouterr().err
    assert "no world-model checkpoint found" in err and "--world sim" in err
    assert video_frames(out) == (6, (128, 128))


def test_dream_without_checkpoint_is_a_clear_error(no_shipped_checkpoint, capsys):
    assert cli.main(["play", "--world", "dream", "--headless", "--actions", "random:2"]) == 2
    assert "worldsim train" in capsys.readouterr().err


def test_headless_dream_writes_requested_frames(tiny_ckpt, tmp_path, capsys):
    actions = tmp_path / "moves.txt"
    actions.write_text("forward\nforward\nturn_left\nturn_right\nbackward\n")
    out = tmp_path / "dream.mp4"
    code = cli.main(["play", "--checkpoint", str(tiny_ckpt), "--headless", "--actions", str(actions),
                     "--out", str(out), "--scale", "2", "--context-frames", "2"])
    assert code == 0
    assert video_frames(out) == (5, (128, 128))
    assert "played 5 frames" in capsys.readouterr().out


def test_headless_unknown_action_names_file_and_line(tiny_ckpt, tmp_path, capsys):
    actions = tmp_path / "moves.txt"
    actions.write_text("forward\nfly\n")
    code = cli.main(["play", "--world", "sim", "--headless", "--actions", str(actions), "--out", str(tmp_path / "x.mp4")])
    assert code == 2
    assert f"{actions}:2: unknown action 'fly'" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_headless_benchmark_reports_fps(tiny_ckpt, capsys):
    code = cli.main(["play", "--checkpoint", str(tiny_ckpt), "--benchmark", "--actions", "random:21",
                     "--context-frames", "1", "--still-frames", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "frame    20" in out and "fps" in out and "resident memory" in out
    assert "cache multilevel-fast," in out and "precision " in out and "shift 1.0," in out
    assert "temperature 1.0," in out and "still frames 3," in out
    assert "(model frame index 24)" in out  # the standstill counts in the model's frames, not in the played ones
    assert "L2 " in out and " tokens, cache " in out


def test_a_benchmark_of_the_simulator_names_no_sampler_or_cache(no_shipped_checkpoint, capsys):
    """--world sim printed 'sampling steps None' and 'L2 None frames': settings that do not apply."""
    assert cli.main(["play", "--world", "sim", "--benchmark", "--actions", "random:21"]) == 0
    out = capsys.readouterr().out
    assert "benchmark: simulator worldsim/Maze-v0, torch threads " in out and "frame    20: " in out
    assert "None" not in out and "L2" not in out and "sampling" not in out
    assert "not reached: frames 500, 2000 (the walk ended after 21 frames)" in out


def test_still_frames_reach_the_dream_from_the_option_or_the_checkpoint(tiny_ckpt, tmp_path):
    folder = tmp_path / "still"
    shutil.copytree(tiny_ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sampler"]["still_frames"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    for checkpoint, option, expected in ((tiny_ckpt, None, 0), (tiny_ckpt, 2, 2), (folder, None, 5), (folder, 0, 0)):
        world = open_world(PlayConfig(checkpoint=str(checkpoint), still_frames=option, device="cpu"), reality=False,
                           log=lambda _: None)
        _, info = world.env.reset(seed=0)
        assert world.env.unwrapped.still_frames == expected and info["frame_index"] == 4 + expected
        world.env.close()


@pytest.mark.parametrize("mode, refreshes_window", [(None, False), ("multilevel", True)])
def test_play_dreams_with_the_fast_multilevel_cache_unless_told(tiny_ckpt, mode, refreshes_window):
    """Play's default is the approximate multilevel-fast cache (L1 + L2, the window not
    re-encoded when it slides); --cache-mode multilevel gives the exact one."""
    config = PlayConfig(checkpoint=str(tiny_ckpt), context_frames=1)
    if mode is not None:
        config.cache_mode = mode
    world = open_world(config, reality=False, log=lambda _: None)
    world.env.reset(seed=0)
    world.env.step(0)
    context = world.env.unwrapped._session.context
    assert isinstance(context, MultiLevelCacheContext)
    assert context.use_l2 and context.refresh_l1 == refreshes_window
    assert world.env.unwrapped.cache_mode == (mode or "multilevel-fast")


def test_shift_option_reaches_the_dream_and_is_checked(tiny_ckpt, capsys):
    """--shift overrides the checkpoint's sampler shift (1 in the tiny one) for the played session."""
    for shift, expected in ((None, 1.0), (2.5, 2.5)):
        world = open_world(PlayConfig(checkpoint=str(tiny_ckpt), context_frames=1, shift=shift), reality=False,
                           log=lambda _: None)
        world.env.reset(seed=0)
        assert world.env.unwrapped._session.sampler.shift == expected
        assert world.env.step(0)[4]["shift"] == expected  # what the benchmark line reports
    assert cli.main(["play", "--checkpoint", str(tiny_ckpt), "--headless", "--actions", "random:2",
                     "--shift", "0"]) == 2
    assert "--shift must be a finite number > 0, got 0.0" in capsys.readouterr().err


def test_temperature_option_reaches_the_dream_and_is_checked(tiny_ckpt, capsys):
    """--temperature overrides the checkpoint's sampling temperature (1 in the tiny one) for the played session."""
    for temperature, expected in ((None, 1.0), (0.6, 0.6)):
        world = open_world(PlayConfig(checkpoint=str(tiny_ckpt), context_frames=1, temperature=temperature),
                           reality=False, log=lambda _: None)
        world.env.reset(seed=0)
        assert world.env.unwrapped._session.sampler.temperature == expected
        assert world.env.step(0)[4]["temperature"] == expected  # what the HUD and the benchmark line report
    assert cli.main(["play", "--checkpoint", str(tiny_ckpt), "--headless", "--actions", "random:2",
                     "--temperature", "-1"]) == 2
    assert "--temperature must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    assert cli.main(["play", "--checkpoint", str(tiny_ckpt), "--headless", "--actions", "random:2",
                     "--cfg", "nan"]) == 2  # NaN guidance used to play NaN frames
    assert "--cfg must be a finite number, got nan" in capsys.readouterr().err


def test_generated_noise_option_reaches_the_dream_and_is_checked(tiny_ckpt, capsys):
    """--generated-noise overrides the checkpoint's level (0 in the tiny one): generated frames enter the
    context noised and labelled with it, so the next frames differ; a level outside [0, 1) is refused."""
    frames = {}
    for level, expected in ((None, 0.0), (0.25, 0.25)):
        world = open_world(PlayConfig(checkpoint=str(tiny_ckpt), context_frames=1, generated_noise=level),
                           reality=False, log=lambda _: None)
        world.env.reset(seed=0)
        assert world.env.unwrapped._session.generated_noise == expected
        first = world.env.step(1)
        assert first[4]["generated_noise"] == expected
        frames[expected] = (first[0], world.env.step(1)[0])
    assert np.array_equal(frames[0.0][0], frames[0.25][0])  # the first frame sees only given context
    assert not np.array_equal(frames[0.0][1], frames[0.25][1])  # the second sees the first, noised
    assert cli.main(["play", "--checkpoint", str(tiny_ckpt), "--headless", "--actions", "random:2",
                     "--generated-noise", "1"]) == 2
    assert "--generated-noise must be in [0, 1), got 1.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"generated_noise must be in \[0, 1\), got 1.0"):  # the shared check
        dream_env.DreamEnv(checkpoint=tiny_ckpt, device="cpu", context_frames=1, generated_noise=1.0).reset(seed=0)


@pytest.mark.parametrize("native_bf16, option, expected", [
    (True, None, "bf16"), (False, None, "bf16-kv"), (True, "fp32", "fp32"), (False, "bf16", "bf16"),
    (True, "bf16-kv", "bf16-kv")])
def test_play_runs_the_transformer_in_bf16_where_the_cpu_has_it_unless_told(tiny_ckpt, monkeypatch, native_bf16,
                                                                           option, expected):
    """Play's default precision is auto: bf16 weights and KV cache on a CPU with native bf16,
    fp32 weights and a bf16 KV cache elsewhere; --precision picks one. Eval and the Dream env
    default to fp32."""
    import torch

    import worldsim.world

    monkeypatch.setattr(worldsim.world, "cpu_has_native_bf16", lambda: native_bf16)
    config = PlayConfig(checkpoint=str(tiny_ckpt), context_frames=1, device="cpu")
    if option is not None:
        config.precision = option
    world = open_world(config, reality=False, log=lambda _: None)
    world.env.reset(seed=0)
    _, _, _, _, info = world.env.step(0)
    assert info["precision"] == expected
    dtype = torch.bfloat16 if expected == "bf16" else torch.float32
    assert {p.dtype for p in world.env.unwrapped.world.far.parameters()} == {dtype}
    cache = world.env.unwrapped._session.context.kv
    assert {b.k.dtype for b in cache} == {torch.float32 if expected == "fp32" else torch.bfloat16}
    assert dream_env.DreamEnv(checkpoint=tiny_ckpt, device="cpu").world.precision == "fp32"


def test_headless_does_not_import_pygame(tmp_path):
    code = ("import sys; from worldsim.cli import main\n"
            f"assert main(['play', '--world', 'sim', '--headless', '--actions', 'random:3', '--out', {str(tmp_path / 'a.mp4')!r}]) == 0\n"
            "assert 'pygame' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- the window


def test_interactive_dream_records_a_session(tiny_ckpt, tmp_path):
    config = PlayConfig(checkpoint=str(tiny_ckpt), fps=1000, scale=2, context_frames=2, record_dir=str(tmp_path))
    game = run_interactive(config, scripted([
        press("h"),                     # help overlay on
        press("f"),                     # dream | reality side by side
        press("v"),                     # start recording (1 frame: what is on screen)
        [("KEYDOWN", "up")], [], [],    # hold forward 3 ticks -> 3 frames
        [("KEYUP", "up")],
        press("p"), press("right"),     # paused: ignored
        press("p"),
        press("a"),                     # one tap -> one frame
        press("v"),                     # stop: 1 + 3 + 1 frames
        press("r"),                     # new world
        press("escape"),
    ]))
    assert game.steps_taken == 4 and game.worlds == 2
    assert len(game.recordings) == 1
    # dream | reality, each 64*2, under a 16-pixel caption strip
    assert video_frames(game.recordings[0]) == (5, (256, 144))
    assert game.info["l2_frames"] == 0 and game.info["frame_index"] == 2  # the new world


def test_interactive_tap_and_hold_and_quit_while_recording(tiny_ckpt, tmp_path):
    config = PlayConfig(checkpoint=str(tiny_ckpt), fps=1000, scale=1, context_frames=1, record_dir=str(tmp_path))
    game = run_interactive(config, scripted([
        press("v"),
        [("KEYDOWN", "w"), ("KEYUP", "w")],  # a tap inside one tick still plays
        [("KEYDOWN", "d")], [], [("KEYUP", "d")],  # held for two ticks
        # then the window is closed while recording: the video is finished, not lost
    ]))
    assert game.steps_taken == 3
    assert video_frames(game.recordings[0]) == (4, (64, 64))
    assert game.hud()[0].startswith("DREAM")
    assert game.hud()[1].startswith("memory L2 ") and " of 300 fr / " in game.hud()[1]  # play's default bound
    assert "  |  steps 2 shift 1 temp 1 noise 0 " in game.hud()[2]  # the tiny checkpoint's sampler settings, last


def test_interactive_sim_walk_without_checkpoint(tmp_path, no_shipped_checkpoint, capsys):
    config = PlayConfig(fps=1000, scale=2, record_dir=str(tmp_path))
    game = run_interactive(config, scripted([[("KEYDOWN", "up")], [("KEYUP", "up")], press("f"), press("left"),
                                             press("escape")]))
    assert "walking the embedded maze simulator" in capsys.readouterr().err
    assert game.world.mode == "sim" and game.steps_taken == 2
    assert "already the real simulator" in game.message
    assert game.hud()[0].startswith("SIMULATOR")
    # the arrows drove the simulator: the same world stepped forward then turn_left shows this frame
    import gymnasium as gym

    import envs  # noqa: F401

    replay = gym.make("worldsim/Maze-v0", max_steps=None)
    replay.reset(seed=config.seed)
    replay.step(1)  # forward
    frame, _, _, _, info = replay.step(3)  # turn_left
    replay.close()
    assert np.array_equal(game.frame, frame)
    np.testing.assert_allclose(game.info["pose"], info["pose"])


def test_window_shows_the_frame_and_takes_keys_from_pygames_own_queue(tmp_path, no_shipped_checkpoint):
    """Keys posted to pygame's event queue (not a scripted source) drive the game, and the window
    shows the current frame, scaled, above the HUD."""
    import pygame

    from worldsim.play import Game

    config = PlayConfig(fps=1000, scale=3, record_dir=str(tmp_path))
    world = open_world(config, reality=True)
    game = Game(world, config, load_keymap("default", world.action_names))
    try:
        pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_LEFT))
        pygame.event.post(pygame.event.Event(pygame.KEYUP, key=pygame.K_LEFT))
        game.run(max_ticks=3)
        assert game.steps_taken == 1
        h, w = game.frame.shape[:2]
        shown = pygame.surfarray.array3d(game.window.screen).transpose(1, 0, 2)[: h * 3, : w * 3]
        assert np.array_equal(shown, game.frame.repeat(3, 0).repeat(3, 1))
    finally:
        game.window.close()
        world.env.close()


def test_a_keymap_key_pygame_does_not_know_is_refused_by_name(tmp_path, no_shipped_checkpoint, capsys):
    """A misspelt key in a JSON keymap would never fire; the game refuses it before opening."""
    keys = tmp_path / "keys.json"
    keys.write_text('{"up": "forward", "uparrow": "forward"}')
    assert cli.main(["play", "--world", "sim", "--keymap", str(keys)]) != 0
    err = capsys.readouterr().err
    assert "no key named 'uparrow'" in err and str(keys) in err and "'up'" not in err.split("named")[1].split("(")[0]
    # two spellings of one key: the second binding silently replaced the first
    keys.write_text('{"pageup": "forward", "page up": "backward"}')
    assert cli.main(["play", "--world", "sim", "--keymap", str(keys)]) != 0
    assert "'pageup' and 'page up' are the same key, bound to 'forward' and 'backward'" in capsys.readouterr().err
    keys.write_text('{"pageup": "forward", "page up": "forward"}')  # the same binding twice: harmless, as before
    game = run_interactive(PlayConfig(world="sim", fps=1000, scale=1, record_dir=str(tmp_path), keymap=str(keys)),
                           scripted([press("pageup")]))
    assert game.steps_taken == 1 and game.keymap == {"page up": "forward"}


def test_headless_out_that_is_a_folder_is_refused_before_playing(tiny_ckpt, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    assert cli.main(["play", "--checkpoint", str(tiny_ckpt), "--headless", "--actions", "random:3",
                     "--out", str(folder)]) != 0
    assert f"{folder}: is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["videos"]


def test_headless_out_of_another_video_kind_is_refused_before_playing(tiny_ckpt, tmp_path, capsys):
    target = tmp_path / "session.avi"  # would have been MP4 bytes under an .avi name
    assert cli.main(["play", "--checkpoint", str(tiny_ckpt), "--headless", "--actions", "random:3",
                     "--out", str(target)]) != 0
    assert f"{target}: videos are written as .mp4 or .gif" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_headless_reality_side_by_side_gif(tiny_ckpt, tmp_path):
    """The README's dream | reality GIF: one GIF frame per action, both panels side by side."""
    import imageio.v2 as imageio

    out = tmp_path / "tour.gif"
    code = cli.main(["play", "--checkpoint", str(tiny_ckpt), "--headless", "--reality", "--actions", "random:4",
                     "--out", str(out), "--scale", "2", "--context-frames", "2"])
    assert code == 0
    frames = imageio.mimread(out)
    # 64x64 world, scale 2, two panels, a line between them and a caption strip above (the README's GIF
    # showed two uncaptioned panels whose skies ran into each other)
    assert len(frames) == 4 and frames[0].shape[:2] == (16 + 128, 256)
    frame = np.asarray(frames[0])[..., :3]
    assert frame[16:, 127:129].max() < 40  # the dark line between dream and reality
    ink = frame[:16].max(-1) > 128  # caption text: white on black, over each panel
    assert ink[:, :128].any() and ink[:, 128:].any()
    from worldsim.play import recorded_view
    dream = np.zeros((64, 64, 3), np.uint8)
    assert np.array_equal(recorded_view(dream, None, False, 2), dream.repeat(2, 0).repeat(2, 1))  # dream alone: as before
    assert not list(tmp_path.glob(".*partial*"))


def test_a_recording_that_cannot_start_leaves_the_game_running(tmp_path, no_shipped_checkpoint, capsys):
    """V with a record folder that cannot exist says so on the HUD; the game goes on."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = PlayConfig(fps=1000, scale=1, record_dir=str(blocker / "videos"))
    game = run_interactive(config, scripted([press("v"), [("KEYDOWN", "up")], [], [("KEYUP", "up")]]))
    assert game.steps_taken == 2 and game.recordings == [] and game.recorder is None
    assert game.message.startswith("cannot record:") and "cannot create its folder" in game.message
    assert "cannot record" in capsys.readouterr().err


def test_a_video_whose_folder_is_a_file_says_that_file_is_in_the_way(tmp_path):
    """`play.py --out a-file/x.gif` said "cannot create its folder (File exists)", as if the folder were there."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker / "x.gif", blocker / "deeper" / "x.mp4"):
        with pytest.raises(PlayError) as caught:
            VideoRecorder(out, fps=10)
        assert str(caught.value) == f"{out}: cannot create its folder ({blocker} is a file, not a folder)"


def _video_writer_that_fails_after(monkeypatch, frames: int | None, disk_full: bool) -> None:
    """imageio's ffmpeg writer as it fails on a full disk: "[Errno 32] Broken pipe" and ffmpeg's
    command line, no errno (measured on a full tmpfs); the file system then reports 0 bytes free.
    frames=None: it fails only while finishing the file, silently (x264 holds the frames until
    then; a full disk or `ulimit -f` then cuts the file, and imageio-ffmpeg does not raise)."""
    real = imageio.get_writer

    class Failing:
        def __init__(self, path, *args, **kwargs):
            self.path, self.inner, self.count = path, real(path, *args, **kwargs), 0

        def append_data(self, frame):
            self.count += 1
            if frames is not None and self.count > frames:
                raise OSError("[Errno 32] Broken pipe\n\nFFMPEG COMMAND:\n/bin/ffmpeg -y -f rawvideo x.mp4\n")
            self.inner.append_data(frame)

        def close(self):
            self.inner.close()
            if frames is None:
                with open(self.path, "r+b") as fh:
                    fh.truncate(2000)

    monkeypatch.setattr(imageio, "get_writer", Failing)
    if disk_full:
        monkeypatch.setattr("worldsim.dataset.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))


@pytest.mark.parametrize("fail_after, disk_full, why", [
    (3, True, "No space left on device"),
    (3, False, "the video writer failed ([Errno 32] Broken pipe)"),
    (None, True, "No space left on device"),
    (None, False, "the video writer failed (the finished file cannot be read back"),
])
def test_a_video_write_failure_keeps_the_earlier_video(tmp_path, no_shipped_checkpoint, monkeypatch, capsys,
                                                       fail_after, disk_full, why):
    """A full disk midway through `--out v.mp4`, or while ffmpeg finishes the file, used to rename
    the broken partial video over a good v.mp4."""
    out = tmp_path / "videos" / "v.mp4"
    assert cli.main(["play", "--headless", "--actions", "random:6", "--out", str(out)]) == 0
    capsys.readouterr()
    _video_writer_that_fails_after(monkeypatch, fail_after, disk_full)
    # the README's exit codes: 1 for the file system's refusal (a full disk), as eval and export; 2 otherwise
    assert cli.main(["play", "--headless", "--actions", "random:8", "--out", str(out)]) == (1 if disk_full else 2)
    err = capsys.readouterr().err
    assert f"{out}: cannot write the video ({why}" in err and "the existing file is kept" in err
    assert "Traceback" not in err and "FFMPEG COMMAND" not in err and "kept 3 frames" not in err
    assert video_frames(out)[0] == 6 and [p.name for p in out.parent.iterdir()] == ["v.mp4"]  # no partial file


def test_a_gif_on_a_full_disk_is_said_in_one_line_and_the_earlier_one_kept(tmp_path, no_shipped_checkpoint,
                                                                          full_disk, unraisable, capsys):
    """`--out p.gif` on a full disk said "worldsim play: No space left on device" (no file named), then
    imageio's GIF writer saved its frames again in its __del__: ~45 lines of "Exception ignored in" at exit."""
    out = tmp_path / "videos" / "p.gif"
    assert cli.main(["play", "--headless", "--actions", "random:4", "--out", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    full_disk(out.parent)
    assert cli.main(["play", "--headless", "--actions", "random:6", "--out", str(out)]) == 1  # as eval, export
    gc.collect()
    err = capsys.readouterr().err
    assert f"{out}: cannot write the video (No space left on device); the existing file is kept" in err
    assert "Traceback" not in err and unraisable == []
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == ["p.gif"]  # no partial file


def test_a_recording_that_fails_midway_stops_and_the_game_goes_on(tmp_path, no_shipped_checkpoint, monkeypatch, capsys):
    _video_writer_that_fails_after(monkeypatch, 2, disk_full=True)
    config = PlayConfig(fps=1000, scale=1, record_dir=str(tmp_path / "videos"))
    game = run_interactive(config, scripted([press("v"), [("KEYDOWN", "up")], [], [], [("KEYUP", "up")], press("left")]))
    assert game.steps_taken == 4 and game.recorder is None and game.recordings == []
    assert game.message.startswith("recording stopped:") and "No space left on device" in game.message
    assert "recording stopped" in capsys.readouterr().err
    assert list((tmp_path / "videos").iterdir()) == []  # the broken partial video is gone


def test_a_recording_that_cannot_be_finished_is_reported_and_the_game_goes_on(tmp_path, no_shipped_checkpoint,
                                                                             monkeypatch, capsys):
    _video_writer_that_fails_after(monkeypatch, None, disk_full=True)  # cut while ffmpeg finishes the file
    config = PlayConfig(fps=1000, scale=1, record_dir=str(tmp_path / "videos"))
    game = run_interactive(config, scripted([press("v"), [("KEYDOWN", "up")], [], [("KEYUP", "up")], press("v"),
                                             press("left")]))
    assert game.steps_taken == 3 and game.recorder is None and game.recordings == []
    assert "cannot write the video (No space left on device); nothing was written" in game.message
    assert "cannot write the video" in capsys.readouterr().err
    assert list((tmp_path / "videos").iterdir()) == []


def test_keymap_keys_fire_under_the_name_pygames_events_give_them(tmp_path, no_shipped_checkpoint):
    """'keypad 8' and 'pageup' are keys pygame knows, but its events call them '[8]' and 'page up'."""
    keys = tmp_path / "keys.json"
    keys.write_text('{"keypad 8": "forward", "pageup": "turn_left"}')
    config = PlayConfig(fps=1000, scale=1, record_dir=str(tmp_path), keymap=str(keys))
    game = run_interactive(config, scripted([press("kp8"), press("pageup"), press("escape")]))
    assert game.steps_taken == 2
    assert game.keymap == {"[8]": "forward", "page up": "turn_left"}


def test_the_latest_held_key_steers(tmp_path, no_shipped_checkpoint, monkeypatch):
    """Hold up, then also left: the player turns while left is held, and walks on once it is released."""
    played = []
    real_play = play_mod.Game.play

    def spy(self, name):
        played.append(name)
        return real_play(self, name)

    monkeypatch.setattr(play_mod.Game, "play", spy)
    config = PlayConfig(fps=1000, scale=1, record_dir=str(tmp_path))
    run_interactive(config, scripted([[("KEYDOWN", "up")], [("KEYDOWN", "left")], [], [("KEYUP", "left")], []]))
    assert played == ["forward", "turn_left", "turn_left", "forward", "forward"]


def test_a_window_too_large_for_sdl_is_one_line(tmp_path, no_shipped_checkpoint, capsys):
    """--scale 300 asked SDL for a 19,200-pixel window: a pygame.error traceback."""
    assert cli.main(["play", "--world", "sim", "--scale", "300"]) == 2
    err = capsys.readouterr().err
    assert "worldsim play: cannot open a 19200x" in err and "lower --scale" in err and "Traceback" not in err


def test_the_hud_fits_long_messages_to_the_window(tmp_path, no_shipped_checkpoint, monkeypatch):
    """A recording's path or a write error ran off a 512-pixel window, and a recording whose first
    frame failed still said "recording to ..." over the reason it stopped."""
    from worldsim.play import FrameWindow

    window = FrameWindow(scale=8, hud_lines=3)
    line = "steps 4 shift 2 temp 1 noise 0.25 bf16  |  REC 2 frames  |  recording to " + "x" * 200 + ".mp4"
    fitted = window._fitted(line, 504)
    assert fitted.endswith("...") and window.font.size(fitted)[0] <= 504 and line.startswith(fitted[:-3])
    assert window._fitted("H help", 504) == "H help"

    def full_disk(self, frame):
        raise PlayError("v.mp4: cannot write the video (No space left on device); nothing was written")

    monkeypatch.setattr(play_mod.VideoRecorder, "append", full_disk)
    config = PlayConfig(world="sim", fps=1000, scale=1, record_dir=str(tmp_path))
    game = run_interactive(config, scripted([press("v"), []]))
    assert game.recorder is None and game.message.startswith("recording stopped: v.mp4: cannot write")


def _screen(game) -> np.ndarray:
    import pygame

    game.draw()
    return pygame.surfarray.array3d(game.window.screen).transpose(1, 0, 2).copy()


@pytest.fixture
def small_game(tiny_ckpt, tmp_path):
    """A dream with the real window at --scale 4 (a 256-pixel view), F pressed: dream | reality."""
    from worldsim.play import Game

    config = PlayConfig(checkpoint=str(tiny_ckpt), fps=1000, scale=4, context_frames=2, record_dir=str(tmp_path))
    world = open_world(config, reality=True, log=lambda _: None)
    game = Game(world, config, load_keymap("default", world.action_names))
    game.new_world()
    game.message_until = 0.0
    try:
        yield game
    finally:
        game.stop_recording()
        game.window.close()
        world.env.close()


def test_the_help_stays_inside_the_view_below_the_captions(small_game):
    """Seen on rendered windows at --scale 4: with dream | reality on, the help's last line was drawn
    over the HUD's first, its title over the "DREAM (model)" caption, and in the dream alone two
    lines ran off the window's right edge ("dream vs reality: the real...")."""
    game = small_game
    view_h = 64 * 4
    for side_by_side in (True, False):
        game.side_by_side = side_by_side
        game.show_help = False
        plain = _screen(game)
        game.show_help = True
        helped = _screen(game)
        assert np.array_equal(helped[view_h:], plain[view_h:])  # the HUD strip: untouched
        if side_by_side:
            w, h = game.window.font.size("DREAM (model)")
            assert np.array_equal(helped[4:4 + h, 4:4 + w], plain[4:4 + h, 4:4 + w])  # the caption: on top, undimmed
    from worldsim.keymaps import KEYMAPS, help_lines

    window = game.window
    lines = ["worldsim play - keys", ""] + help_lines(KEYMAPS["default"])
    area = window.pg.Rect(0, 0, 64 * 4, view_h)
    placed = window.overlay_layout(lines, area)
    shown = [text for text, _, _ in placed]
    assert shown == [piece for line in lines for piece in line.split("\t") if piece]  # whole, nothing cut
    for text, font, (x, y) in placed:
        assert area.contains(window.pg.Rect((x, y), font.size(text)))
    for (t1, f1, (x1, y1)), (_, _, (x2, y2)) in itertools.pairwise(placed):
        if y1 == y2:  # keys | what on one row: the columns do not overlap
            assert x1 + f1.size(t1)[0] < x2


def test_recording_and_pause_show_on_the_view_at_a_small_size(small_game):
    """At --scale 4 the HUD's third line was cut after the sampler settings, so neither "REC" nor a
    message like "recording to ..." showed; pause was one grey word in the HUD. And the first
    screen said "0.0 fps" before any frame was timed."""
    game = small_game
    assert " -- fps" in game.hud()[0] and "0.0 fps" not in game.hud()[0]
    game.side_by_side = False
    plain = _screen(game)
    game.toggle_recording()
    recording = _screen(game)
    width = 64 * 4
    assert game.window._fitted(game.hud()[2], width - 8).startswith("REC 1 frame  |  recording to ")
    corner = np.s_[0:30, width - 60:width]
    red = (recording[corner][..., 0] > 200) & (recording[corner][..., 1] < 100)
    assert red.sum() > 20  # a red "REC" badge at the view's top right
    game.stop_recording()
    game.paused = True
    paused = _screen(game)
    middle = np.s_[width // 2 - 10:width // 2 + 10, 20:width - 20]
    assert np.any(paused[middle] != plain[middle])  # a "PAUSED" banner across the view
    assert np.array_equal(paused[:30, width - 60:width], plain[:30, width - 60:width])  # no REC once stopped


def test_the_simulators_help_leaves_out_dream_vs_reality(tmp_path, small_game, no_shipped_checkpoint):
    """F does nothing in --world sim (it says "this is already the real simulator"): its help line went."""
    from worldsim.play import Game

    def shown_help(game):
        seen = []
        game.window.show = lambda frame, hud, overlay, **_: seen.append(overlay)
        game.show_help = True
        game.draw()
        return seen[-1]

    assert any(line.startswith("f\t") for line in shown_help(small_game))
    config = PlayConfig(world="sim", fps=1000, scale=2, record_dir=str(tmp_path))
    world = open_world(config, log=lambda _: None)
    game = Game(world, config, load_keymap("default", world.action_names), window=small_game.window)
    try:
        game.new_world()
        lines = shown_help(game)
        assert lines and not any(line.startswith("f\t") for line in lines)
    finally:
        world.env.close()


def test_at_a_low_fps_esc_and_pause_are_handled_within_the_tick(tmp_path, no_shipped_checkpoint, monkeypatch):
    """At --fps 0.5 a tick lasts 2 s, and the game waited it out before it looked at the keyboard:
    pause showed and Esc quit up to 2 s late. A movement key pressed meanwhile still waits for the
    next tick, as --fps paces the walk. On a fake clock: no test asserts a wall-clock time."""
    import types

    import pygame

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(play_mod, "time", types.SimpleNamespace(
        perf_counter=lambda: clock.now, monotonic=lambda: clock.now,
        sleep=lambda seconds: setattr(clock, "now", clock.now + seconds)))
    drawn = []
    real_draw = play_mod.Game.draw

    def spy_draw(self):
        drawn.append((clock.now, self.paused, self.steps_taken))
        return real_draw(self)

    monkeypatch.setattr(play_mod.Game, "draw", spy_draw)
    key = lambda kind, code: pygame.event.Event(kind, key=code)
    script = [(0.1, [key(pygame.KEYDOWN, pygame.K_UP), key(pygame.KEYUP, pygame.K_UP)]),  # a tap in tick 1's wait
              (2.2, [key(pygame.KEYDOWN, pygame.K_p)]), (2.4, [key(pygame.KEYDOWN, pygame.K_ESCAPE)])]

    calls = []

    def source():
        calls.append(clock.now)
        if calls.count(clock.now) > 3:  # a loop that waits on another clock than ours: end it, do not hang
            return [key(pygame.KEYDOWN, pygame.K_ESCAPE)]
        return script.pop(0)[1] if script and clock.now >= script[0][0] else []

    config = PlayConfig(world="sim", fps=0.5, scale=1, record_dir=str(tmp_path))
    game = run_interactive(config, source)
    assert not game.running and game.paused and game.steps_taken == 1
    assert min(t for t, _, steps in drawn if steps == 1) >= 2.0  # the tap played on the next tick
    assert 2.2 <= min(t for t, paused, _ in drawn if paused) < 2.3  # the pause showed at once
    assert clock.now < 2.5  # and Esc quit within tick 2's 2 s


def test_a_key_held_through_a_pause_walks_after_it(tmp_path, no_shipped_checkpoint):
    config = PlayConfig(fps=1000, scale=1, record_dir=str(tmp_path))
    game = run_interactive(config, scripted([press("p"), [("KEYDOWN", "up")], press("p"), [], [("KEYUP", "up")]]))
    assert game.steps_taken >= 1


@pytest.mark.parametrize("extra, message", [
    (["--world", "sim", "--dataset", "d"], "--dataset: for the dream; --world sim walks the simulator itself"),
    (["--world", "sim", "--reality", "--steps", "2"], "--steps, --reality: for the dream"),
    (["--world", "sim", "--precision", "bf16", "--context-frames", "8"], "--precision, --context-frames: for the dream"),
    (["--world", "sim", "--still-frames", "8"], "--still-frames: for the dream"),
    (["--still-frames", "-1"], "--still-frames must be from 0 to 10000, got -1"),
    (["--world", "sim", "--checkpoint", "no-such-folder"], "checkpoint no-such-folder: no such checkpoint folder"),
    (["--episode", "3"], "--episode picks an episode of --dataset"),
    (["--fps", "inf"], "--fps must be from 0.1 to 1000, got inf"),
    (["--seed", "-1"], "--seed must be from 0 to 2**32 - 1, got -1"),  # was numpy's or Gymnasium's traceback
    (["--seed", str(2**32)], "--seed must be from 0 to 2**32 - 1, got 4294967296"),  # as record, train, eval, bench
    (["--out", " "], "--out needs a file name"),
    (["--out", "x.gif", "--fps", "60"], "GIFs go up to 50 fps"),
    (["--cache-mode", "kv", "--memory-frames", "10"], "--memory-frames bounds the long-term memory of the multilevel"),
])
def test_options_that_would_do_nothing_are_refused(extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a regression would write its --out here, not into the checkout
    assert cli.main(["play", "--headless", "--actions", "random:2", *extra]) == 2
    assert message in capsys.readouterr().err


def test_walking_the_simulator_has_no_step_limit(tmp_path, no_shipped_checkpoint, capsys):
    """Maze-v0 truncates at 1,000 steps by default: play's walk used to crash at step 1,001
    (`--world sim --benchmark` plays 2,000). The walk goes on in the same world."""
    assert cli.main(["play", "--world", "sim", "--headless", "--actions", "random:1001"]) == 0
    assert "episode ended" not in capsys.readouterr().err
    config = PlayConfig(fps=1000, scale=1, record_dir=str(tmp_path))
    game = run_interactive(config, scripted([[("KEYDOWN", "up")], *[[]] * 1002, [("KEYUP", "up")]]))
    assert game.steps_taken > 1000 and game.worlds == 1 and game.world.env.unwrapped.max_steps is None


def test_the_fps_meter_measures_a_tapped_frame_by_its_own_time():
    """A tap between idle ticks leaves one timestamp in the window: the HUD said 0.0 fps."""
    from worldsim.play import FpsMeter

    meter = FpsMeter()
    for t in range(5):
        meter.gap()  # an idle tick
        meter.tick(now=float(t), frame_seconds=0.125)
    assert meter.fps == 8.0
    meter.tick(now=4.1)
    meter.tick(now=4.2)  # then a held key: the rate over the window
    assert 9.9 < meter.fps < 10.1


def test_an_actions_file_that_is_not_utf8_is_one_line(tmp_path, no_shipped_checkpoint, capsys):
    """Windows PowerShell's `echo forward > a.txt` writes UTF-16: that was a UnicodeDecodeError traceback.
    Saved "as UTF-8" there, it starts with a byte-order mark, which is read as UTF-8."""
    actions = tmp_path / "a.txt"
    actions.write_bytes("forward\r\n".encode("utf-16"))
    assert cli.main(["play", "--headless", "--actions", str(actions)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8 text; save it as UTF-8" in err and "Traceback" not in err
    actions.write_bytes("forward\r\nturn_left\r\n".encode("utf-8-sig"))
    assert read_actions(str(actions), ACTIONS) == [ACTIONS.index("forward"), ACTIONS.index("turn_left")]


def test_a_checkpoint_whose_simulator_cannot_start_is_one_line(tiny_ckpt, tmp_path, capsys):
    import json
    import shutil

    ck = tmp_path / "other-sim"
    shutil.copytree(tiny_ckpt, ck)
    config = json.loads((ck / "config.json").read_text())
    config["simulator"] = {"id": "worldsim/Maze-v0", "settings": {"no_such_setting": 1}}
    (ck / "config.json").write_text(json.dumps(config))
    for world in ("dream", "sim"):
        assert cli.main(["play", "--world", world, "--checkpoint", str(ck), "--headless", "--actions", "random:2"]) == 2
        err = capsys.readouterr().err
        assert "worldsim play: cannot start the simulator 'worldsim/Maze-v0'" in err and "Traceback" not in err


def test_a_device_this_machine_lacks_is_one_line(tiny_ckpt, capsys):
    assert cli.main(["play", "--checkpoint", str(tiny_ckpt), "--headless", "--actions", "random:2",
                     "--device", "nonsense"]) == 2
    assert "worldsim play: device 'nonsense' is not a torch device" in capsys.readouterr().err


def test_a_video_target_in_a_folder_that_cannot_be_written_names_the_target(tmp_path, monkeypatch):
    """The temporary twin cannot be made (no permission there; simulated, as root may write anywhere):
    the error names the video asked for, not the hidden twin."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".x.abc.partial.mp4"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PlayError, match=rf"^{tmp_path / 'x.mp4'}: cannot write there \(Permission denied\)$") as caught:
        VideoRecorder(tmp_path / "x.mp4", fps=15)
    assert caught.value.exit_code == 1  # no permission: the file system's refusal (README)


def test_a_negative_episode_is_refused_not_read_as_the_last(tmp_path, capsys):
    """`--episode -1` arrives as the string "-1", which the dataset would read as its last episode."""
    from _eval_fixtures import record_tiny_dataset, save_tiny_checkpoint

    data = record_tiny_dataset(tmp_path / "d", episodes=2, length=12)
    ck = save_tiny_checkpoint(tmp_path / "ck", resolution=32)
    out = tmp_path / "s.mp4"
    assert cli.main(["play", "--headless", "--checkpoint", str(ck), "--dataset", str(data), "--episode", "-1",
                     "--context-frames", "4", "--actions", "random:2", "--out", str(out)]) == 2
    assert "episode must be an episode id or a position >= 0, got '-1'" in capsys.readouterr().err
    assert not out.exists()


def test_play_bounds_the_long_term_memory_and_says_so(tiny_ckpt, capsys):
    """The long-term memory grew without end in play, and the time per frame with it; play keeps the
    last --memory-frames (300 by default; 0: every frame)."""
    for option, expected in ((None, 300), (5, 5), (0, None)):
        config = PlayConfig(checkpoint=str(tiny_ckpt), context_frames=1)
        if option is not None:
            config.memory_frames = option
        world = open_world(config, reality=False, log=lambda _: None)
        world.env.reset(seed=0)
        assert world.env.step(0)[4]["memory_frames"] == expected
        assert world.env.unwrapped._session.context.max_l2_frames == expected
    world = open_world(PlayConfig(checkpoint=str(tiny_ckpt), context_frames=1, cache_mode="kv"), reality=False,
                       log=lambda _: None)
    world.env.reset(seed=0)
    assert world.env.step(0)[4]["memory_frames"] is None  # a plain KV cache has no L2 to bound
    assert cli.main(["play", "--checkpoint", str(tiny_ckpt), "--headless", "--actions", "random:2",
                     "--memory-frames", "-1"]) == 2
    assert "--memory-frames must be >= 0 (0: no limit), got -1" in capsys.readouterr().err


def test_play_leaves_one_core_to_the_rest_of_the_machine_by_default(tmp_path, no_shipped_checkpoint, monkeypatch):
    """On a 2-core CPU torch's 2 threads stalled play whenever another program used a core (6.97 fps
    at frame 500 against 24.04 with 1 thread, with one busy core): play takes one fewer thread than its cores."""
    import torch

    from worldsim import play as play_mod

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    for cores, threads in (({0, 1}, 1), ({0}, 1), (set(range(8)), 7), (set(range(16)), 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: cores, raising=False)
        assert play_mod.default_threads() == threads, cores
    monkeypatch.setattr(play_mod, "default_threads", lambda: 3)
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    assert cli.main(["play", "--headless", "--world", "sim", "--actions", "random:2"]) == 0
    assert cli.main(["play", "--headless", "--world", "sim", "--actions", "random:2", "--threads", "2"]) == 0
    assert asked == [3, 2]



def _hud_shows(screen: np.ndarray, view_h: int, lines: list[str], font) -> bool:
    """Whether the window's HUD strip shows exactly `lines` in `font` (light grey on the dark strip)."""
    import pygame

    from worldsim.play import FrameWindow

    strip = pygame.Surface((screen.shape[1], screen.shape[0] - view_h))
    strip.fill((16, 16, 16))
    for i, line in enumerate(lines):
        strip.blit(font.render(line, True, (230, 230, 230)), (FrameWindow.PAD, FrameWindow.PAD + i * FrameWindow.LINE))
    return np.array_equal(screen[view_h:], pygame.surfarray.array3d(strip).transpose(1, 0, 2))


def test_the_hud_keeps_its_numbers_in_a_256_pixel_window(small_game):
    """At --scale 4 (the dream alone: a 256-pixel window) the HUD's first two lines were cut with "...":
    the frame number, the seed, the cache size and the RSS did not show. A smaller font and shorter
    forms of the lines (the same numbers) fit now; the rendered window is read back."""
    game = small_game
    game.side_by_side = False
    game.frame_index, game.seed = 1234, 987654
    game.info.update(cache_bytes=123.4 * 2**20, l2_frames=1180, l2_tokens=4720, l1_frames=15)
    game._rss_at, game._rss = 1e18, 1277.0  # a fixed RSS: no re-read
    screen = _screen(game)
    view_h, width = 64 * 4, 256
    assert screen.shape[1] == width
    font, lines = game.window.hud_layout(game.hud_forms(), width - 2 * game.window.PAD)
    assert _hud_shows(screen, view_h, lines, font)
    top, mem, status = lines
    assert "1234" in top and "seed 987654" in top and not top.endswith("...")
    assert "cache 123 MB" in mem and "RSS 1277 MB" in mem and not mem.endswith("...")
    assert status.startswith("H help  |  steps 2")
    assert all(font.size(line)[0] <= width - 2 * game.window.PAD for line in lines)
    assert font.get_height() < game.window.font.get_height()  # a smaller font than the 20-pixel one
    # the third line still starts with its status; a long message is cut at its end, not the font shrunk
    game.message, game.message_until = "recording to /a/rather/long/folder/name/video.mp4", float("inf")
    screen = _screen(game)
    font2, lines2 = game.window.hud_layout(game.hud_forms(), width - 2 * game.window.PAD)
    assert font2 is font and lines2[:2] == lines[:2] and _hud_shows(screen, view_h, lines2, font)
    assert lines2[2].startswith("recording to /a/") and lines2[2].endswith("...")


def test_the_hud_of_a_512_pixel_window_is_unchanged(tiny_ckpt, tmp_path):
    """--scale 8 (the default, a 512-pixel window): the full lines in the 20-pixel font, as before."""
    import pygame

    from worldsim.play import FrameWindow, Game

    config = PlayConfig(checkpoint=str(tiny_ckpt), fps=1000, scale=8, context_frames=2, record_dir=str(tmp_path))
    world = open_world(config, log=lambda _: None)
    game = Game(world, config, load_keymap("default", world.action_names))
    try:
        game.new_world()
        game.message_until = 0.0
        game.frame_index, game.seed = 1234, 987654
        game.info.update(cache_bytes=123.4 * 2**20, l2_frames=1180, l2_tokens=4720, l1_frames=15, memory_frames=2000)
        game._rss_at, game._rss = 1e18, 1277.0
        screen = _screen(game)
        assert screen.shape[1] == 512
        lines = game.hud()
        assert lines[1] == "memory L2 1180 of 2000 fr / 4720 tok  L1 15 fr  cache 123.4 MB  RSS 1277 MB"
        expected = pygame.Surface((512, game.window.hud_height))  # the HUD as it was drawn before
        expected.fill((16, 16, 16))
        font = pygame.font.Font(None, 20)
        for i, line in enumerate(lines):
            expected.blit(font.render(game.window._fitted(line, 512 - 2 * FrameWindow.PAD), True, (230, 230, 230)),
                          (FrameWindow.PAD, FrameWindow.PAD + i * FrameWindow.LINE))
        want = pygame.surfarray.array3d(expected).transpose(1, 0, 2)
        assert np.array_equal(screen[64 * 8:], want)
    finally:
        game.window.close()
        world.env.close()
