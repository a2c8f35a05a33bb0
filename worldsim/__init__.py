"""worldsim: a playable neural world model (FAR) of a first-person 3D maze."""
import envs  # noqa: F401  (registers the worldsim/* Gymnasium ids)

__version__ = "0.1.0"
