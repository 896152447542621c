"""MiniGrid (Chevalier-Boisvert et al. 2023): sparse-reward grid worlds with vector observations.

The `minigrid` package registers `MiniGrid-DoorKey-5x5-v0` and the others with Gymnasium when it
is imported; their observations are dicts (a 7x7x3 egocentric view, a direction, a mission
string). They reach the networks as one uint8 vector through MiniGrid's own `FlatObsWrapper`
(the view flattened, then the mission one-hot per character), the observation rl-baselines3-zoo's
published PPO results were trained on. Rewards are sparse: `1 - 0.9 * steps / max_steps` on
success, else 0.
"""

from __future__ import annotations

import gymnasium as gym

MINIGRID_EXTRA = "pip install 'impala-rl[minigrid]'"


def looks_like_minigrid(env_id: str) -> bool:
    return env_id.startswith(("MiniGrid-", "BabyAI-"))


def register() -> bool:
    """Registers MiniGrid's ids with Gymnasium (importing the package does); False if MiniGrid
    is not installed."""
    try:
        import minigrid  # noqa: F401  (registers its ids)
    except ImportError:
        return False
    return True


def is_minigrid(spec: gym.envs.registration.EnvSpec) -> bool:
    entry = spec.entry_point if isinstance(spec.entry_point, str) else ""
    return entry.startswith("minigrid.")


def flat_observations(env: gym.Env) -> gym.Env:
    from minigrid.wrappers import FlatObsWrapper

    return FlatObsWrapper(env)
