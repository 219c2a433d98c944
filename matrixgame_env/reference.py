"""Reading golden fixture sets recorded from the official Matrix-Game-2 code, and replaying them.

A fixture set is a folder of `<name>.json` descriptions plus safetensors files; float8 tensors are
exact inputs (used as float32), float32 tensors are used as is. Every tensor is read through the
JSON's `inputs`/`outputs` entries, so fixture sets that share input files also work.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def default_fixture_dir() -> Path:
    """`MATRIXGAME_FIXTURES`, else `MATRIXGAME_REFERENCE`/fixtures, else ../shared/reference/fixtures."""
    if "MATRIXGAME_FIXTURES" in os.environ:
        return Path(os.environ["MATRIXGAME_FIXTURES"])
    reference = os.environ.get("MATRIXGAME_REFERENCE")
    if reference:
        return Path(reference) / "fixtures"
    return Path(__file__).resolve().parents[2] / "shared" / "reference" / "fixtures"


@dataclass
class Fixture:
    """One golden fixture: its JSON description and lazy access to its tensors."""

    name: str
    spec: dict[str, Any]
    folder: Path
    _files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def file(self, filename: str) -> dict[str, torch.Tensor]:
        if filename not in self._files:
            self._files[filename] = load_file(str(self.folder / filename))
        return self._files[filename]

    def tensor(self, filename: str, name: str) -> torch.Tensor:
        """A stored tensor as float32 when floating (float8 inputs are exact in float32)."""
        value = self.file(filename)[name]
        return value.float() if value.is_floating_point() else value

    def weights(self) -> dict[str, torch.Tensor]:
        stored = self.file(self.spec["files"]["weights"])
        return {k: (v.float() if v.is_floating_point() else v) for k, v in stored.items()}

    def io(self, name: str) -> torch.Tensor:
        """A tensor from the fixture's own io file."""
        return self.tensor(self.spec["files"]["io"], name)

    def input(self, key: str) -> torch.Tensor:
        """An input named in the JSON's `inputs` section (file + tensor), else from the io file."""
        entry = self.spec.get("inputs", {}).get(key)
        if isinstance(entry, dict) and "tensor" in entry:
            return self.tensor(entry.get("file", self.spec["files"]["io"]), entry["tensor"])
        return self.io(key)

    def has_input(self, key: str) -> bool:
        entry = self.spec.get("inputs", {}).get(key)
        if isinstance(entry, dict) and "tensor" in entry:
            return True
        return key in self.file(self.spec["files"]["io"])


def load_fixture(name: str, folder: str | Path | None = None) -> Fixture:
    folder = Path(folder) if folder is not None else default_fixture_dir()
    path = folder / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"fixture {path} not found (set MATRIXGAME_FIXTURES to a folder of fixture sets)")
    return Fixture(name=name, spec=json.loads(path.read_text()), folder=folder)


def subsample_strides(description: str) -> list[int]:
    """Strides of a subsampling description such as 'flow_pred[..., ::4, ::4]' -> [4, 4]."""
    return [int(s) for s in re.findall(r"::(\d+)", description)]


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(1, max |e|): absolute error for O(1) values, relative for large ones."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    scale = max(1.0, expected.abs().max().item())
    return (actual - expected).abs().max().item() / scale


def norm_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e||."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


@dataclass
class DiTReplay:
    """What a replay of the `dit_universal`-style fixture produced."""

    flows: list[torch.Tensor]  # every DiT call's flow prediction, in order (float32, CPU)
    latents: torch.Tensor  # all generated latent frames [B, 16, F, h, w]
    sampler: Any


def replay_dit_fixture(
    fixture: Fixture, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DiTReplay:
    """Run the official streaming schedule of a DiT fixture through our model and sampler."""
    from .nn import CausalDiT
    from .world.sampler import SamplerConfig, StreamingSampler

    spec = fixture.spec
    model = CausalDiT.from_config(spec["model_config"]).eval()
    model.load_state_dict(fixture.weights(), strict=True)
    model.to(device=device, dtype=dtype)
    pipeline = spec["pipeline_config"]
    noise = fixture.input("noise")
    sampler = StreamingSampler(model, SamplerConfig.from_dict(pipeline), latent_size=tuple(noise.shape[-2:]))
    cond = fixture.input("cond_concat")
    mask_channels = cond.shape[1] - noise.shape[1]
    keyboard = fixture.input("keyboard_cond") if fixture.has_input("keyboard_cond") else None
    mouse = fixture.input("mouse_cond") if fixture.has_input("mouse_cond") else None
    renoise = fixture.input("renoise")
    batch, channels = noise.shape[:2]
    frames_per_block = pipeline["num_frame_per_block"]

    flows: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda module, args, out: flows.append(out.float().cpu()))
    try:
        state = sampler.start(cond[:, mask_channels:], fixture.input("visual_context").to(device), seed=0)
        outputs, draw = [], 0
        for block in range(pipeline["num_blocks"]):
            s = block * frames_per_block
            lo, hi = (0 if s == 0 else 1 + 4 * (s - 1)), 1 + 4 * (s + frames_per_block - 1)
            rows = []
            for _ in range(len(sampler.timesteps) - 1):  # one draw per non-final step, rows [(b f), c, h, w]
                row = renoise[draw].reshape(batch, frames_per_block, channels, *noise.shape[-2:]).transpose(1, 2)
                rows.append(row.to(device))
                draw += 1
            outputs.append(
                sampler.step(
                    state,
                    None if keyboard is None else keyboard[:, lo:hi],
                    None if mouse is None else mouse[:, lo:hi],
                    noise=noise[:, :, s : s + frames_per_block].to(device),
                    renoise=rows,
                ).cpu()
            )
    finally:
        handle.remove()
    return DiTReplay(flows=flows, latents=torch.cat(outputs, dim=2), sampler=sampler)
