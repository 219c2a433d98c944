"""Stage `dit`: train the causal DiT and the image encoder by diffusion forcing on encoded clips.

    matrixgame-env train dit --data runs/doom/encode --init runs/doom/vae/model --out runs/doom [--resume]

Each step takes clips of F latent frames (whole blocks of 3) with their start pictures and
video-rate actions, builds the conditions exactly as inference does (first-frame mask + the VAE
image condition, image-encoder tokens of the start picture, 12-frame action windows), noises every
latent frame to its own level (see `forcing.py`) and regresses the velocity noise - x0 under the
block-causal attention mask with the sampler's window. The image encoder has no pretrained weights
here, so it trains jointly with the DiT. The VAE is frozen (the clips were encoded with it).

`--init` is the model folder of `train vae` (its VAE and config; DiT and image encoder are
initialised here) or of an earlier `train dit` (everything continues from its weights).
Every session ends by writing OUT/dit/model/ (EMA weights when `--ema`) and checking it:
validation flow MSE and 3-step streaming generation against the recorded latents, in log.jsonl.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..model_config import ModelConfig
from ..nn.clip import CLIPVisionEncoder
from ..nn.dit import CausalDiT
from ..nn.scheduler import FlowMatchScheduler
from ..world.sampler import SamplerConfig
from .common import (
    StageError,
    TrainRun,
    adamw,
    add_optimizer_arguments,
    add_session_arguments,
    initial_model,
    warmup_cosine,
)
from .conditions import ClipBatch, build_conditions, drop_actions
from .forcing import DiffusionForcing, ForcingLoss, NoiseMix
from .latent_clips import fixed_batches, open_latent_splits
from .sampling_check import export_and_check

STAGE = "dit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `matrixgame-env train dit` (`--data`: the `train encode` output folder)."""
    add_session_arguments(parser, batch_size=128)
    add_optimizer_arguments(parser, steps=20_000, lr=3e-4, warmup_steps=500)
    parser.set_defaults(ema=0.999)
    add_stage_arguments(parser, frames_help="latent frames per training clip, a multiple of 3 (default: as encoded)")
    parser.add_argument(
        "--action-dropout",
        type=float,
        default=0.0,
        help="share of clips trained with all actions zeroed (classifier-free style; default 0)",
    )
    parser.add_argument("--per-block-noise", type=float, default=0.3, help="share of clips with one level per block")
    parser.add_argument(
        "--clean-context",
        type=float,
        default=0.3,
        help="share of clips whose first blocks are clean context (at the context timestep)",
    )
    parser.add_argument("--uniform-noise", type=float, default=0.1, help="share of clips with one level for all frames")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT (CUDA: 1-3 minutes to compile, then about 2x the steps per second)",
    )
    parser.add_argument(
        "--fresh-dit",
        action="store_true",
        help="start a new DiT (Wan's initialisation) instead of continuing the --init folder's; its VAE, "
        "image encoder and reward head are kept (e.g. a DiT from scratch on a shipped VAE)",
    )


def add_stage_arguments(parser: argparse.ArgumentParser, frames_help: str) -> None:
    """Options both DiT stages share: clip length, the model check, the time kept for it."""
    parser.add_argument("--frames", type=int, default=None, help=frames_help)
    parser.add_argument(
        "--check-clips", type=int, default=64, help="validation clips of the end-of-session check (0: no check)"
    )
    parser.add_argument("--check-blocks", type=int, default=4, help="blocks streamed by the end-of-session check")
    parser.add_argument(
        "--action-lr-mult",
        type=float,
        default=5.0,
        help="learning-rate multiplier of the action modules (default 5: their outputs start small and must "
        "grow against a residual stream far larger than the actions)",
    )
    parser.add_argument(
        "--finish-minutes",
        type=float,
        default=1.0,
        help="minutes of --minutes kept for writing and checking the model folder (default: 1)",
    )


# A normal turn in the model's mouse units (0.1 per video frame); see `initialise_weights`.
TYPICAL_MOUSE = 0.1


def initialise_weights(dit: CausalDiT) -> None:
    """Wan's initialisation for training from scratch, with the output and action branches at zero.

    Linear layers xavier-uniform with zero bias, the time embedding N(0, 0.02), the head at zero
    (the first prediction is flow 0), and the action modules' output projections at zero so they
    start as the identity and grow in. The mouse columns of the mouse MLP's first layer are scaled
    by 1 / TYPICAL_MOUSE: the layer reads token features of order 1 beside mouse values of order
    0.1, and at equal weights the mouse would start 10x quieter than the picture.
    """
    with torch.no_grad():
        for module in dit.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = dit.patch_embedding.weight
        weight.copy_(nn.init.xavier_uniform_(torch.empty(weight.shape[0], weight[0].numel())).view_as(weight))
        nn.init.zeros_(dit.patch_embedding.bias)
        for module in dit.time_embedding:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(dit.head.head.weight)
        nn.init.zeros_(dit.head.head.bias)
        for block in dit.blocks:
            action = block.action_model
            for name in ("proj_mouse", "proj_keyboard"):
                if action is not None and hasattr(action, name):
                    nn.init.zeros_(getattr(action, name).weight)
            if action is not None and hasattr(action, "mouse_mlp"):
                action.mouse_mlp[0].weight[:, dit.config.dim :] /= TYPICAL_MOUSE


def parameter_groups(
    dit: CausalDiT, lr: float, action_lr_mult: float, others: tuple[nn.Module, ...] = ()
) -> list[dict]:
    """AdamW groups: the DiT's action modules at `lr * action_lr_mult`, the rest of the DiT and the
    `others` modules at `lr`."""
    if not action_lr_mult > 0:
        raise StageError(f"--action-lr-mult must be a positive number, got {action_lr_mult}")
    action = [p for name, p in dit.named_parameters() if ".action_model." in name]
    rest = [p for name, p in dit.named_parameters() if ".action_model." not in name]
    groups = [{"params": [*rest, *(p for module in others for p in module.parameters())], "lr": lr}]
    if action:
        groups.append({"params": action, "lr": lr * action_lr_mult})
    return groups


def warm_up(
    training: TrainRun, model: nn.Module, clip: CLIPVisionEncoder, forcing: DiffusionForcing, batch: ClipBatch
) -> None:
    """Run one forward and backward without a step, so that compilation happens before the first
    step's clock starts (the run would take it for a step time and stop short); leaves the random
    state and the gradients as they were, so a compiled run resumes as exactly as an eager one."""
    batch = batch.to(training.device)
    devices = [training.device] if training.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with training.autocast():
            loss = forcing.loss(model, batch.latents, build_conditions(batch, model.config, clip)).loss
        loss.backward()
    for parameter in [*model.parameters(), *clip.parameters()]:
        parameter.grad = None


def forcing_for(config_sampler: dict, dit: CausalDiT, mix: NoiseMix | None = None) -> DiffusionForcing:
    """Diffusion forcing with the blocks, window, shift and context timestep the sampler uses."""
    sampler = SamplerConfig.from_dict(config_sampler)
    return DiffusionForcing(
        FlowMatchScheduler(sampler.timestep_shift),
        sampler.frames_per_block,
        dit.config.local_attn_size,
        mix,
        context_timestep=sampler.context_noise,
    )


def forget_dit_training(config: ModelConfig) -> None:
    """Drops the records of the DiT's training (diffusion forcing, distillation) from `config`, whose
    DiT is about to be replaced by a new one; the records of the other parts stay."""
    records = config.extra.get("training", {})
    for stage in (STAGE, "distill"):
        records.pop(stage, None)


def run(args: argparse.Namespace) -> Path:
    """Run (or continue) the stage; returns OUT/dit/model."""
    if args.init is None:
        raise StageError("dit needs --init MODEL_DIR: the model folder of `train vae` (OUT/vae/model)")
    if args.minutes <= args.finish_minutes:
        raise StageError(f"--minutes {args.minutes} leaves no time for training after --finish-minutes")
    training = TrainRun.from_args(args, STAGE, minutes=args.minutes - args.finish_minutes)
    config, dit, vae, clip, source = initial_model(args.init, args.model_config)
    if args.fresh_dit:
        forget_dit_training(config)
    if STAGE not in config.extra.get("training", {}):
        initialise_weights(dit)  # the folder's DiT is an untrained placeholder (or --fresh-dit)
    mix = NoiseMix(args.per_block_noise, args.uniform_noise, args.clean_context)
    forcing = forcing_for(config.sampler, dit, mix)
    train_clips, val_clips = open_latent_splits(args.data, config, vae, args.frames, forcing.frames_per_block)
    check_clips = fixed_batches(val_clips or train_clips, args.check_clips, args.batch_size)

    dit.to(training.device).train()
    clip.to(training.device).train()
    optimizer = adamw(parameter_groups(dit, args.lr, args.action_lr_mult, (clip,)), args.lr, args.weight_decay)
    training.add_module("dit", dit, ema_decay=args.ema)
    training.add_module("clip", clip, ema_decay=args.ema)
    training.add_optimizer("main", optimizer, warmup_cosine(optimizer, args.warmup_steps, args.steps))
    training.resume()
    model = dit
    if args.compile and not training.finished:
        model = torch.compile(dit)
        training.message("compiling the DiT ...")
        local = training.local_batch_size(args.batch_size)  # the shape of this process's batches
        warm_up(training, model, clip, forcing, fixed_batches(train_clips, local, local)[0])
    if not training.finished:
        batches = training.batches(train_clips, args.batch_size, args.workers)

        def forcing_losses(batch: ClipBatch) -> ForcingLoss:
            conditions = drop_actions(build_conditions(batch, dit.config, clip), args.action_dropout)
            return forcing.loss(model, batch.latents, conditions)

        losses_of = training.data_parallel(forcing_losses, dit, clip)
        while training.keep_going():
            batch = ClipBatch.from_item(next(batches), training.device)
            with training.autocast():
                losses = losses_of(batch)
            grad_norm = training.optimize(losses.loss)
            training.end_step(loss=losses.loss.detach(), flow_mse=losses.flow_mse, grad_norm=grad_norm)
        training.save()
    parts = (training.weights("dit"), vae, training.weights("clip"))
    folder = export_and_check(training, STAGE, config, parts, source, check_clips, args.check_blocks)
    if not training.finished:
        training.message(f"stopped at step {training.step}/{training.total_steps}; continue with --resume")
    training.close()
    return folder
