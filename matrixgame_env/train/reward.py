"""Stage `reward`: train the reward head that ships with a model, on the encoded clips.

    matrixgame-env train reward --data runs/doom/encode --init runs/doom/distill/model --out runs/doom

The head sees one block of latent frames [z_dim, 3, h, w], what the env holds after each step, and
predicts two game-variable rewards of that block:
- progress: distance moved in the facing direction, summed over the block's frame transitions
  ((p[t+1] - p[t]) . (cos angle[t], sin angle[t]) from POSITION_X/Y and ANGLE), in units of
  `--progress-scale` map units (MSE);
- stuck: whether the path length over the block was below `--stuck-distance` map units (BCE).
Latent block [j, j + 3) covers the frame transitions from video frame max(0, 4j - 4) to 4(j + 2):
the frames that block generated, from the last frame before it.

Writes OUT/reward/model/: the `--init` model plus `reward_head.safetensors` and its settings in the
config's `extra["reward_head"]` (read by `matrixgame_env.learned_reward.LearnedReward`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..learned_reward import REWARD_HEAD_KEY
from ..nn.reward_head import RewardHead
from ..weights import save_safetensors
from .common import (
    StageError,
    TrainRun,
    adamw,
    add_optimizer_arguments,
    add_session_arguments,
    existing_dir,
    export_model,
    initial_model,
    warmup_cosine,
)
from .encode import LatentClipDataset, read_latent_index

STAGE = "reward"
HEAD_FILE = "reward_head.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `matrixgame-env train reward` (`--data` is the output of `train encode`)."""
    add_session_arguments(
        parser,
        batch_size=64,
        data_help="encoded clips (OUT/encode, from `matrixgame-env train encode`)",
        init_help="model folder to ship the head with (e.g. OUT/distill/model)",
    )
    add_optimizer_arguments(parser, steps=3000, lr=1e-3, warmup_steps=100)
    parser.set_defaults(workers=0)  # the blocks are in memory already
    parser.add_argument("--progress-scale", type=float, default=64.0, help="map units per unit of progress reward")
    parser.add_argument("--stuck-distance", type=float, default=16.0, help="map units: less movement is 'stuck'")
    parser.add_argument("--width", type=int, default=64, help="channels of the head's convolutions")
    parser.add_argument("--depth", type=int, default=3, help="convolutions of the head")


def block_targets(
    variables: np.ndarray, names: Sequence[str], num_blocks: int, frames_per_block: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """(progress, path length) in map units of each latent block: video-rate variables [N, T, V] -> [N, blocks] each."""
    x = variables[..., names.index("POSITION_X")]
    y = variables[..., names.index("POSITION_Y")]
    angle = np.deg2rad(variables[..., names.index("ANGLE")])
    dx, dy = np.diff(x, axis=-1), np.diff(y, axis=-1)  # [N, T - 1]: transition t -> t + 1
    forward = dx * np.cos(angle[..., :-1]) + dy * np.sin(angle[..., :-1])
    distance = np.hypot(dx, dy)
    progress, path = [], []
    for block in range(num_blocks):
        first_latent = block * frames_per_block
        start = max(0, 4 * first_latent - 4)
        stop = 4 * (first_latent + frames_per_block - 1)
        progress.append(forward[..., start:stop].sum(-1))
        path.append(distance[..., start:stop].sum(-1))
    return np.stack(progress, -1).astype(np.float32), np.stack(path, -1).astype(np.float32)


class RewardBlockDataset(Dataset):
    """Every aligned block of `frames_per_block` latent frames of encoded clips, with its targets.

    Item: `latents` float32 [z_dim, frames_per_block, h, w], `progress` (in `progress_scale` map
    units) and `stuck` (1.0 when the block's path was shorter than `stuck_distance`), float32 scalars.
    """

    def __init__(
        self, clips: LatentClipDataset, progress_scale: float, stuck_distance: float, frames_per_block: int = 3
    ) -> None:
        self.latents = clips.tensors["latents"]  # [N, z_dim, F, h, w] in the storage dtype
        self.frames_per_block = frames_per_block
        self.blocks_per_clip = self.latents.shape[2] // frames_per_block
        if self.blocks_per_clip == 0:
            raise ValueError(f"clips of {self.latents.shape[2]} latent frames hold no block of {frames_per_block}")
        progress, path = block_targets(
            clips.tensors["variables"].numpy(), clips.variable_names, self.blocks_per_clip, frames_per_block
        )
        self.progress = torch.from_numpy(progress / progress_scale).flatten()  # [N * blocks], clip-major
        self.stuck = torch.from_numpy((path < stuck_distance).astype(np.float32)).flatten()

    def __len__(self) -> int:
        return len(self.progress)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clip, block = divmod(index, self.blocks_per_clip)
        start = block * self.frames_per_block
        latents = self.latents[clip, :, start : start + self.frames_per_block].float()
        return {"latents": latents, "progress": self.progress[index], "stuck": self.stuck[index]}


def reward_losses(
    head: RewardHead, latents: torch.Tensor, progress: torch.Tensor, stuck: torch.Tensor
) -> dict[str, torch.Tensor]:
    """ "loss" = progress MSE + stuck BCE on a batch, with the parts and the stuck accuracy (detached)."""
    output = head(latents).float()
    progress_mse = F.mse_loss(output[:, 0], progress.float())
    stuck_bce = F.binary_cross_entropy_with_logits(output[:, 1], stuck.float())
    accuracy = ((output[:, 1] > 0).float() == stuck.float()).float().mean()
    return {
        "loss": progress_mse + stuck_bce,
        "progress_mse": progress_mse.detach(),
        "stuck_bce": stuck_bce.detach(),
        "stuck_accuracy": accuracy.detach(),
    }


@torch.no_grad()
def evaluate(head: RewardHead, blocks: RewardBlockDataset, batch_size: int, device: torch.device) -> dict[str, float]:
    """Progress RMSE (reward units) and correlation, stuck accuracy and its base rate, over all blocks."""
    head.eval()
    outputs = []
    for start in range(0, len(blocks), batch_size):
        items = [blocks[i] for i in range(start, min(start + batch_size, len(blocks)))]
        latents = torch.stack([item["latents"] for item in items]).to(device)
        outputs.append(head(latents).float().cpu())
    output = torch.cat(outputs)
    predicted, actual = output[:, 0].numpy(), blocks.progress.numpy()
    correlation = float(np.corrcoef(predicted, actual)[0, 1]) if predicted.std() > 0 and actual.std() > 0 else 0.0
    stuck = blocks.stuck.numpy() > 0.5
    return {
        "progress_rmse": float(np.sqrt(np.mean((predicted - actual) ** 2))),
        "progress_correlation": correlation,
        "stuck_accuracy": float(np.mean((output[:, 1].numpy() > 0) == stuck)),
        "stuck_rate": float(np.mean(stuck)),
        "blocks": len(blocks),
    }


def run(args: argparse.Namespace) -> Path:
    """Run (or continue) the stage; returns OUT/reward/model, written at every stop (as the other stages:
    result.json's `finished` says whether all steps ran; `--resume` continues)."""
    data = existing_dir(args.data, "--data", "give the folder written by `matrixgame-env train encode`")
    try:
        index = read_latent_index(data)
    except (FileNotFoundError, ValueError) as error:
        raise StageError(f"--data: {error}") from error
    training = TrainRun.from_args(args, STAGE)
    config, dit, vae, clip, source = initial_model(args.init)
    if index["latent_mean"] != vae.config["latent_mean"] or index["latent_std"] != vae.config["latent_std"]:
        # The env hands the head latents normalised by the model's VAE; these were normalised by another.
        training.message(f"warning: {data} was encoded with other latent statistics than the VAE of {args.init}")
    frames_per_block = int(config.sampler.get("frames_per_block", 3))
    options = {"progress_scale": args.progress_scale, "stuck_distance": args.stuck_distance,
               "frames_per_block": frames_per_block}  # fmt: skip
    train_blocks = RewardBlockDataset(LatentClipDataset(data, "train"), **options)
    val_blocks = RewardBlockDataset(LatentClipDataset(data, "val"), **options) if "val" in index["splits"] else None
    head = RewardHead(z_dim=vae.z_dim, frames=frames_per_block, width=args.width, depth=args.depth)
    head.to(training.device).train()
    optimizer = adamw(head.parameters(), args.lr, args.weight_decay)
    training.add_module("reward_head", head, ema_decay=args.ema)
    training.add_optimizer("reward_head", optimizer, warmup_cosine(optimizer, args.warmup_steps, args.steps))
    training.resume()
    if not training.finished:
        batches = training.batches(train_blocks, args.batch_size, args.workers)
        losses_of = training.data_parallel(
            lambda batch: reward_losses(head, batch["latents"], batch["progress"], batch["stuck"]), head
        )
        while training.keep_going():
            batch = {key: value.to(training.device, non_blocking=True) for key, value in next(batches).items()}
            with training.autocast():
                losses = losses_of(batch)
            training.optimize(losses.pop("loss"))
            training.end_step(**losses)
        training.save()
    if not training.is_main:  # rank 0 evaluates and writes the model folder
        training.close()
        return training.folder / "model"
    trained = training.weights("reward_head")
    measured_on = val_blocks if val_blocks is not None else train_blocks
    metrics = evaluate(trained, measured_on, args.batch_size, training.device)
    metrics["split"] = "val" if val_blocks is not None else "train (no val clips)"
    training.log(**{f"val_{k}": v for k, v in metrics.items() if isinstance(v, float)})
    config.extra[REWARD_HEAD_KEY] = {
        "file": HEAD_FILE,
        "config": trained.config,
        "progress_scale": args.progress_scale,
        "stuck_distance": args.stuck_distance,
        "frames_per_block": frames_per_block,
        "steps": training.step,
        "metrics": metrics,
    }
    state = {k: v.detach().cpu().float() for k, v in trained.state_dict().items()}
    folder = export_model(
        training.folder / "model", config, dit, vae, clip, source=source,
        extra_files={HEAD_FILE: lambda path: save_safetensors(state, path)},
    )  # fmt: skip
    result = {"step": training.step, "finished": training.finished, "model": str(folder), **metrics}
    (training.folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    training.message(f"reward head on {metrics['split']}: {json.dumps(metrics)}; model written to {folder}")
    if not training.finished:
        training.message(f"stopped at step {training.step}/{training.total_steps}; continue with --resume")
    training.close()
    return folder
