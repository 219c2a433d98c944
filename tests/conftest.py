"""Shared test helpers: where the reference data lives and how fixture tensors are read."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("MATRIXGAME_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))
FIXTURE_DIR = Path(os.environ.get("MATRIXGAME_FIXTURES", REFERENCE_DIR / "fixtures"))
MANIFEST_DIR = REFERENCE_DIR / "manifests"
CONFIG_DIR = REFERENCE_DIR / "configs"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@dataclass
class Fixture:
    """One golden fixture: its JSON description and lazy access to its safetensors files."""

    name: str
    spec: dict[str, Any]
    folder: Path
    _files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def file(self, filename: str) -> dict[str, torch.Tensor]:
        if filename not in self._files:
            self._files[filename] = load_file(str(self.folder / filename))
        return self._files[filename]

    def tensor(self, filename: str, name: str) -> torch.Tensor:
        """A stored tensor as float32 (float8 inputs are exact in float32)."""
        value = self.file(filename)[name]
        return value.float() if value.is_floating_point() else value

    def weights(self) -> dict[str, torch.Tensor]:
        return {
            k: (v.float() if v.is_floating_point() else v) for k, v in self.file(self.spec["files"]["weights"]).items()
        }

    def io(self, name: str) -> torch.Tensor:
        """A tensor from the fixture's own io file."""
        return self.tensor(self.spec["files"]["io"], name)

    def input(self, key: str) -> torch.Tensor:
        """An input named in the JSON's `inputs` section (file + tensor), falling back to the io file."""
        entry = self.spec.get("inputs", {}).get(key)
        if isinstance(entry, dict) and "tensor" in entry:
            return self.tensor(entry.get("file", self.spec["files"]["io"]), entry["tensor"])
        return self.io(key)

    def has_input(self, key: str) -> bool:
        entry = self.spec.get("inputs", {}).get(key)
        if isinstance(entry, dict) and "tensor" in entry:
            return True
        return key in self.file(self.spec["files"]["io"])


def load_fixture(name: str) -> Fixture:
    path = FIXTURE_DIR / f"{name}.json"
    if not path.exists():
        pytest.fail(f"fixture {path} not found (set MATRIXGAME_FIXTURES to a folder of fixture sets)")
    return Fixture(name=name, spec=json.loads(path.read_text()), folder=FIXTURE_DIR)


def subsample_strides(description: str) -> list[int]:
    """Strides of a subsampling description such as 'flow_pred[..., ::4, ::4]' -> [4, 4]."""
    return [int(s) for s in re.findall(r"::(\d+)", description)]


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(1, max |e|): absolute error for O(1) values, relative for large ones."""
    actual = actual.double()
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item())
    return (actual - expected).abs().max().item() / scale
