"""Reading actions back from latent video: a small inverse-dynamics model on VAE latents.

`LatentActionReader` looks at two consecutive latent frames and names the actions of the video frames
the second one covers: which keys were held (one logit per key) and where the view turned (yaw left,
none or right, as `eval.idm` judges it). Trained on real latents (`train_reader`), it gives the
distillation an action loss (`action_loss`, `train distill --action-weight`): a student whose clips
do not show the keys they were given is pulled towards showing them. The reader is frozen then; the
judge of `matrixgame-env eval` is a different model on decoded pixels, so a student that learned to
fool this reader without rendering the motion is still caught there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..eval.idm import yaw_direction
from ..weights import load_into, read_state_dict, save_safetensors
from .conditions import ClipBatch

YAW_DEAD_ZONE = 0.02  # |mean yaw| of a latent frame's video frames up to this reads as no turn (as `eval.idm`)
READER_FILE = "action_reader.safetensors"
COMPRESSION = 4  # video frames per latent frame (after the first), as the VAE packs them


class LatentActionReader(nn.Module):
    """Actions of each latent frame t >= 1 from frames t - 1 and t (and their difference): key logits
    [B, F-1, K] and yaw logits [B, F-1, 3] (left, none, right) for latents [B, C, F, h, w].

    With `frames_per_latent` P > 1 it names the keys of each of the P video frames a latent frame
    covers, [B, F-1, P, K]: where inside a latent frame a key went down or up, which the share of
    frames alone does not say (a student's latents are then pulled towards showing that too)."""

    def __init__(self, latent_channels: int = 16, keys: int = 4, width: int = 64, frames_per_latent: int = 1) -> None:
        super().__init__()
        if frames_per_latent not in (1, COMPRESSION):
            raise ValueError(
                f"frames_per_latent must be 1 (the share of a latent frame's video frames with each key held) "
                f"or {COMPRESSION} (each of its video frames), got {frames_per_latent}"
            )
        self.keys = keys
        self.frames_per_latent = frames_per_latent
        self.features = nn.Sequential(
            nn.Conv2d(3 * latent_channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, frames_per_latent * keys + 3)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if latents.dim() != 5 or latents.shape[2] < 2:
            raise ValueError(f"latents must be [B, C, F >= 2, h, w], got {tuple(latents.shape)}")
        batch, channels, frames, height, width = latents.shape
        before, after = latents[:, :, :-1], latents[:, :, 1:]
        pairs = torch.cat([before, after, after - before], dim=1)  # [B, 3C, F-1, h, w]: the change spelled out
        pairs = pairs.transpose(1, 2).reshape(batch * (frames - 1), 3 * channels, height, width)
        logits = self.head(self.features(pairs.to(self.head.weight.dtype))).view(batch, frames - 1, -1)
        key_logits, yaw_logits = logits[..., :-3], logits[..., -3:]
        if self.frames_per_latent > 1:
            key_logits = key_logits.unflatten(-1, (self.frames_per_latent, self.keys))
        return key_logits, yaw_logits


@dataclass
class ActionTargets:
    """What a reader should name for each latent frame t >= 1: the share of its video frames with each
    key held [B, F-1, K] (or, per video frame, whether it was held [B, F-1, P, K]) and the yaw direction
    of their mean turn [B, F-1] (0 left, 1 none, 2 right)."""

    keys: torch.Tensor
    yaw: torch.Tensor


def action_targets(
    keyboard: torch.Tensor, mouse: torch.Tensor, frames: int, compression: int = COMPRESSION, per_frame: bool = False
) -> ActionTargets:
    """Targets of latent frames 1..F-1 from video-rate actions keyboard [B, T, K] and mouse [B, T, 2]
    ([pitch, yaw]), T = 1 + compression * (F - 1): latent frame t covers video frames
    compression * (t - 1) + 1 .. compression * t. `per_frame`: the keys of each of those frames
    (for a reader of `frames_per_latent` = compression) instead of their shares."""
    expected = 1 + compression * (frames - 1)
    if keyboard.shape[1] != expected or mouse.shape[1] != expected:
        raise ValueError(
            f"{frames} latent frames cover {expected} video frames of actions, got keyboard "
            f"{tuple(keyboard.shape)} and mouse {tuple(mouse.shape)}"
        )
    keys = keyboard[:, 1:].float().unflatten(1, (frames - 1, compression))
    keys = keys if per_frame else keys.mean(dim=2)
    yaw = mouse[:, 1:, 1].float().unflatten(1, (frames - 1, compression)).mean(dim=2)
    return ActionTargets(keys, yaw_direction(yaw, YAW_DEAD_ZONE))


def action_loss(reader: LatentActionReader, latents: torch.Tensor, targets: ActionTargets) -> torch.Tensor:
    """Binary cross-entropy of the keys (against the share of frames each was held, or for a reader of
    each video frame against whether it was held in that frame) plus cross-entropy of the yaw
    direction, averaged over latent frames: what `reader` finds missing in `latents`."""
    key_logits, yaw_logits = reader(latents)
    if key_logits.shape != targets.keys.shape:
        raise ValueError(
            f"the reader names keys {tuple(key_logits.shape)} but the targets are {tuple(targets.keys.shape)}: "
            "a reader of each video frame's keys takes action_targets(..., per_frame=True)"
        )
    keys = F.binary_cross_entropy_with_logits(key_logits.float(), targets.keys)
    yaw = F.cross_entropy(yaw_logits.float().flatten(0, 1), targets.yaw.flatten())
    return keys + yaw


@torch.no_grad()
def reader_accuracy(reader: LatentActionReader, batches: list[ClipBatch], device: torch.device | str) -> dict:
    """Key accuracy (each key held in most of a latent frame's video frames or not; for a reader of each
    video frame's keys, held in each frame or not) and yaw-direction accuracy of `reader` on the latent
    frames of `batches`, with the share of each answer's commonest class (what always guessing it
    would score)."""
    per_frame = reader.frames_per_latent > 1
    key_dims = (-2, -1) if per_frame else (-1,)
    hits = {"keys": 0.0, "yaw": 0.0}
    common = {"keys": torch.zeros(2, dtype=torch.float64), "yaw": torch.zeros(3, dtype=torch.float64)}
    count = 0
    for batch in batches:
        batch = batch.to(device)
        targets = reader_targets(reader, batch)
        key_logits, yaw_logits = reader(batch.latents)
        held = targets.keys > 0.5
        hits["keys"] += float(((key_logits > 0) == held).double().mean(dim=key_dims).sum())
        hits["yaw"] += float((yaw_logits.argmax(dim=-1) == targets.yaw).double().sum())
        shares = [(~held).double().mean(dim=key_dims).sum(), held.double().mean(dim=key_dims).sum()]
        common["keys"] += torch.stack(shares).cpu()
        common["yaw"] += torch.bincount(targets.yaw.flatten().cpu(), minlength=3).double()
        count += targets.yaw.numel()
    if not count:
        raise ValueError("no latent frames to judge")
    return {
        "key_accuracy": hits["keys"] / count,
        "yaw_accuracy": hits["yaw"] / count,
        "key_commonest_share": float(common["keys"].max()) / count,
        "yaw_commonest_share": float(common["yaw"].max()) / count,
        "latent_frames": count,
    }


def reader_targets(reader: LatentActionReader, batch: ClipBatch) -> ActionTargets:
    """`action_targets` of `batch` in the form `reader` names them (shares, or each video frame's keys)."""
    return action_targets(batch.keyboard, batch.mouse, batch.num_frames, per_frame=reader.frames_per_latent > 1)


def train_reader(
    batches: Iterator[ClipBatch],
    latent_channels: int,
    keys: int,
    steps: int,
    device: torch.device | str,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    frames_per_latent: int = 1,
) -> LatentActionReader:
    """A reader trained for `steps` AdamW steps on real clips (one batch a step); returned frozen, in eval
    mode. Its initial weights come from `seed`; the caller's random state is left as it was.
    `frames_per_latent` 4 reads each video frame's keys (`LatentActionReader`)."""
    cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        reader = LatentActionReader(latent_channels, keys, frames_per_latent=frames_per_latent).to(device)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    for _ in tqdm(range(steps), desc="action reader", unit="step", disable=not progress):
        batch = next(batches).to(device)
        loss = action_loss(reader, batch.latents, reader_targets(reader, batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return reader.eval().requires_grad_(False)


def save_reader(reader: LatentActionReader, path: str | os.PathLike) -> Path:
    path = Path(path)
    save_safetensors(reader.state_dict(), path, metadata={"format": "matrixgame-env", "part": "action_reader"})
    return path


def load_reader(
    path: str | os.PathLike, latent_channels: int, keys: int, device: torch.device | str
) -> LatentActionReader:
    """A saved reader for latents of `latent_channels` channels and `keys` keys (strict key and shape
    checks; whether it names each video frame's keys is read from its head), frozen, in eval mode."""
    state = read_state_dict(path)
    outputs = state.get("head.weight", torch.empty(keys + 3, 0)).shape[0] - 3
    frames_per_latent = outputs // keys if keys and outputs > keys and outputs % keys == 0 else 1
    reader = LatentActionReader(latent_channels, keys, frames_per_latent=frames_per_latent)
    load_into(reader, state, what="action reader", source=path)
    return reader.to(device).eval().requires_grad_(False)
