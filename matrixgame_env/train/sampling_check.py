"""The check both DiT stages run on the model folder they write: does it load and generate, and how well.

It works from the saved folder alone (`WorldModel.from_pretrained`), so it also proves the folder is
complete: the validation flow-matching loss of the saved DiT, and a few blocks streamed by the
few-step sampler from the validation clips' start pictures with their recorded actions, compared
with the recorded latents.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import torch

from ..model_config import ModelConfig
from ..nn.clip import CLIPVisionEncoder
from ..nn.dit import CausalDiT
from ..nn.scheduler import FlowMatchScheduler
from ..nn.vae import WanVAE
from ..world.model import WorldModel
from .common import TrainRun, export_model
from .conditions import ClipBatch, build_conditions
from .forcing import DiffusionForcing

ACTION_PARTS = ("keyboard", "mouse")


@torch.no_grad()
def validation_loss(
    world: WorldModel,
    forcing: DiffusionForcing,
    clips: list[ClipBatch],
    seed: int = 0,
    swap: Collection[str] = (),
) -> float:
    """Mean flow MSE of the world's DiT over `clips`, with noise and levels fixed by `seed`.

    `swap` ("keyboard", "mouse" or both) gives every clip those actions of the next clip of its
    batch (the same noise and levels otherwise): the loss rises as much as the model reads them.
    """
    generator = torch.Generator(device=world.device).manual_seed(seed)
    total = 0.0
    for batch in clips:
        batch = batch.to(world.device)
        if swap:
            batch = replace(batch, **{name: getattr(batch, name).roll(1, dims=0) for name in swap})
        conditions = build_conditions(batch, world.dit.config, world.clip, world.vae)
        total += float(forcing.loss(world.dit, batch.latents.float(), conditions, generator).flow_mse)
    return total / len(clips)


def action_gain(
    world: WorldModel,
    forcing: DiffusionForcing,
    clips: list[ClipBatch],
    seed: int = 0,
    loss: float | None = None,
    parts: Collection[str] = ACTION_PARTS,
) -> float | None:
    """How much the DiT reads its actions: the relative rise of the validation flow MSE when every
    clip gets another clip's actions (`parts`: both, or only "keyboard" or "mouse"; 0: ignored).
    None without a batch of 2 clips or more, or for a model without actions (or without that part).
    `loss`: `validation_loss` of the same clips and seed, if known.
    """
    usable = [batch for batch in clips if batch.latents.shape[0] > 1]
    action = world.dit.config.action
    if action is None or not usable:
        return None
    parts = [name for name in parts if getattr(action, f"enable_{name}")]
    if not parts:
        return None
    if loss is None or len(usable) != len(clips):
        loss = validation_loss(world, forcing, usable, seed)
    swapped = validation_loss(world, forcing, usable, seed, swap=parts)
    return (swapped - loss) / loss


@torch.no_grad()
def generation_mse(world: WorldModel, batch: ClipBatch, num_blocks: int, seed: int = 0) -> list[float]:
    """Stream `num_blocks` blocks from each clip's start picture with its recorded actions.

    Returns the mean squared error to the recorded latents, one value per block. The first block
    starts from the true picture (teacher-forced start); later blocks show how errors compound.
    Also decodes the blocks, so that a broken VAE in the folder fails here.
    """
    sampler = world.sampler
    fpb = sampler.config.frames_per_block
    if batch.num_frames < num_blocks * fpb:
        raise ValueError(
            f"{num_blocks} blocks need {num_blocks * fpb} latent frames, the clips hold {batch.num_frames}"
        )
    state = world.start(batch.first_frame.cpu(), seed=seed)
    errors, video_frame = [], 0
    for block in range(num_blocks):
        new = sampler.video_frames_for_block(state)
        window = slice(video_frame, video_frame + new)
        latents = world.step_latents(state, batch.keyboard[:, window].float(), batch.mouse[:, window].float())
        frames = world.decode(state, latents)
        if frames.shape[1] != new:
            raise RuntimeError(f"block {block} decoded to {frames.shape[1]} frames instead of {new}")
        recorded = batch.latents[:, :, block * fpb : (block + 1) * fpb].to(latents.device, torch.float32)
        errors.append(float((latents.float() - recorded).pow(2).mean()))
        video_frame += new
    return errors


def check_model_folder(
    folder: str | os.PathLike,
    clips: list[ClipBatch],
    num_blocks: int = 4,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, float | list[float]]:
    """Load the folder as a `WorldModel` and report `val_flow_mse`, `generation_mse` (per block) and
    `action_gain` (see `action_gain`; absent when it cannot be measured)."""
    world = WorldModel.from_pretrained(folder, device=device, dtype=torch.float32)
    sampler = world.sampler
    forcing = DiffusionForcing(
        FlowMatchScheduler(sampler.config.timestep_shift),
        sampler.config.frames_per_block,
        sampler.window_frames,
        context_timestep=sampler.config.context_noise,
    )
    per_block = generation_mse(
        world, clips[0], min(num_blocks, clips[0].num_frames // sampler.config.frames_per_block), seed
    )
    loss = validation_loss(world, forcing, clips, seed)
    metrics = {
        "val_flow_mse": loss,
        "generation_mse": sum(per_block) / len(per_block),
        "generation_mse_per_block": per_block,
    }
    usable = [batch for batch in clips if batch.latents.shape[0] > 1]  # batches whose clips can swap actions
    if usable and len(usable) != len(clips):
        loss = validation_loss(world, forcing, usable, seed)  # once, not once per gain
    gains = {f"{part}_gain": (part,) for part in ACTION_PARTS}  # each alone: which path the model reads
    gains["action_gain"] = ACTION_PARTS
    for name, parts in gains.items():
        gain = action_gain(world, forcing, usable, seed, loss, parts)
        if gain is not None:
            metrics[name] = gain
    return metrics


def export_and_check(
    training: TrainRun,
    stage: str,
    config: ModelConfig,
    parts: tuple[CausalDiT, WanVAE, CLIPVisionEncoder],
    source: Path | None,
    clips: list[ClipBatch],
    num_blocks: int = 4,
    trends: tuple[str, ...] = (),
    settings: dict | None = None,
) -> Path:
    """Write OUT/<stage>/model (config records the stage's steps and `settings`, after the --init
    model's record of the stage as `continued_from`), check it on `clips` (none: no check), log the
    check to log.jsonl and OUT/<stage>/result.json. `trends` names logged training metrics to
    summarise as `<name>_trend` (see `metric_trend`). Returns the model folder (written by
    rank 0 alone when there are several processes)."""
    if not training.is_main:
        return training.folder / "model"
    config = copy.deepcopy(config)
    dit, vae, clip = (copy.deepcopy(part).float().cpu().eval() for part in parts)
    records = config.extra.setdefault("training", {})
    record = {"steps": training.step, "finished": training.finished, **(settings or {})}
    if stage in records:  # the --init model's own training by this stage: kept as its history
        record["continued_from"] = records[stage]
    records[stage] = record
    folder = export_model(training.folder / "model", config, dit, vae, clip, source=source)
    if not clips:
        training.message(f"{stage} model at step {training.step} written to {folder} (not checked)")
        return folder
    metrics = check_model_folder(folder, clips, num_blocks, device=training.device)
    for name in trends:
        metrics[f"{name}_trend"] = metric_trend(training.folder / "log.jsonl", name)
    training.log(**metrics)
    result = {"step": training.step, "finished": training.finished, "model": str(folder), **metrics}
    (training.folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    training.message(
        f"{stage} model at step {training.step} written to {folder}: val flow MSE {metrics['val_flow_mse']:.4f}, "
        f"3-step generation MSE {metrics['generation_mse']:.4f}"
        + (f", action gain {metrics['action_gain']:+.2%}" if "action_gain" in metrics else "")
    )
    return folder


def metric_trend(log_file: Path, name: str, parts: int = 4) -> list[float]:
    """Mean of a logged metric over `parts` consecutive stretches of the run's log lines (oldest
    first): a short summary of its trend over all sessions so far."""
    values = []
    if log_file.exists():
        records = (json.loads(line) for line in log_file.read_text().splitlines() if line)
        values = [record[name] for record in records if name in record]
    stretches = [values[len(values) * i // parts : len(values) * (i + 1) // parts] for i in range(parts)]
    return [sum(s) / len(s) for s in stretches if s]
