"""worldsim: a playable neural world model (FAR) of a first-person 3D maze."""
from pathlib import Path as _Path

import envs  # noqa: F401  (registers the worldsim/* Gymnasium ids)

# `envs` is a common name: a user's own envs/ folder (RL projects have one) earlier on sys.path
# shadows ours, and gym.make then said "Namespace worldsim not found", far from the cause
_ours = _Path(__file__).resolve().parent.parent / "envs"  # folders: a sourceless install has __init__.pyc
if getattr(envs, "__file__", None) is None or _Path(envs.__file__).resolve().parent != _ours:
    raise ImportError(f"worldsim: the module 'envs' was imported from "
                      f"{getattr(envs, '__file__', None) or list(getattr(envs, '__path__', []))}, not from worldsim's "
                      f"simulators package ({_ours}): a folder or package named envs earlier on sys.path "
                      "(the script's own folder comes first) shadows it; rename it, or run from another folder")

__version__ = "0.1.0"
