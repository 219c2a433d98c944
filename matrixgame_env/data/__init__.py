"""Game recordings for training world models: the ViZDoom recorder, its exploration policy, a writer
for any other game's frames and actions, the chunked on-disk format and a clip dataset for training.

Names are imported on first use: recording worker processes import this package, and should not pay
for importing torch (the dataset's dependency), nor should dataset readers need vizdoom.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "VideoClipDataset": "dataset",
    "validation_episodes": "dataset",
    "Walls": "doom_map",
    "load_walls": "doom_map",
    "ExplorationPolicy": "policy",
    "PolicyAction": "policy",
    "PolicyConfig": "policy",
    "add_record_arguments": "recording",
    "episode_map": "recording",
    "episode_seed": "recording",
    "record": "recording",
    "run_record": "recording",
    "ChunkInfo": "storage",
    "Manifest": "storage",
    "open_chunk": "storage",
    "read_manifest": "storage",
    "VARIABLE_NAMES": "vizdoom_recorder",
    "DatasetWriter": "writer",
    "DoomRecorder": "vizdoom_recorder",
    "RecorderConfig": "vizdoom_recorder",
    "Trajectory": "vizdoom_recorder",
}
__all__ = [
    "ChunkInfo",
    "DatasetWriter",
    "DoomRecorder",
    "ExplorationPolicy",
    "Manifest",
    "PolicyAction",
    "PolicyConfig",
    "RecorderConfig",
    "Trajectory",
    "VARIABLE_NAMES",
    "VideoClipDataset",
    "Walls",
    "add_record_arguments",
    "episode_map",
    "episode_seed",
    "load_walls",
    "open_chunk",
    "read_manifest",
    "record",
    "run_record",
    "validation_episodes",
]

if TYPE_CHECKING:
    from .dataset import VideoClipDataset, validation_episodes
    from .doom_map import Walls, load_walls
    from .policy import ExplorationPolicy, PolicyAction, PolicyConfig
    from .recording import add_record_arguments, episode_map, episode_seed, record, run_record
    from .storage import ChunkInfo, Manifest, open_chunk, read_manifest
    from .vizdoom_recorder import VARIABLE_NAMES, DoomRecorder, RecorderConfig, Trajectory


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
