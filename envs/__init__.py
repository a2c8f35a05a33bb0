"""Ground-truth simulators and the recorder.

Importing this package registers the Gymnasium ids:
  worldsim/Maze-v0        the embedded raycast maze (runs anywhere)
  worldsim/DMLab-v0       real DeepMind Lab (needs the `deepmind_lab` module)
  worldsim/MemoryMaze-v0  Memory Maze (MuJoCo, `pip install worldsim[memory-maze]`)
  worldsim/Dream-v0       the world model itself, over a checkpoint
"""
import os

from gymnasium.envs.registration import register, registry


def _register(env_id: str, entry_point: str) -> None:
    # Without gymnasium's passive env checker (gym.make(..., disable_env_checker=False) still adds it):
    # it breaks for good when its env's first reset raises (gymnasium 1.4: the first step after then
    # fails on "cannot unpack non-iterable NoneType object"), so one refused reset option, a maze_seed
    # of -1, killed a gym.make'd env. tests/ run gymnasium's full check_env on each env instead.
    if env_id not in registry:
        register(id=env_id, entry_point=entry_point, disable_env_checker=True)


_register("worldsim/Maze-v0", "envs.maze:MazeEnv")
_register("worldsim/DMLab-v0", "envs.dmlab:DMLabEnv")
_register("worldsim/MemoryMaze-v0", "envs.memory_maze:MemoryMazeEnv")
_register("worldsim/Dream-v0", "worldsim.dream_env:DreamEnv")

# The simulators a checkpoint's config.json or a dataset's index.json may name as its `simulator.id`
# (not Dream-v0: a dream is not a ground truth). Files are made by others: `gym.make` imports the
# module of a "module:Env-v0" id, and an id registered by any installed package runs that
# package's code, so an id read from a file is started only when it is one of these or the user
# lists it in TRUSTED_SIMULATORS_VAR (comma-separated, exact ids).
PROJECT_SIMULATORS = ("worldsim/Maze-v0", "worldsim/DMLab-v0", "worldsim/MemoryMaze-v0")
TRUSTED_SIMULATORS_VAR = "WORLDSIM_TRUSTED_SIMULATORS"


class UntrustedSimulator(ValueError):
    """A simulator id read from a file that worldsim will not start without the user's say-so."""


def check_simulator_from_file(env_id: object, source: str) -> None:
    """UntrustedSimulator unless `env_id` (the `simulator.id` of `source`, a checkpoint or dataset
    file) is one of PROJECT_SIMULATORS or listed in $WORLDSIM_TRUSTED_SIMULATORS."""
    trusted = {s.strip() for s in os.environ.get(TRUSTED_SIMULATORS_VAR, "").split(",") if s.strip()}
    if isinstance(env_id, str) and (env_id in PROJECT_SIMULATORS or env_id in trusted):
        return
    module = (f"; it would import the Python module {env_id.split(':', 1)[0]!r}"
              if isinstance(env_id, str) and ":" in env_id else "")
    raise UntrustedSimulator(
        f"{source} names the simulator {env_id!r}, which is not one of worldsim's ({', '.join(PROJECT_SIMULATORS)})"
        f"{module}; starting it runs code the file chose. If you trust the file, allow it with "
        f"{TRUSTED_SIMULATORS_VAR}={env_id!r}")


def make_untimed(env_id: str, settings: dict | None = None) -> "gym.Env":
    """`gym.make(env_id, **settings)` without the simulator's own step limit (`max_steps`, whose
    truncation needs a reset): a player, the dream's reality view and eval's probes walk as long
    as they need. Also when the settings leave it out, where the simulator's default (Maze-v0:
    1000) would apply; a level's own time limit (DMLab, Memory Maze) stays."""
    import gymnasium as gym

    settings = dict(settings or {})
    if "max_steps" in settings:
        settings["max_steps"] = None
    # Without gymnasium's passive checker: our code drives it, and the checker breaks for good when its
    # first reset raises (gymnasium 1.4: every later first step fails on "cannot unpack non-iterable
    # NoneType object"), so one refused maze_seed killed a Dream-v0 env and its later resets.
    env = gym.make(env_id, disable_env_checker=True, **settings)
    from envs._base import SimulatorEnv

    # only ours: they read it at every step, and None means no limit (another env's may need a number)
    if isinstance(env.unwrapped, SimulatorEnv) and env.unwrapped.max_steps is not None:
        env.unwrapped.max_steps = None
    return env
