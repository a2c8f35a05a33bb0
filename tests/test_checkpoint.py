"""Checkpoint folders: bit-exact round trip, clear failures on mismatches (tiny, CPU)."""
from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from worldsim.autoencoder import AE_PRESETS, Autoencoder
from worldsim.checkpoint import CheckpointError, load_checkpoint, read_config
from worldsim.model import FAR, PRESETS
from worldsim.world import WorldModel

torch.set_num_threads(1)  # 2 shared cores: one thread avoids OpenMP spin contention

ACTIONS = ("noop", "forward", "backward", "turn_left", "turn_right")
SIM = {"id": "worldsim/Maze-v0", "settings": {"maze_size": 11}}


def make_world() -> WorldModel:
    torch.manual_seed(0)
    ae, far = Autoencoder(AE_PRESETS["tiny"]), FAR(PRESETS["tiny"])
    with torch.no_grad():
        for p in list(far.parameters()) + list(ae.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    ae.latent_scale.fill_(0.37)
    return WorldModel(ae, far, ACTIONS, (64, 64), simulator=SIM, sampler={"steps": 4, "cfg": 2.0}, device="cpu")


@pytest.fixture()
def saved(tmp_path):
    world = make_world()
    path = world.save(tmp_path / "ck", step=123, data_summary={"episodes": 7, "frames": 448})
    return world, path


def test_roundtrip_is_bit_exact(saved):
    world, path = saved
    loaded = WorldModel.load(path, device="cpu", resolution=(64, 64), action_names=ACTIONS)
    for a, b in ((world.far, loaded.far), (world.autoencoder, loaded.autoencoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.autoencoder.latent_scale.item() == pytest.approx(0.37)
    assert loaded.action_names == ACTIONS and loaded.resolution == (64, 64) and loaded.simulator == SIM
    assert loaded.sampler["steps"] == 4 and loaded.sampler["cfg"] == 2.0
    assert loaded.config["step"] == 123 and loaded.config["data"]["episodes"] == 7
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    actions = np.array([0, 1, 1, 3, 4])
    out = [w.new_session(frames, actions, seed=1).step(1) for w in (world, loaded)]
    assert np.array_equal(out[0], out[1])
    # the folder is plain JSON + safetensors with prefixed keys
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["far"]["depth"] == PRESETS["tiny"].depth and cfg["autoencoder"]["latent_channels"] == 4
    keys = load_file(str(path / "model.safetensors")).keys()
    assert all(k.startswith(("far.", "autoencoder.")) for k in keys)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck"]  # no temp leftovers


def test_resave_over_existing_folder_keeps_other_files(saved):
    world, path = saved
    (path / "README.md").write_text("model card")
    world.save(path, step=124)
    assert (path / "README.md").read_text() == "model card"
    assert read_config(path)["step"] == 124
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    load_checkpoint(path, device="cpu")



def test_a_resave_over_an_existing_folder_still_detects_a_torn_weights_file(saved):
    """config.json records the weights' size on every save, also over an existing folder (where both
    files are written before either replaces its old one): a weights file cut short later is refused."""
    world, path = saved
    world.save(path, step=124)
    weights = path / "model.safetensors"
    assert read_config(path)["weights"]["bytes"] == weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{path}.*model.safetensors has .* bytes, config.json expects"):
        load_checkpoint(path)


def test_a_save_whose_names_or_resolution_do_not_fit_the_model_is_refused_and_writes_nothing(tmp_path):
    from worldsim.checkpoint import save_checkpoint

    world = make_world()
    for kwargs, message in (({"action_names": ACTIONS, "resolution": (32, 32)},
                             r"resolution \[32, 32\] does not match the autoencoder's 64"),
                            ({"action_names": ACTIONS[:4]}, "4 action names but the model has 5 actions")):
        with pytest.raises(ValueError, match=message):
            save_checkpoint(tmp_path / "ck", world.autoencoder, world.far, **kwargs)
    assert list(tmp_path.iterdir()) == []

def test_a_save_sweeps_up_the_temp_files_of_saves_killed_mid_write(saved):
    """A SIGKILL while a checkpoint was written left its full-size temp twin, never removed."""
    world, path = saved
    (path / ".model.safetensors.k1ll3d.tmp").write_bytes(b"x" * 1000)
    (path / ".config.json.k1ll3d.tmp").write_text("{")
    (path.parent / ".ck.k1ll3d.tmp").mkdir()  # a first save into a new folder, killed
    (path.parent / ".ck.k1ll3d.tmp" / "model.safetensors").write_bytes(b"x")
    (path / "notes.tmp").write_text("the user's")
    world.save(path, step=125)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "notes.tmp"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck"]
    odd = path.parent / "ck[1]"  # a name glob would read as a pattern
    (path.parent / ".ck[1].k1ll3d.tmp").mkdir()
    world.save(odd, step=1)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck", "ck[1]"]


def test_a_full_disk_while_resaving_keeps_the_old_checkpoint_whole(saved, monkeypatch):
    """A re-save (train --resume re-exporting RUN/checkpoint, WorldModel.save over a folder) replaced
    the weights first and the config second: the config failing on a full disk left new bf16 weights
    beside the old config, a checkpoint that no longer loaded. Both are written before either lands."""
    import worldsim.checkpoint as checkpoint_module

    world, path = saved
    before = {name: (path / name).read_bytes() for name in ("config.json", "model.safetensors")}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.json, "dump", full_disk)
    with pytest.raises(OSError, match="No space left") as err:
        world.save(path, step=999, far_dtype="bfloat16")
    assert err.value.filename == str(path / "config.json")  # what was being written, not a temp name
    assert {name: (path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    monkeypatch.undo()
    assert load_checkpoint(path, device="cpu").step == 123
    # a rename that fails (an I/O error) removes its temp file too: it is as large as the weights
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        world.save(path, step=999)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_a_checkpoint_refuses_another_width_or_action_order(saved):
    """A caller's frames of another width, or its actions in another order (the same names), would
    drive the model with wrong inputs: both are refused, not only another height or other names."""
    _, path = saved
    with pytest.raises(CheckpointError, match="resolution"):
        load_checkpoint(path, resolution=(64, 84))
    with pytest.raises(CheckpointError, match="action names"):
        load_checkpoint(path, action_names=tuple(reversed(ACTIONS)))


def test_a_saved_checkpoint_reads_like_any_file_the_user_makes(saved, tmp_path):
    """Checkpoints are shared and played by others: not the 0700 / 0600 of mkdtemp and mkstemp,
    whether the folder is new or its files are replaced."""
    world, _ = saved
    mask = os.umask(0o022)
    os.umask(mask)
    fresh = world.save(tmp_path / "fresh")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o777 & ~mask
    for name in ("config.json", "model.safetensors"):  # safetensors itself creates its files 0600
        assert stat.S_IMODE((fresh / name).stat().st_mode) == 0o666 & ~mask, name
    world.save(fresh, step=5)  # over the existing folder: each file swapped in
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((fresh / name).stat().st_mode) == 0o666 & ~mask, name


def test_wrong_resolution_or_actions_fail_clearly(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"resolution \[64, 64\] differs from the requested \[84, 84\]") as e:
        load_checkpoint(path, resolution=(84, 84))
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="action names") as e:
        WorldModel.load(path, action_names=("noop", "forward", "backward"))
    assert str(path) in str(e.value)


def _rewrite_weights(path, edit):
    """Edit the tensors as a tool that keeps the file's metadata would (its tensors_sha256, which
    pairs it with config.json, included: the checks below are the tensors' own)."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata=metadata)
    cfg = json.loads((path / "config.json").read_text())
    cfg["weights"]["bytes"] = (path / "model.safetensors").stat().st_size
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_unexpected_and_misshaped_tensors(saved):
    _, path = saved
    _rewrite_weights(path, lambda t: t.pop("far.blocks.1.attn_coarse.qkv.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*far\.blocks\.1\.attn_coarse\.qkv\.weight"):
        load_checkpoint(path)
    _rewrite_weights(path, lambda t: t.update({"far.blocks.1.attn_coarse.qkv.weight": torch.zeros(3, 3), "far.extra": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for far\.blocks\.1\.attn_coarse\.qkv\.weight"):
        load_checkpoint(path)
    _rewrite_weights(path, lambda t: t.update({"far.blocks.1.attn_coarse.qkv.weight": torch.zeros(192, 64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*far\.extra"):
        load_checkpoint(path)


def test_tensors_of_another_dtype_or_not_finite_are_refused(saved):
    """load_state_dict would cast them silently: int64 action embeddings load as zeros (the model
    then ignores the player), NaN weights play black frames."""
    _, path = saved
    name = "far.action_embed.weight"
    _rewrite_weights(path, lambda t: t.update({name: (t[name] * 100).to(torch.int64)}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is int64, expected float32"):
        load_checkpoint(path)
    _rewrite_weights(path, lambda t: t.update({name: torch.full_like(t[name].float(), float("nan"))}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds NaN or infinite values"):
        load_checkpoint(path)


def test_the_finite_check_tells_an_overflowing_sum_from_a_value_that_is_not_finite(saved):
    """check_tensors first sums a tensor (one pass, no mask): huge finite values whose sum overflows
    are still read value by value, and load; one inf among them is refused."""
    _, path = saved
    name = "far.action_embed.weight"
    _rewrite_weights(path, lambda t: t.update({name: torch.full_like(t[name], 3e38)}))
    assert torch.all(load_checkpoint(path, device="cpu").far.action_embed.weight == 3e38)
    huge = lambda t: t.update({name: torch.full_like(t[name], 3e38).index_fill_(1, torch.tensor([1]), float("inf"))})
    _rewrite_weights(path, huge)
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds NaN or infinite values"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value, message", [
    ("far", {"depth": "6"}, r"far\.depth must be an integer, got '6'"),
    ("far", {"depth": 6.0}, r"far\.depth must be an integer, got 6\.0"),
    ("far", {"window": True}, r"far\.window must be an integer, got True"),  # not a window of 1
    ("far", {"heads": 0}, "heads must be >= 1, got 0"),
    # these loaded and played black frames (rope_theta 0, clean_t inf) or failed deep in torch (mlp_ratio < 0)
    ("far", {"rope_theta": 0}, "rope_theta must be a positive number, got 0"),
    ("far", {"rope_theta": float("nan")}, "rope_theta must be a positive number, got nan"),
    ("far", {"mlp_ratio": -4.0}, r"mlp_ratio must be a positive number .*got -4\.0"),
    ("far", {"mlp_ratio": float("inf")}, "mlp_ratio must be a positive number .*got inf"),
    ("far", {"mlp_ratio": 0.001}, r"at least one hidden unit\), got 0\.001"),
    ("far", {"clean_t": float("inf")}, r"clean_t must be a negative number \(t < 0 marks context\), got inf"),
    ("far", {"long_context_t": 0.5}, "long_context_t must be a negative number"),
    ("autoencoder", {"channels": ["8", 16, 16, 16]}, r"autoencoder\.channels must be a list of integers"),
    ("autoencoder", {"decoder_blocks_per_level": "2"}, "decoder_blocks_per_level must be an integer or null"),
    ("resolution", [32, 32], r"resolution \[32, 32\] but the autoencoder makes 64x64 frames"),
    ("resolution", "64", r"resolution must be \[height, width\]"),
    ("resolution", None, r"resolution must be \[height, width\]"),
    ("action_names", ["noop", "noop", "a", "b", "c"], "action_names must be a list of distinct names"),
    ("action_names", ["noop", "a", "b", "c"], "4 action names but far.num_actions=5"),
    ("step", "abc", "step must be an integer >= 0"),
    ("step", -1, "step must be an integer >= 0, got -1"),
    ("simulator", "worldsim/Maze-v0", "simulator must be null or"),
    ("weights", "x", "weights must be"),
    # eval generated every episode, then failed with an AttributeError and wrote no results
    ("data", "x", "data must be an object or null, got 'x'"),
    ("extra", ["note"], r"extra must be an object or null, got \['note'\]"),
    ("weights", {"bytes": "123", "dtypes": {"far": "float32"}}, "weights must be"),
    ("weights", {"bytes": None, "dtypes": {"far": "float16"}}, "weights must be"),
])
def test_config_values_of_the_wrong_type_name_the_key(saved, key, value, message):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config[key] = {**config[key], **value} if key in ("far", "autoencoder") else value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{path}.*{message}"):
        load_checkpoint(path)


@pytest.mark.parametrize("section, key", [("far", "window"), ("far", "depth"), ("autoencoder", "resolution"),
                                          ("autoencoder", "latent_channels"), ("far", "clean_t")])
def test_a_config_lacking_a_model_key_is_refused_by_name(saved, section, key):
    """Without far.window the model loaded with the default window, 16, not the one it was trained
    with, and played; a missing depth or resolution was blamed on the default's value. Every
    checkpoint ever written has its context labels: without one, the loader's fallback (-1, for run
    configs from before session 26) would label a new model's context wrongly."""
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    del config[section][key]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{path}.*{section} lacks '{key}'"):
        load_checkpoint(path)


def test_a_checkpoint_from_before_the_deepened_decoder_loads(saved):
    """The first checkpoints (versions 1-4 of the shipped one) lack autoencoder.decoder_blocks_per_level."""
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    del config["autoencoder"]["decoder_blocks_per_level"]
    (path / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(path).autoencoder.config.decoder_blocks_per_level is None


@pytest.mark.parametrize("depth", [1, 3])
def test_a_config_depth_other_than_the_weights_is_named(saved, tmp_path, depth):
    """A hand-edited or mismatched config.json: the error states both depths, not only tensor names."""
    world, _ = saved
    path = world.save(tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    cfg["far"]["depth"] = depth
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"says far\.depth {depth}, the weights hold {PRESETS['tiny'].depth} blocks"):
        load_checkpoint(path)


def test_missing_files_corrupt_json_and_torn_save(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nope")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="torn"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt config.json") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(path)


def test_transformer_and_autoencoder_latents_must_agree(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["far"]["latent_channels"] += 1  # e.g. a hand-edited config or the wrong autoencoder
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="latents but the autoencoder makes") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_cpu_decode_in_channels_last_matches_the_plain_decoder(tmp_path):
    """WorldModel decodes on CPU with an NHWC decoder (faster); frames, leading dims and the saved
    weights must be what the plain NCHW autoencoder gives."""
    world = make_world()
    plain = Autoencoder(AE_PRESETS["tiny"])
    plain.load_state_dict({k: v.contiguous() for k, v in world.autoencoder.state_dict().items()})
    assert world.autoencoder.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    latents = torch.randn(2, 3, 4, 8, 8)
    frames = world.decode(latents)
    with torch.no_grad():
        expected = ((plain.decode(latents).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).numpy()
    assert frames.shape == (2, 3, 64, 64, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - expected).max() <= 1 and (frames != expected).mean() < 1e-3
    assert np.array_equal(world.decode(latents[1, 2]), frames[1, 2])  # unbatched latents too
    loaded = WorldModel.load(world.save(tmp_path / "ck"), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), loaded.autoencoder.state_dict().values()))


def test_transformer_stored_in_bfloat16_halves_its_bytes_and_loads_as_rounded_float32(tmp_path):
    world = make_world()
    full = world.save(tmp_path / "fp32")
    half = world.save(tmp_path / "bf16", far_dtype="bfloat16")
    stored = load_file(str(half / "model.safetensors"))
    far_floats = [k for k, v in stored.items() if k.startswith("far.") and v.is_floating_point()]
    assert far_floats and all(stored[k].dtype == torch.bfloat16 for k in far_floats)
    assert all(v.dtype == torch.float32 for k, v in stored.items() if k.startswith("autoencoder.") and v.is_floating_point())
    assert read_config(half)["weights"]["dtypes"] == {"autoencoder": "float32", "far": "bfloat16"}
    far_bytes = sum(p.numel() * 4 for p in world.far.state_dict().values() if p.is_floating_point())
    saved_bytes = (full / "model.safetensors").stat().st_size - (half / "model.safetensors").stat().st_size
    assert saved_bytes == pytest.approx(far_bytes / 2, rel=0.01)

    loaded = WorldModel.load(half, device="cpu")
    assert loaded.far.config == world.far.config
    want = {k: v.to(torch.bfloat16).float() for k, v in world.far.state_dict().items()}
    got = loaded.far.state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(want[k], v) for k, v in world.far.state_dict().items())  # rounding did happen
    sa, sb = world.autoencoder.state_dict(), loaded.autoencoder.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    # re-saving keeps the storage it was loaded with, unless told otherwise
    resaved = loaded.save(tmp_path / "again")
    assert read_config(resaved)["weights"]["dtypes"]["far"] == "bfloat16"
    assert load_checkpoint(resaved, device="cpu").far_dtype == "bfloat16"
    assert load_checkpoint(full, device="cpu").far_dtype == "float32"
    with pytest.raises(ValueError, match="far_dtype must be one of float32, bfloat16"):
        world.save(tmp_path / "bad", far_dtype="float16")
    assert not (tmp_path / "bad").exists()


def test_bf16_play_is_the_same_from_either_storage(tmp_path):
    """Play in bf16 rounds the transformer's weights to bfloat16 anyway, so storing them so
    changes none of its frames."""
    world = make_world()
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    actions = np.array([0, 1, 1, 3, 4])
    played = []
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        loaded = WorldModel.load(world.save(tmp_path / name, far_dtype=dtype), device="cpu", precision="bf16")
        session = loaded.new_session(frames, actions, seed=1)
        played.append(np.stack([session.step(a) for a in (1, 1, 3, 4, 2)]))
    assert np.array_equal(played[0], played[1])


def _frames(world: WorldModel, **kwargs) -> np.ndarray:
    context = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    session = world.new_session(context, np.array([0, 1, 3]), seed=5, **kwargs)
    return np.stack([session.step(a) for a in (1, 3, 1)])


@pytest.mark.parametrize("key, value", [("shift", 3.0), ("temperature", 0.5)])
def test_a_sampler_setting_is_a_checkpoint_default_that_sessions_can_override(saved, key, value):
    """Both default to 1.0 (the uniform grid, plain sampling), also in a config written before they existed."""
    world, path = saved
    assert load_checkpoint(path).sampler[key] == 1.0  # written explicitly by save
    config = json.loads((path / "config.json").read_text())
    config["sampler"][key] = value
    (path / "config.json").write_text(json.dumps(config))
    changed = WorldModel.load(path, device="cpu")
    assert changed.sampler[key] == value
    np.testing.assert_array_equal(_frames(changed), _frames(world, **{key: value}))
    np.testing.assert_array_equal(_frames(changed, **{key: 1.0}), _frames(world))
    assert not np.array_equal(_frames(changed), _frames(world))
    del config["sampler"][key]
    (path / "config.json").write_text(json.dumps(config))
    np.testing.assert_array_equal(_frames(WorldModel.load(path, device="cpu")), _frames(world))


@pytest.mark.parametrize("key, value", [("shift", 0), ("shift", "3"), ("steps", 0), ("steps", 2.5),
                                        ("temperature", -1), ("temperature", "0.7"), ("temperature", True),
                                        ("cfg", float("nan")), ("cfg", "1.5"), ("generated_noise", 1.0),
                                        ("context_noise", -0.1), ("still_frames", -1), ("still_frames", 2.0),
                                        ("still_frames", True)])
def test_bad_sampler_settings_name_the_file(saved, key, value):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["sampler"][key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{path}.*sampler\.{key} must be"):
        load_checkpoint(path)


def test_a_transformer_carried_without_its_autoencoder_is_rejoined_bit_for_bit(saved, tmp_path, capsys):
    """scripts/transport_far.py: a GPU run's transformer comes home without the autoencoder it shares
    with a shipped checkpoint (the device tool returns 64 MiB a call) and is paired with it again;
    an autoencoder with other weights is refused, since its latents are not the ones it learned."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    repo = Path(__file__).resolve().parents[1]
    script = repo / "scripts" / "transport_far.py"
    env = {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    world, path = saved
    # the strip runs the script as users do (a fresh interpreter, its exit status); the joins call its
    # main() here, with the same arguments, exit statuses and stderr: each subprocess costs a torch import
    stripped = subprocess.run([sys.executable, str(script), "strip", str(path), str(tmp_path / "far")],
                              capture_output=True, text=True, env=env)
    assert stripped.returncode == 0, stripped.stderr
    spec = importlib.util.spec_from_file_location("transport_far", script)
    transport_far = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(transport_far)

    def run(*args):
        capsys.readouterr()
        returncode = transport_far.main(list(map(str, args)))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=returncode, stdout=out, stderr=err)

    assert not any(k.startswith("autoencoder.") for k in load_file(str(tmp_path / "far" / "far.safetensors")))
    umask = os.umask(0o022)
    os.umask(umask)
    # readable like any folder (mkdtemp made it 0700, safetensors its file 0600)
    assert (tmp_path / "far").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "far" / "far.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    done = run("join", tmp_path / "far", path, tmp_path / "joined")
    assert done.returncode == 0, done.stderr
    a, b = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "joined" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_config(tmp_path / "joined") == read_config(path)

    other = make_world()
    with torch.no_grad():
        next(other.autoencoder.decoder.parameters()).add_(0.01)
    other_path = other.save(tmp_path / "other")
    refused = run("join", tmp_path / "far", other_path, tmp_path / "wrong")
    assert refused.returncode == 1 and "not the one the transformer" in refused.stderr and str(other_path) in refused.stderr
    assert not (tmp_path / "wrong").exists()
    again = run("join", tmp_path / "far", path, tmp_path / "joined")
    assert again.returncode == 1 and "already exists" in again.stderr

    # what a copy cut short or edited on its way home gives: one line naming the file, no traceback
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "far", damaged)
    weights = (damaged / "far.safetensors").read_bytes()
    (damaged / "far.safetensors").write_bytes(weights[: len(weights) // 2])
    said = run("join", damaged, path, tmp_path / "j1")
    assert said.returncode == 1 and str(damaged / "far.safetensors") in said.stderr, said.stderr
    assert "unreadable transformer weights" in said.stderr and len(said.stderr.strip().splitlines()) == 1
    (damaged / "far.safetensors").write_bytes(weights)
    config = json.loads((damaged / "config.json").read_text())
    del config["far"]
    (damaged / "config.json").write_text(json.dumps(config))
    said = run("join", damaged, path, tmp_path / "j2")
    assert said.returncode == 1 and str(damaged) in said.stderr and "'far'" in said.stderr, said.stderr
    assert len(said.stderr.strip().splitlines()) == 1, said.stderr
    (damaged / "config.json").write_text("{not json")
    said = run("join", damaged, path, tmp_path / "j3")
    assert said.returncode == 1 and str(damaged) in said.stderr and "corrupt config.json" in said.stderr, said.stderr
    assert not any(p.name.startswith((".j1", ".j2", ".j3", "j1", "j2", "j3")) for p in tmp_path.iterdir())


def test_a_stopped_transport_leaves_no_temp_folder_and_the_next_run_sweeps_old_ones(saved, tmp_path):
    """scripts/transport_far.py and store_far_bf16.py, stopped by SIGTERM (a timeout, the device call's
    end) were killed outright: a full-size `.OUT.<random>.tmp` stayed beside OUT for good, and Ctrl-C
    was a traceback. Both now stop as Ctrl-C does (exit 130, the temp folder removed), and a later
    write to OUT sweeps the twins that a SIGKILL left."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    _, path = saved
    # One interpreter (each costs a torch import) stops both scripts in turn, each with a real SIGTERM to
    # itself mid-write, and exits with the first status that is not 130: each main() returns what its
    # script exits with. The stderr of each is written between markers, to be told apart.
    stop_mid_write = (
        "import importlib.util, json, os, signal, sys\n"
        "import worldsim.checkpoint as c\n"
        "def stopped(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    raise AssertionError('SIGTERM did not stop the write')\n"
        "for script, args in json.loads(sys.argv[1]):\n"
        "    spec = importlib.util.spec_from_file_location('s', script); s = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(s)\n"
        "    s.save_tensors = stopped; c.save_tensors = stopped\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a fresh process starts: each installs its own\n"
        "    print(f'<<{script}', file=sys.stderr, flush=True)\n"
        "    code = s.main(args)\n"
        "    print(f'{script}>>', file=sys.stderr, flush=True)\n"
        "    if code != 130:\n"
        "        sys.exit(code)\n"
        "sys.exit(130)\n")
    env = {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    runs = [(str(repo / "scripts" / "transport_far.py"), ["strip", str(path), str(tmp_path / "transport_far")]),
            (str(repo / "scripts" / "store_far_bf16.py"), [str(path), str(tmp_path / "store_far_bf16")])]
    done = subprocess.run([sys.executable, "-c", stop_mid_write, json.dumps(runs)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 130, (done.returncode, done.stderr)
    for script, args in runs:
        said = done.stderr.split(f"<<{script}\n", 1)[1].split(f"{script}>>", 1)[0]
        assert f"interrupted; {args[-1]} not written" in said and "Traceback" not in said, (script, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    from worldsim.checkpoint import temp_twin

    left = tmp_path / ".far.k1ll3d.tmp"  # what a SIGKILL mid-write leaves
    left.mkdir()
    (left / "far.safetensors").write_bytes(b"x" * 1000)
    twin = temp_twin(tmp_path / "far")
    assert not left.exists() and twin.is_dir() and twin.name.startswith(".far.")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError) as caught:  # was "[Errno 17] File exists: '.../file'"
        temp_twin(tmp_path / "file" / "out")
    assert "a file is in the way of its folder" in str(caught.value) and caught.value.filename == str(tmp_path / "file")
    with pytest.raises(NotADirectoryError):
        temp_twin(tmp_path / "file" / "sub" / "out")


def _far_with_other_weights(world):
    import copy

    far = copy.deepcopy(world.far)
    with torch.no_grad():
        for p in far.parameters():
            p.add_(1.0)
    return far


def _fingerprint(module) -> list[torch.Tensor]:
    return [t.clone() for _, t in sorted(module.state_dict().items())]


def test_a_load_between_a_resaves_two_renames_waits_for_the_config_of_its_weights(saved, monkeypatch):
    """A re-save replaces model.safetensors, then config.json. play or eval loading a run's checkpoint
    while training re-saved it got the old config.json (its step, data, val loss) with the new
    weights, of the same size, silently. The load now waits for the save's config.json."""
    import threading
    import types

    import worldsim.checkpoint as checkpoint_module
    from worldsim.checkpoint import save_checkpoint

    world, path = saved  # step 123
    far2 = _far_with_other_weights(world)
    first_read_unpaired, saved_in_full = threading.Event(), threading.Event()

    def paused(seconds):  # the load's wait after reading the two files of two saves
        first_read_unpaired.set()
        saved_in_full.wait(timeout=60)

    monkeypatch.setattr(checkpoint_module, "time", types.SimpleNamespace(monotonic=lambda: 0.0, sleep=paused),
                        raising=False)
    loaded = []

    def load():
        try:
            loaded.append(load_checkpoint(path, device="cpu"))
        except CheckpointError as exc:
            loaded.append(exc)

    real_replace = os.replace
    reader = threading.Thread(target=load)

    def replace_then_load(src, dst):
        real_replace(src, dst)
        if str(dst) == str(path / "model.safetensors"):  # the new weights are in, config.json is not yet
            reader.start()
            while not first_read_unpaired.is_set() and reader.is_alive():
                first_read_unpaired.wait(0.01)

    monkeypatch.setattr(os, "replace", replace_then_load)
    save_checkpoint(path, world.autoencoder, far2, action_names=ACTIONS, step=124)
    monkeypatch.setattr(os, "replace", real_replace)
    saved_in_full.set()
    reader.join(timeout=60)
    assert len(loaded) == 1 and not isinstance(loaded[0], CheckpointError), loaded
    ck = loaded[0]
    assert ck.step == 124 and all(torch.equal(a, b) for a, b in zip(_fingerprint(ck.far), _fingerprint(far2)))


def test_a_folder_holding_two_saves_files_is_refused_in_one_line(saved, tmp_path):
    """config.json of one save beside the weights of another (same size: the recorded bytes match)."""
    from worldsim.checkpoint import save_checkpoint

    world, path = saved
    other = save_checkpoint(tmp_path / "other", world.autoencoder, _far_with_other_weights(world),
                            action_names=ACTIONS, step=5)
    shutil.copy(path / "config.json", other / "config.json")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(other, device="cpu")
    message = str(caught.value)
    assert message.startswith(f"checkpoint {other}: config.json and model.safetensors are from two different saves")
    assert "being rewritten" in message and "\n" not in message


def test_a_checkpoint_from_before_the_pairing_hash_loads_unchecked_and_at_once(saved, monkeypatch):
    """Older checkpoints (the shipped one) have no tensors_sha256 in either file: they load as before,
    with no wait; an old config.json beside new weights (a new save over an old run's folder, read
    between its renames) is the one pairing refused."""
    import types

    import worldsim.checkpoint as checkpoint_module

    world, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["weights"]["tensors_sha256"]
    tensors = load_file(str(path / "model.safetensors"))
    new_weights = (path / "model.safetensors").read_bytes()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "worldsim-checkpoint"})
    del config["weights"]["tensors_sha256"]
    config["weights"]["bytes"] = (path / "model.safetensors").stat().st_size
    (path / "config.json").write_text(json.dumps(config))

    def no_wait(seconds):
        raise AssertionError("an unhashed checkpoint must load without waiting")

    monkeypatch.setattr(checkpoint_module, "time", types.SimpleNamespace(monotonic=lambda: 0.0, sleep=no_wait),
                        raising=False)
    loaded = load_checkpoint(path, device="cpu")
    assert loaded.step == 123
    assert all(torch.equal(a, b) for a, b in zip(_fingerprint(loaded.far), _fingerprint(world.far)))
    monkeypatch.undo()
    (path / "model.safetensors").write_bytes(new_weights)
    config["weights"]["bytes"] = len(new_weights)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="from two different saves"):
        load_checkpoint(path, device="cpu")


def test_weights_rewritten_by_a_tool_that_drops_the_metadata_load_as_before(saved, monkeypatch):
    """A converter that keeps the tensors but not the safetensors header's metadata (load_file then
    save_file), with weights.bytes fixed as the size check asks: loaded as before the pairing hash, at
    once. (It waited a second and then called the folder 'being rewritten': a save replaces the weights
    before config.json, so a hashed config.json beside unhashed weights is never a save in progress.)"""
    import types

    import worldsim.checkpoint as checkpoint_module

    world, path = saved
    save_file(load_file(str(path / "model.safetensors")), str(path / "model.safetensors"))  # no metadata
    config = json.loads((path / "config.json").read_text())
    assert config["weights"]["tensors_sha256"]
    config["weights"]["bytes"] = (path / "model.safetensors").stat().st_size
    (path / "config.json").write_text(json.dumps(config))

    def no_wait(seconds):
        raise AssertionError("weights without the hash must load without waiting")

    monkeypatch.setattr(checkpoint_module, "time", types.SimpleNamespace(monotonic=lambda: 0.0, sleep=no_wait),
                        raising=False)
    loaded = load_checkpoint(path, device="cpu")
    assert loaded.step == 123
    assert all(torch.equal(a, b) for a, b in zip(_fingerprint(loaded.far), _fingerprint(world.far)))


@pytest.mark.parametrize("first, second", [("ck", "ck"), ("new", "new"), ("ck.v2", "ck")])
def test_a_save_never_removes_the_temp_files_of_another_save_in_progress(saved, tmp_path, monkeypatch, first, second):
    """A save swept every `.model.safetensors.*.tmp` in the folder and every `.NAME.*.tmp` beside it,
    unlocked: a second save (another process, WorldModel.save into the same folder) removed the first
    one's live temp file or folder, which then failed with 'No such file or directory' (and saving
    `ck` removed the temp folder of a save into `ck.v2`). Only the twins that no writer holds go."""
    import worldsim.checkpoint as checkpoint_module
    from worldsim.checkpoint import save_checkpoint

    world, _ = saved
    far2 = _far_with_other_weights(world)
    real_dump = checkpoint_module.json.dump
    seconds = []

    def second_save_mid_write(obj, f, *args, **kwargs):
        if not seconds:  # the first save's weights are written, its config.json is being written
            seconds.append(sorted(p.name for p in tmp_path.rglob(".*")))
            save_checkpoint(tmp_path / second, world.autoencoder, world.far, action_names=ACTIONS, step=2)
        return real_dump(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.json, "dump", second_save_mid_write)
    save_checkpoint(tmp_path / first, world.autoencoder, far2, action_names=ACTIONS, step=1)
    monkeypatch.undo()
    assert seconds and seconds[0], "the first save had no temp file while the second ran"
    ck = load_checkpoint(tmp_path / first, device="cpu")
    assert ck.step == 1 and all(torch.equal(a, b) for a, b in zip(_fingerprint(ck.far), _fingerprint(far2)))
    assert load_checkpoint(tmp_path / second, device="cpu").step == (1 if second == first else 2)
    assert not [p for p in tmp_path.rglob(".*")]  # no temp leftovers
