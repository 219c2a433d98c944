"""An inverse-dynamics model (IDM): which keys were held and which way the view turned, from a few frames.

Trained on the real game's training episodes, it reads the action of frame t from frames t - 1, t,
t + 1 (the action of frame t leads from frame t to frame t + 1). Applied to generated video made
under recorded actions, its accuracy says whether the world model obeys the actions: the labels are
the commanded actions. Its accuracy on held-out real frames is the ceiling to compare with.

Outputs: 4 key logits (multi-hot, sigmoid) and 3 yaw-direction logits (left / none / right, with a
dead zone around zero). Stored as `idm.safetensors` (weights, read with safetensors only) and
`idm.json` (config and training record).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from ..data.storage import open_chunk
from ..weights import save_safetensors
from .real_data import FrameWindows, resize_frames, split_actions

IDM_FORMAT = "matrixgame-env/inverse-dynamics"
WEIGHTS_FILE = "idm.safetensors"
CONFIG_FILE = "idm.json"
YAW_CLASSES = ("left", "none", "right")


@dataclass
class IDMConfig:
    """The IDM's input and size: windows of `context` frames at `video_size`, labelled with the action
    of their frame `before` (default: frames t - 1, t, t + 1 for the action of t). `yaw_dead_zone` is
    in model mouse units per frame: |yaw| up to it counts as "none"."""

    video_size: tuple[int, int]
    context: int = 3
    before: int = 1
    width: int = 32
    keyboard: tuple[str, ...] = ("forward", "back", "left", "right")
    yaw_dead_zone: float = 0.02

    def __post_init__(self) -> None:
        self.video_size = (int(self.video_size[0]), int(self.video_size[1]))
        self.keyboard = tuple(self.keyboard)
        if self.context < 2 or not 0 <= self.before < self.context - 1:
            raise ValueError(
                f"an IDM reads context >= 2 frames, `before` of them ahead of the labelled frame and at least one "
                f"after it; got context={self.context}, before={self.before}"
            )
        if self.width < 1 or self.yaw_dead_zone < 0:
            raise ValueError(f"width must be positive and yaw_dead_zone >= 0, got {self.width}, {self.yaw_dead_zone}")


@dataclass
class Predictions:
    """Keys held (bool [N, K]) and yaw direction (long [N], indices of `YAW_CLASSES`)."""

    keys: torch.Tensor
    yaw: torch.Tensor


class InverseDynamicsModel(nn.Module):
    """A small conv net over a stack of frames and their differences -> key and yaw-direction logits."""

    def __init__(self, config: IDMConfig) -> None:
        super().__init__()
        self.config = config
        width, frames = config.width, config.context
        channels = 3 * frames + 3 * (frames - 1)  # the frames, then the differences of neighbours
        widths = (width, width, 2 * width, 2 * width, 4 * width)  # full size, then four halvings
        layers: list[nn.Module] = []
        for index, out in enumerate(widths):
            stride = 1 if index == 0 else 2
            conv = nn.Conv2d(channels, out, 3, stride=stride, padding=1)
            layers += [conv, nn.GroupNorm(_groups(out), out), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        # Pooled to a coarse grid, not to one vector: where things move (centre vs edges) tells
        # walking (zoom) from strafing and turning (sideways shift).
        self.pool = nn.AdaptiveAvgPool2d((3, 5))
        self.head = nn.Sequential(
            nn.Linear(4 * width * 15, 4 * width), nn.SiLU(), nn.Linear(4 * width, len(config.keyboard) + 3)
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 windows [B, L, H, W, 3] (any size: resized to the config's) -> key logits [B, K], yaw logits [B, 3]."""
        frames = resize_frames(frames.to(self.device), self.config.video_size)
        return self.read_pixels(frames.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0)

    def read_pixels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float windows [B, L, 3, H, W] in [-1, 1] at the config's size -> key logits [B, K], yaw logits
        [B, 3]; differentiable in `x` (a frozen IDM as a training loss)."""
        if x.dim() != 5 or tuple(x.shape[1:3]) != (self.config.context, 3):
            raise ValueError(f"windows must be [B, {self.config.context}, 3, H, W], got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.config.video_size:
            raise ValueError(f"windows must be {self.config.video_size} pixels, got {tuple(x.shape[-2:])}")
        x = torch.cat([x.flatten(1, 2), (x[:, 1:] - x[:, :-1]).flatten(1, 2)], dim=1)
        logits = self.head(self.pool(self.features(x)).flatten(1))
        keys = len(self.config.keyboard)
        return logits[:, :keys], logits[:, keys:]

    @torch.no_grad()
    def predict(self, frames: torch.Tensor, batch_size: int = 256) -> Predictions:
        """Predicted actions of the labelled frame of each window, uint8 [N, L, H, W, 3] -> `Predictions` (CPU)."""
        was_training = self.training
        self.eval()
        keys, yaw = [], []
        for first in range(0, len(frames), batch_size):
            key_logits, yaw_logits = self(frames[first : first + batch_size])
            keys.append((key_logits > 0).cpu())
            yaw.append(yaw_logits.argmax(-1).cpu())
        self.train(was_training)
        return Predictions(torch.cat(keys), torch.cat(yaw))


def yaw_direction(yaw: torch.Tensor, dead_zone: float) -> torch.Tensor:
    """Mouse yaw (model units, right positive) -> 0 left, 1 none (|yaw| <= dead_zone), 2 right."""
    direction = torch.ones_like(yaw, dtype=torch.long)
    direction[yaw < -dead_zone] = 0
    direction[yaw > dead_zone] = 2
    return direction


@dataclass
class Labels:
    """True actions of the labelled frames: keys bool [N, K], yaw direction long [N]."""

    keys: torch.Tensor
    yaw: torch.Tensor

    @classmethod
    def of_windows(cls, keyboard: torch.Tensor, mouse: torch.Tensor, config: IDMConfig) -> Labels:
        """From window actions keyboard [N, L, K] and mouse [N, L, 2] (frame `config.before` is labelled)."""
        at = config.before
        return cls(keyboard[:, at] > 0.5, yaw_direction(mouse[:, at, 1], config.yaw_dead_zone))


def clip_windows(
    frames: torch.Tensor, keyboard: torch.Tensor, mouse: torch.Tensor, context: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every window of `context` frames of K clips: frames [K, T, ...] -> [K (T - L + 1), L, ...], likewise actions."""
    count, length = frames.shape[:2]
    starts = torch.arange(length - context + 1)
    index = starts[:, None] + torch.arange(context)  # [W, L]
    return (
        frames[:, index].flatten(0, 1),
        keyboard[:, index].flatten(0, 1),
        mouse[:, index].flatten(0, 1),
    )


def accuracy(predictions: Predictions, labels: Labels, key_names: tuple[str, ...]) -> dict[str, Any]:
    """Per-key, mean-key and exact-match keyboard accuracy and yaw-direction accuracy, with chance levels
    (always answering the most frequent label of these frames). Keys other than forward are rarely
    held, so plain accuracy has a high chance level; the balanced accuracies (mean recall of the
    classes present, chance 0.5 for a key and 1/3 for the yaw direction) are not fooled by that."""
    keys_right = (predictions.keys == labels.keys).double()
    count = len(labels.yaw)
    combos, combo_counts = torch.unique(labels.keys.long(), dim=0, return_counts=True)
    key_share = labels.keys.double().mean(0)
    yaw_counts = torch.bincount(labels.yaw, minlength=3).double()
    balanced_keys = [_balanced(predictions.keys[:, k].long(), labels.keys[:, k].long()) for k in range(len(key_names))]
    return {
        "frames": count,
        "keyboard_per_key": {name: float(v) for name, v in zip(key_names, keys_right.mean(0))},
        "keyboard": float(keys_right.mean()),
        "keyboard_exact": float(keys_right.all(-1).double().mean()),
        "yaw_direction": float((predictions.yaw == labels.yaw).double().mean()),
        "keyboard_balanced": float(torch.stack(balanced_keys).mean()),
        "yaw_direction_balanced": float(_balanced(predictions.yaw, labels.yaw)),
        "chance": {
            "keyboard_per_key": {name: float(max(p, 1 - p)) for name, p in zip(key_names, key_share)},
            "keyboard": float(torch.maximum(key_share, 1 - key_share).mean()),
            "keyboard_exact": float(combo_counts.max()) / count if len(combos) else 0.0,
            "yaw_direction": float(yaw_counts.max() / count),
        },
        "yaw_share": {name: float(c / count) for name, c in zip(YAW_CLASSES, yaw_counts)},
        "yaw_confusion": yaw_confusion(predictions.yaw, labels.yaw),
        "keyboard_confusion": keyboard_confusion(predictions.keys, labels.keys, key_names),
    }


def keyboard_confusion(
    predicted: torch.Tensor, true: torch.Tensor, key_names: tuple[str, ...]
) -> dict[str, dict[str, dict[str, int]]]:
    """{key: {"held" | "released" (true): {"held" | "released" (read): frames}}}: which keys a judge
    misses and which it reads where none was pressed."""
    table = {}
    for k, name in enumerate(key_names):
        table[name] = {
            truth: {
                read: int(((true[:, k] == truth_value) & (predicted[:, k] == read_value)).sum())
                for read, read_value in (("held", True), ("released", False))
            }
            for truth, truth_value in (("held", True), ("released", False))
        }
    return table


def yaw_confusion(predicted: torch.Tensor, true: torch.Tensor) -> dict[str, dict[str, int]]:
    """{true direction: {predicted direction: frames}} over `YAW_CLASSES` (zeros included)."""
    counts = torch.bincount(true * len(YAW_CLASSES) + predicted, minlength=len(YAW_CLASSES) ** 2)
    table = counts.view(len(YAW_CLASSES), len(YAW_CLASSES)).tolist()
    return {t: {p: int(n) for p, n in zip(YAW_CLASSES, row)} for t, row in zip(YAW_CLASSES, table)}


def _balanced(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present in `true` of the share of their frames predicted right."""
    recalls = [(predicted[true == c] == c).double().mean() for c in torch.unique(true)]
    return torch.stack(recalls).mean()


def evaluate_windows(
    model: InverseDynamicsModel, frames: torch.Tensor, keyboard: torch.Tensor, mouse: torch.Tensor
) -> dict[str, Any]:
    """IDM accuracy on windows frames [N, L, H, W, 3] with their actions [N, L, K] / [N, L, 2]."""
    labels = Labels.of_windows(keyboard, mouse, model.config)
    return accuracy(model.predict(frames), labels, model.config.keyboard)


def evaluate_clips(
    model: InverseDynamicsModel, frames: torch.Tensor, keyboard: torch.Tensor, mouse: torch.Tensor
) -> dict[str, Any]:
    """IDM accuracy on every window of K clips: frames [K, T, H, W, 3], actions [K, T, K] / [K, T, 2]."""
    parts = [_predict_and_label(model, *clip_windows(f[None], k[None], m[None], model.config.context))
             for f, k, m in zip(frames, keyboard, mouse)]  # fmt: skip
    return accuracy(*_joined(parts), model.config.keyboard)


def accuracy_by_phase(
    model: InverseDynamicsModel, frames: torch.Tensor, keyboard: torch.Tensor, mouse: torch.Tensor, period: int = 4
) -> dict[str, list[float]]:
    """Mean-key and yaw-direction accuracy over every window of K clips (as `evaluate_clips`), split by the
    labelled frame's index modulo `period`: with period 4, where the labelled change falls among a VAE's
    4-frame latent groups (phase 0: from the last frame of one group to the first of the next)."""
    return judge_clips(model, frames, keyboard, mouse, period)[1]


def yaw_size_bands(dead_zone: float) -> list[tuple[float, float]]:
    """|yaw| bands (model units) of `judge_clips`' split: still or nearly (up to half the dead zone), near
    the dead zone's edge (up to 2.5 times it), and clear turns. Near the edge a direction is ambiguous
    even on real frames, so the judge's own accuracy there bounds what any video can score."""
    return [(0.0, 0.5 * dead_zone), (0.5 * dead_zone, 2.5 * dead_zone), (2.5 * dead_zone, math.inf)]


def judge_clips(
    model: InverseDynamicsModel, frames: torch.Tensor, keyboard: torch.Tensor, mouse: torch.Tensor, period: int = 4
) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, list]]:
    """`evaluate_clips` and `accuracy_by_phase` of the same clips from one pass of the model, and the
    yaw-direction accuracy split by the size of the labelled yaw (`yaw_size_bands`: "bands", then
    "yaw_direction" and "windows" per band; None for an empty band). The accuracy also holds each clip's
    own mean-key and yaw-direction accuracy ("per_clip"), which `compare` pairs clip by clip."""
    context = model.config.context
    if frames.shape[1] < context + period - 1:
        raise ValueError(f"clips of {frames.shape[1]} frames give fewer than {period} windows of {context} frames")
    windows, keys, yaws = clip_windows(frames, keyboard, mouse, context)
    predictions, labels = model.predict(windows), Labels.of_windows(keys, yaws, model.config)
    labelled = torch.arange(frames.shape[1] - context + 1) + model.config.before
    phase = (labelled % period).repeat(frames.shape[0])
    keys_right = (predictions.keys == labels.keys).double().mean(1)
    yaw_right = (predictions.yaw == labels.yaw).double()
    by_phase = {
        "keyboard": [float(keys_right[phase == p].mean()) for p in range(period)],
        "yaw_direction": [float(yaw_right[phase == p].mean()) for p in range(period)],
    }
    size = yaws[:, model.config.before, 1].abs()
    bands = yaw_size_bands(model.config.yaw_dead_zone)
    chosen = [((size > low) | (low == 0)) & (size <= high) for low, high in bands]
    by_size = {
        "bands": [[low, None if math.isinf(high) else high] for low, high in bands],
        "yaw_direction": [float(yaw_right[c].mean()) if c.any() else None for c in chosen],
        "windows": [int(c.sum()) for c in chosen],
    }
    clips = frames.shape[0]
    judged = accuracy(predictions, labels, model.config.keyboard)
    judged["per_clip"] = {
        "keyboard": [round(v, 4) for v in keys_right.view(clips, -1).mean(1).tolist()],
        "yaw_direction": [round(v, 4) for v in yaw_right.view(clips, -1).mean(1).tolist()],
    }
    return judged, by_phase, by_size


def share_above_chance(judged: dict[str, Any], reference: dict[str, Any], least: float = 0.01) -> dict[str, Any]:
    """How much of what `reference` reads above chance `judged` reads too, per measure ("keyboard",
    "yaw_direction"): (judged - chance) / (reference - chance), both `judge_clips` results of the same
    windows. With the VAE round trip of the real clips as reference, near 1 (or above) says the DiT
    renders what its VAE lets through, so the VAE is the limit; well below 1, the DiT is. None where the
    reference reads less than `least` above chance."""
    shares = {}
    for measure in ("keyboard", "yaw_direction"):
        chance = reference["chance"][measure]
        margin = reference[measure] - chance
        shares[measure] = (judged[measure] - chance) / margin if margin >= least else None
    return shares


def evaluate_split(model: InverseDynamicsModel, windows: FrameWindows, max_windows: int = 4096) -> dict[str, Any]:
    """IDM accuracy on up to `max_windows` windows spread evenly over a split of the recording."""
    chosen = windows.evenly_spaced(max_windows)
    parts = []
    for first in range(0, len(chosen), 256):
        items = windows.stack(chosen[first : first + 256])
        parts.append(_predict_and_label(model, items["frames"], items["keyboard"], items["mouse"]))
    return accuracy(*_joined(parts), model.config.keyboard)


def _predict_and_label(
    model: InverseDynamicsModel, frames: torch.Tensor, keyboard: torch.Tensor, mouse: torch.Tensor
) -> tuple[Predictions, Labels]:
    return model.predict(frames), Labels.of_windows(keyboard, mouse, model.config)


def _joined(parts: list[tuple[Predictions, Labels]]) -> tuple[Predictions, Labels]:
    predictions = Predictions(torch.cat([p.keys for p, _ in parts]), torch.cat([p.yaw for p, _ in parts]))
    labels = Labels(torch.cat([q.keys for _, q in parts]), torch.cat([q.yaw for _, q in parts]))
    return predictions, labels


@dataclass
class TrainSettings:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    workers: int = 0
    mirror: bool = True  # half the windows mirrored left-right, with left/right keys and yaw swapped
    # "device": the split's frames are read once into the training device's memory and windows are cut
    # there (fast on GPUs, where loading windows from disk would keep the GPU waiting); "loader": windows
    # come from the recording through a DataLoader; "auto": "device" on CUDA devices where the frames take
    # at most half the free memory, else "loader"
    windows_on: str = "auto"


def train_idm(
    windows: FrameWindows,
    config: IDMConfig,
    settings: TrainSettings,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[InverseDynamicsModel, list[dict[str, float]]]:
    """Train an IDM on random windows of `windows` (a training split) with AdamW and cosine decay.

    Returns the model (in eval mode) and the loss history: binary cross-entropy of the keys plus
    cross-entropy of the yaw direction, averaged over every 50 steps. With `settings.mirror`, a random
    half of every batch is mirrored (`mirror_windows`): a mirrored game is still a valid game, so
    this doubles the data the IDM generalises from.
    """
    from ..train.common import adamw, warmup_cosine

    if windows.length != config.context:
        raise ValueError(f"training windows hold {windows.length} frames, the IDM reads {config.context}")
    if settings.steps < 1:
        raise ValueError(f"IDM training needs at least 1 step, got {settings.steps}")
    if settings.windows_on not in ("auto", "device", "loader"):
        raise ValueError(f"windows_on must be 'auto', 'device' or 'loader', got {settings.windows_on!r}")
    torch.manual_seed(settings.seed)
    model = InverseDynamicsModel(config).to(device).train()
    optimizer = adamw(model.parameters(), settings.lr, settings.weight_decay)
    schedule = warmup_cosine(optimizer, min(100, settings.steps // 10), settings.steps)
    on_cuda = torch.device(device).type == "cuda"
    on_device = settings.windows_on == "device" or (
        settings.windows_on == "auto" and on_cuda and _fits_in_device_memory(windows, device)
    )
    batches = batches_in_device_memory(windows, settings, device) if on_device else _random_batches(windows, settings)
    running, history = 0.0, []
    with tqdm(total=settings.steps, desc="train IDM", unit="step", disable=not progress) as bar:
        for step in range(settings.steps):
            batch = next(batches)
            frames = batch["frames"]
            labels = Labels.of_windows(batch["keyboard"], batch["mouse"], config)
            if settings.mirror:
                chosen = (torch.rand(len(frames)) < 0.5).to(frames.device)
                frames, labels = mirror_windows(frames, labels, config, chosen)
            key_logits, yaw_logits = model(frames)
            loss = F.binary_cross_entropy_with_logits(key_logits, labels.keys.float().to(device)) + F.cross_entropy(
                yaw_logits, labels.yaw.to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
            if (step + 1) % 50 == 0 or step + 1 == settings.steps:
                logged = (step % 50) + 1
                history.append({"step": step + 1, "loss": running / logged})
                bar.set_postfix(loss=f"{running / logged:.3f}")
                running = 0.0
            bar.update()
    return model.eval(), history


def mirror_windows(
    frames: torch.Tensor, labels: Labels, config: IDMConfig, chosen: torch.Tensor
) -> tuple[torch.Tensor, Labels]:
    """Mirror the `chosen` windows left-right (frames [N, L, H, W, 3]): strafing left becomes strafing
    right and turning left turning right, so those labels swap; the others stay."""
    frames = torch.where(chosen[:, None, None, None, None], frames.flip(-2), frames)
    keys, yaw = labels.keys.clone(), labels.yaw.clone()
    if "left" in config.keyboard and "right" in config.keyboard:
        left, right = config.keyboard.index("left"), config.keyboard.index("right")
        keys[chosen, left], keys[chosen, right] = labels.keys[chosen, right], labels.keys[chosen, left]
    yaw[chosen] = 2 - labels.yaw[chosen]  # left (0) <-> right (2), none (1) stays
    return frames, Labels(keys, yaw)


def batches_in_device_memory(
    windows: FrameWindows, settings: TrainSettings, device: torch.device | str
) -> Iterator[dict[str, torch.Tensor]]:
    """Random windows (with replacement) cut from the split's frames held in `device` memory."""
    height, width = windows.frame_size
    offsets = np.concatenate([[0], np.cumsum([chunk.frames for chunk in windows.chunks])])
    frames = torch.empty((int(offsets[-1]), height, width, 3), dtype=torch.uint8, device=device)
    for chunk, offset in zip(windows.chunks, offsets):
        chunk_frames = open_chunk(windows.root / chunk.file)["frames"]
        frames[offset : offset + chunk.frames] = torch.from_numpy(np.array(chunk_frames)).to(device)
    actions = split_actions(windows)  # in the same order as the frames
    keyboard, mouse = torch.from_numpy(actions.keyboard).to(device), torch.from_numpy(actions.mouse).to(device)
    positions = torch.from_numpy(windows.windows)
    starts = (torch.from_numpy(offsets)[positions[:, 0]] + positions[:, 1]).to(device)
    steps = torch.arange(windows.length, device=device)
    generator = torch.Generator().manual_seed(settings.seed)
    while True:
        chosen = torch.randint(len(starts), (settings.batch_size,), generator=generator).to(device)
        index = starts[chosen][:, None] + steps
        yield {"frames": frames[index], "keyboard": keyboard[index], "mouse": mouse[index]}


def _fits_in_device_memory(windows: FrameWindows, device: torch.device | str) -> bool:
    """Whether the split's frames take at most half the CUDA device's free memory."""
    height, width = windows.frame_size
    needed = sum(chunk.frames for chunk in windows.chunks) * height * width * 3
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return needed <= free // 2


def _random_batches(windows: FrameWindows, settings: TrainSettings) -> Iterator[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(settings.seed)
    sampler = RandomSampler(windows, replacement=True, num_samples=settings.steps * settings.batch_size,
                            generator=generator)  # fmt: skip
    loader = DataLoader(windows, batch_size=settings.batch_size, sampler=sampler, num_workers=settings.workers,
                        persistent_workers=False)  # fmt: skip
    return iter(loader)


def save_idm(model: InverseDynamicsModel, folder: str | os.PathLike, record: dict[str, Any] | None = None) -> Path:
    """Write `idm.safetensors` and `idm.json` (config and `record`, e.g. training settings and accuracy) to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), folder / WEIGHTS_FILE, metadata={"format": IDM_FORMAT})
    config = asdict(model.config)
    config["video_size"], config["keyboard"] = list(config["video_size"]), list(config["keyboard"])
    text = json.dumps({"format": IDM_FORMAT, "config": config, **(record or {})}, indent=1) + "\n"
    (folder / CONFIG_FILE).write_text(text)
    return folder


def load_idm(path: str | os.PathLike, device: torch.device | str = "cpu") -> InverseDynamicsModel:
    """An IDM saved by `save_idm`: its folder, or the path of its idm.json or idm.safetensors."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no inverse-dynamics model at {path}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    saved = json.loads(config_path.read_text())
    if saved.get("format") != IDM_FORMAT:
        raise ValueError(f"{config_path} is not an inverse-dynamics model (format {saved.get('format')!r})")
    model = InverseDynamicsModel(IDMConfig(**saved["config"]))
    model.load_state_dict(load_file(weights_path), strict=True)
    return model.to(device).eval()


def idm_weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a saved IDM's weights file (its folder, or a file in it): which judge this is."""
    path = Path(path)
    weights = (path if path.is_dir() else path.parent) / WEIGHTS_FILE
    digest = hashlib.sha256()
    with open(weights, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 where they divide the channels, else the largest divisor below 8."""
    return max(g for g in range(1, 9) if channels % g == 0)
