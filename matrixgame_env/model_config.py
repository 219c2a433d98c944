"""The model config: one JSON file describing every part of a world model and how to drive it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODES = ("universal", "gta_drive", "templerun", "custom")


@dataclass
class ModelConfig:
    """What `models/<name>/config.json` holds.

    `dit` is the official DiT config.json content; `sampler` the few-step settings (the official
    inference YAML's keys); `vae` and `clip` the encoder sizes; `actions` the action layout
    (`keyboard`: key names in order, `mouse`: whether there is a mouse and its units).
    """

    name: str
    mode: str
    dit: dict[str, Any]
    sampler: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    clip: dict[str, Any] = field(default_factory=dict)
    video_size: tuple[int, int] = (352, 640)
    fps: float = 25.0
    actions: dict[str, Any] = field(default_factory=dict)
    hub_id: str | None = None
    dit_file: str | None = None
    start_images: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        self.video_size = (int(self.video_size[0]), int(self.video_size[1]))
        height, width = self.video_size
        if height % 16 or width % 16:
            raise ValueError(f"video_size {self.video_size} must be multiples of 16 (8x VAE, 2x2 patches)")

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.video_size[0] // 8, self.video_size[1] // 8

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no model config at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["video_size"] = list(self.video_size)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")
