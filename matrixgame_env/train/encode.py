"""Stage `encode`: turn a recorded dataset into the DiT's training clips as VAE latents, once.

    matrixgame-env train encode --data data/doom --init runs/doom/vae/model --out runs/doom [--resume]

Each clip is T = 1 + 4 (F - 1) consecutive video frames (F latent frames, default 12: 45 frames)
encoded on its own, as inference encodes from a start picture: its latent 0 is the picture's. Clips
start every `--stride` frames (default T - 1: consecutive clips share one frame, so their latents
tile the chunk) and never span a game restart.

Layout of OUT/encode/:
    index.json                 settings (frames, sizes, variable names, the VAE's latent statistics, ...)
                               and per split the clip count and shard files; "complete" once all exist
    train/shard_00000.safetensors, train/shard_00001.safetensors, ...   (`--shard-clips` clips each)
    val/shard_00000.safetensors, ...
A shard of N clips holds:
    latents        float16 [N, z_dim, F, h, w]  normalised latents, `vae.encode(clip)`
    image_latents  float16 [N, z_dim, F, h, w]  normalised latents of frame 0 then zero frames (the image
                                                condition, `vae.encode_image_condition(frame 0, F)`)
    first_frame    uint8   [N, H, W, 3]         video frame 0 of the clip (the start picture)
    keyboard       float32 [N, T, K]            key states per video frame (index.json "keyboard" names)
    mouse          float32 [N, T, 2]            [pitch, yaw] per video frame, model units
    variables      float32 [N, T, V]            game variables per video frame (index.json "variables")
A prefix of a clip is itself a valid clip (the encoder is causal): latents[:, :f] with the first
1 + 4 (f - 1) frames of actions. `LatentClipDataset` reads the shards back.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import distributed
from ..checkpoints import LoadedModel, load_model
from ..data.dataset import SPLITS, VideoClipDataset
from ..nn.vae import WanVAE
from ..weights import save_safetensors
from .common import StageError, add_session_arguments, existing_dir, progress_interval

STAGE = "encode"
LATENT_FORMAT = "matrixgame-env/latent-clips"
LATENT_FORMAT_VERSION = 1
INDEX_FILE = "index.json"
_MOVABLE = ("complete", "data", "model")  # index entries that may differ when a run is resumed
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `matrixgame-env train encode` (`--init` is the model whose VAE encodes)."""
    add_session_arguments(parser, batch_size=16, init_help="model folder whose VAE encodes (OUT/vae/model)")
    parser.add_argument("--latent-frames", type=int, default=12, help="latent frames per clip, F (video: 1 + 4(F-1))")
    parser.add_argument("--stride", type=int, default=None, help="video frames between clip starts (default: T - 1)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of episodes held out (dataset split)")
    parser.add_argument("--shard-clips", type=int, default=256, help="clips per shard file")
    parser.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float16", help="storage dtype of latents")


class LatentClipDataset(Dataset):
    """Encoded clips of one split (see the module docstring), all held in memory.

    Item: `latents` and `image_latents` float32 [z_dim, F, h, w], `first_frame` uint8 [H, W, 3],
    `keyboard` [T, K], `mouse` [T, 2], `variables` [T, V] float32. `num_frames` takes the first f
    latent frames of every clip (and the first 1 + 4 (f - 1) frames of actions and variables).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", num_frames: int | None = None) -> None:
        self.root = Path(root)
        self.index = read_latent_index(self.root)
        if split not in self.index["splits"]:
            raise ValueError(f"{self.root} has no {split!r} clips; splits: {sorted(self.index['splits'])}")
        stored = self.index["latent_frames"]
        self.num_frames = stored if num_frames is None else num_frames
        if not 1 <= self.num_frames <= stored:
            raise ValueError(f"num_frames must be in 1..{stored} (the stored clip length), got {num_frames}")
        self.video_frames = 1 + 4 * (self.num_frames - 1)
        shards = [load_file(self.root / split / name) for name in self.index["splits"][split]["shards"]]
        if not shards:
            raise ValueError(f"the {split!r} split of {self.root} holds no clips")
        self.tensors = {key: torch.cat([shard[key] for shard in shards]) for key in shards[0]}

    @property
    def variable_names(self) -> list[str]:
        return list(self.index["variables"])

    def __len__(self) -> int:
        return len(self.tensors["first_frame"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {}
        for key, values in self.tensors.items():
            value = values[index]
            if key in ("latents", "image_latents"):
                value = value[:, : self.num_frames].float()
            elif key != "first_frame":
                value = value[: self.video_frames]
            item[key] = value
        return item


def read_latent_index(root: str | os.PathLike) -> dict[str, Any]:
    """The index.json of a complete `train encode` output folder."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {INDEX_FILE} in {root}: encode a dataset first (matrixgame-env train encode)")
    index = json.loads(path.read_text())
    if index.get("format") != LATENT_FORMAT or index.get("format_version") != LATENT_FORMAT_VERSION:
        raise ValueError(f"{path} is not a {LATENT_FORMAT} v{LATENT_FORMAT_VERSION} index")
    if not index.get("complete"):
        raise ValueError(f"{path}: encoding is unfinished; continue it with `matrixgame-env train encode --resume`")
    return index


@torch.no_grad()
def encode_clips(vae: WanVAE, video: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clips [B, 3, T, H, W] in [-1, 1] -> {"latents", "image_latents", "first_frame"} of the shard layout."""
    latents = vae.encode(video)
    first = video[:, :, 0]
    num_frames = latents.shape[2]
    return {
        "latents": latents,
        "image_latents": vae.encode_image_condition(first, num_frames).latents(num_frames),
        # Exact: the dataset maps stored bytes x to x / 127.5 - 1.
        "first_frame": ((first.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1),
    }


def run(args: argparse.Namespace) -> Path:
    """Encode every split (or continue); returns OUT/encode.

    Started by torchrun, each process encodes every N-th missing shard on its own GPU, and rank 0
    writes index.json (marked complete once every shard is there).
    """
    started = time.monotonic()
    data = existing_dir(args.data, "--data", "record one with: matrixgame-env record --out DIR --minutes N")
    existing_dir(args.init, "--init", "give the model folder written by `train vae`")
    model = load_model(args.init, device=distributed.init(args.device), dtype=torch.float32)
    video_frames = 1 + 4 * (args.latent_frames - 1)
    stride = args.stride or video_frames - 1
    splits = _open_splits(data, video_frames, stride, model.config.video_size, args.val_fraction)
    folder = Path(args.out) / STAGE

    def index_and_missing_shards() -> tuple[dict[str, Any], list[tuple[str, int, str]]]:
        index = _open_index(folder, _index(args, data, model, splits, stride), args.resume)
        missing = [
            (split, shard, name)
            for split in splits
            for shard, name in enumerate(index["splits"][split]["shards"])
            if not (folder / split / name).exists()
        ]
        return index, missing

    index, todo = distributed.on_main(index_and_missing_shards)  # read and written once, before any shard is
    mine = todo[distributed.rank() :: distributed.world_size()]
    total = sum(len(clips) for clips in splits.values())
    remaining = sum(len(range(*_shard_range(index, shard, len(splits[split])))) for split, shard, _ in mine)
    shown = total if distributed.world_size() == 1 else remaining  # several processes: rank 0's own share
    slowest = 0.0
    bar = tqdm(total=shown, initial=shown - remaining, unit="clip", desc=STAGE,
               disable=args.no_progress or not distributed.is_main(), mininterval=progress_interval())  # fmt: skip
    with bar:
        for done, (split, shard, name) in enumerate(mine):
            if args.minutes * 60 - (time.monotonic() - started) < 1.5 * slowest:
                bar.write(f"time budget reached with {len(mine) - done} shards left; continue with --resume")
                break
            shard_started = time.monotonic()
            start, stop = _shard_range(index, shard, len(splits[split]))
            tensors = _encode_shard(model.vae, splits[split], start, stop, args, bar)
            (folder / split).mkdir(parents=True, exist_ok=True)
            save_safetensors(tensors, folder / split / name, metadata={"format": LATENT_FORMAT})
            slowest = max(slowest, time.monotonic() - shard_started)
    distributed.barrier(timeout=args.minutes * 60 + 600)  # the other processes end within their budget too
    if not distributed.is_main() or not all((folder / split / name).exists() for split, _, name in todo):
        return folder
    index["complete"] = True
    _write_index(folder, index)
    print(f"encoded {total} clips of {args.latent_frames} latent frames into {folder}")
    return folder


def _open_splits(
    data: Path, video_frames: int, stride: int, size: tuple[int, int], val_fraction: float
) -> dict[str, VideoClipDataset]:
    """The clips of each split that has any; a StageError when training clips are missing."""
    splits = {}
    for split in SPLITS:
        try:
            splits[split] = VideoClipDataset(
                data, clip_frames=video_frames, split=split, val_fraction=val_fraction, size=size, stride=stride
            )
        except FileNotFoundError as error:
            raise StageError(str(error)) from error
        except ValueError as error:  # a split without clips of this length (e.g. no held-out episode)
            if split == "train":
                raise StageError(str(error)) from error
    return splits


def _encode_shard(
    vae: WanVAE, clips: VideoClipDataset, start: int, stop: int, args: argparse.Namespace, bar: tqdm
) -> dict[str, torch.Tensor]:
    dtype = STORAGE_DTYPES[args.dtype]
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in _ordered_batches(clips, start, stop, args.batch_size, args.workers):
        encoded = encode_clips(vae, batch["video"].to(vae.device))
        for key in ("keyboard", "mouse", "variables"):
            encoded[key] = batch[key]
        for key, value in encoded.items():
            value = value.to(dtype) if key in ("latents", "image_latents") else value
            parts.setdefault(key, []).append(value.cpu())
        bar.update(len(batch["video"]))
    return {key: torch.cat(values) for key, values in parts.items()}


def _ordered_batches(clips: Dataset, start: int, stop: int, batch_size: int, workers: int) -> Iterator[dict]:
    batches = [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
    return iter(DataLoader(clips, batch_sampler=batches, num_workers=workers))


def _index(
    args: argparse.Namespace, data: Path, model: LoadedModel, splits: dict[str, VideoClipDataset], stride: int
) -> dict[str, Any]:
    manifest = splits["train"].manifest
    vae = model.vae.config
    return {
        "format": LATENT_FORMAT,
        "format_version": LATENT_FORMAT_VERSION,
        "complete": False,
        "data": str(data.resolve()),
        "model": str(Path(args.init).resolve()),
        "latent_frames": args.latent_frames,
        "video_frames": 1 + 4 * (args.latent_frames - 1),
        "stride": stride,
        "val_fraction": args.val_fraction,
        "video_size": list(model.config.video_size),
        "latent_size": list(model.config.latent_size),
        "z_dim": vae["z_dim"],
        "dtype": args.dtype,
        "fps": manifest.fps,
        "keyboard": list(manifest.settings.get("keyboard", [])),
        "mouse": list(manifest.settings.get("mouse", [])),
        "variables": manifest.variable_names,
        "latent_mean": vae["latent_mean"],
        "latent_std": vae["latent_std"],
        "shard_clips": args.shard_clips,
        "splits": {
            split: {
                "clips": len(clips),
                "shards": [f"shard_{i:05d}.safetensors" for i in range(-(-len(clips) // args.shard_clips))],
            }
            for split, clips in splits.items()
        },
    }


def _open_index(folder: Path, index: dict[str, Any], resume: bool) -> dict[str, Any]:
    """Write index.json for a new output, or check that a resumed one was made with the same settings."""
    path = folder / INDEX_FILE
    if path.exists():
        if not resume:
            raise StageError(f"{folder} already holds encoded clips: pass --resume to continue, or another --out")
        existing = json.loads(path.read_text())
        # Where the data and model lie may change between sessions (fresh machines); what they hold may not.
        differing = sorted(k for k in index if k not in _MOVABLE and existing.get(k) != index[k])
        if differing:
            raise StageError(f"{folder} was encoded with other settings ({', '.join(differing)}); use another --out")
        return existing
    _write_index(folder, index)
    return index


def _shard_range(index: dict[str, Any], shard: int, clips: int) -> tuple[int, int]:
    size = index["shard_clips"]
    return shard * size, min((shard + 1) * size, clips)


def _write_index(folder: Path, index: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{INDEX_FILE}.tmp"
    temporary.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(temporary, folder / INDEX_FILE)
