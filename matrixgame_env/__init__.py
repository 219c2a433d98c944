"""matrixgame-env: interactive video world models (Matrix-Game 2.0 style) as Gymnasium simulators.

env = gymnasium.make("MatrixGame/Doom-v0")                 # the bundled small model
env = gymnasium.make("MatrixGame/Universal-v0", model="path/or/hub-id", device="cuda")
"""

from __future__ import annotations

__version__ = "0.1.0"

ENV_IDS = {
    "MatrixGame/Doom-v0": "doom-small",
    "MatrixGame/Universal-v0": "universal",
    "MatrixGame/GTADrive-v0": "gta_drive",
    "MatrixGame/TempleRun-v0": "templerun",
}
REAL_DOOM_ID = "MatrixGame/DoomReal-v0"  # ViZDoom itself (needs the `data` extra), see data/doom_env.py


def _register() -> None:
    try:
        from gymnasium.envs.registration import register, registry
    except ImportError:  # the networks alone work without gymnasium
        return
    for env_id, model in ENV_IDS.items():
        if env_id not in registry:
            kwargs = {"model": model}
            if model in ("universal", "gta_drive", "templerun"):
                kwargs["mode"] = model
            register(id=env_id, entry_point="matrixgame_env.env:MatrixGameEnv", kwargs=kwargs)
    if REAL_DOOM_ID not in registry:  # the real game with the spaces of MatrixGame/Doom-v0
        register(REAL_DOOM_ID, entry_point="matrixgame_env.data.doom_env:RealDoomEnv", kwargs={"model": "doom-small"})


def make_vector(env_id: str, num_envs: int, *, distributed: bool = False, **kwargs):
    """A `MatrixGameVectorEnv` of `num_envs` worlds for a registered id (one forward per step); with
    `distributed=True` a `DistributedVectorEnv` that spreads them over the GPUs of a torchrun launch."""
    from .vector import MatrixGameVectorEnv

    if env_id not in ENV_IDS:
        raise ValueError(f"unknown env id {env_id!r}; registered: {sorted(ENV_IDS)}")
    kwargs.setdefault("model", ENV_IDS[env_id])
    if ENV_IDS[env_id] in ("universal", "gta_drive", "templerun"):
        kwargs.setdefault("mode", ENV_IDS[env_id])
    if distributed:
        from .distributed_vector import DistributedVectorEnv

        return DistributedVectorEnv(num_envs=num_envs, **kwargs)
    return MatrixGameVectorEnv(num_envs=num_envs, **kwargs)


def __getattr__(name: str):
    if name == "DistributedVectorEnv":  # imported on first use: it brings torch.distributed
        from .distributed_vector import DistributedVectorEnv

        return DistributedVectorEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_register()
