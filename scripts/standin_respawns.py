"""How many 300-frame episodes a goal respawn cuts short, recorded against the DeepMind Lab
stand-in (tests/dmlab_standin.py, which respawns as upstream's goal levels do): the numbers in
docs/dmlab.md. Not a measurement of the real DeepMind Lab.

    python scripts/standin_respawns.py
"""
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import dmlab_standin  # noqa: E402

sys.modules["deepmind_lab"] = dmlab_standin  # in this process: workers=1 records here
from envs.recorder import RecordConfig, record  # noqa: E402

for policy in ("navigator", "random"):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "d"
        record(RecordConfig(out=str(out), env="worldsim/DMLab-v0", env_arg=("resolution=16",), episodes=12,
                            length=300, policy=policy, workers=1, progress=False, start_maze_seed=100))
        lengths = [e["length"] for e in json.loads((out / "index.json").read_text())["episodes"]]
    print(f"{policy}: {sum(n < 300 for n in lengths)} of {len(lengths)} episodes cut by a respawn, "
          f"at frames {sorted(n for n in lengths if n < 300)}")
