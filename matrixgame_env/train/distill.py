"""Stage `distill`: self-forcing distillation of the diffusion-forcing DiT into the 3-step block sampler.

    matrixgame-env train distill --data runs/doom/encode --init runs/doom/dit/model --out runs/doom [--resume]

Three copies of the `train dit` DiT: the frozen teacher (real score), the student (the
distilled generator, exported) and the critic (fake score). Each step:
1. The student streams clips without gradient (`SelfForcingRollout`: the sampler's warped steps
   with KV caches, a random exit step per block, the clean context re-run), and the critic takes
   `--critic-steps` diffusion-forcing steps on them (`--batch-size` fresh clips each), so it
   tracks the score of the student's current distribution.
2. The student streams a clip with gradient on each block's exit step, and takes one DMD step
   (`dmd.py`): teacher and critic both predict x0 from the clip noised to one random level.
   With `--data-weight w > 0` the student's loss also holds w times the `train dit` loss on the
   recorded latents of its clips, which anchors the student to the data DMD alone lets it leave.
   With `--action-weight a > 0` it also holds a times the action loss of a latent action reader
   (`latent_actions.py`: trained on the recorded latents first, then frozen): what of the clip's keys
   and turns the reader cannot find in the student's latents. With `--pixel-judge IDM
   --pixel-judge-weight j > 0` it also holds j times a frozen inverse-dynamics model's loss on the
   student's clips decoded by the model's own decoder (`pixel_judge.py`): what of the keys and turns,
   and of when they change, that judge cannot see in the frames.
The teacher and the critic start as the `--init` DiT unless `--teacher` / `--critic-init` name other model
folders with the same DiT config: a later session can take an exported student further (`--init` the
student, `--teacher` the diffusion-forcing model it learned from).
Teacher, critic and student see the same conditions: start pictures and recorded actions of real
clips (without `--data-weight`, no recorded latents enter the losses). The image encoder and the VAE are frozen.
Every session ends by writing OUT/distill/model/ (student, EMA weights when `--ema`) and checking
it like `train dit` does; log.jsonl holds the DMD and critic losses per step.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from ..checkpoints import load_model
from ..model_config import ModelConfig
from ..nn.clip import CLIPVisionEncoder
from ..nn.dit import CausalDiT
from ..world.sampler import SamplerConfig
from .common import (
    StageError,
    TrainRun,
    adamw,
    add_optimizer_arguments,
    add_session_arguments,
    existing_dir,
    initial_model,
    warmup_cosine,
)
from .conditions import ClipBatch, ClipConditions, build_conditions
from .diffusion import add_stage_arguments, forcing_for, parameter_groups
from .dmd import DistributionMatching
from .forcing import DiffusionForcing, NoiseMix
from .latent_actions import (
    READER_FILE,
    LatentActionReader,
    action_loss,
    load_reader,
    reader_accuracy,
    reader_targets,
    save_reader,
    train_reader,
)
from .latent_clips import fixed_batches, open_latent_splits
from .pixel_judge import DecodedClipJudge
from .sampling_check import export_and_check
from .self_forcing import SelfForcingRollout

STAGE = "distill"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `matrixgame-env train distill` (`--init`: the `train dit` model folder)."""
    add_session_arguments(parser, batch_size=32)
    add_optimizer_arguments(parser, steps=3_000, lr=2e-5, warmup_steps=50)
    parser.set_defaults(ema=0.99, grad_clip=10.0)
    add_stage_arguments(parser, frames_help="latent frames per rollout, a multiple of 3 (default: as encoded)")
    parser.add_argument("--critic-steps", type=int, default=5, help="critic updates per student update (default: 5)")
    parser.add_argument("--critic-lr", type=float, default=None, help="critic learning rate (default: --lr)")
    parser.add_argument(
        "--teacher",
        default=None,
        help="model folder of the teacher (the real score) when it is not --init, e.g. to take an exported "
        "student further from its diffusion-forcing teacher (same DiT config)",
    )
    parser.add_argument(
        "--critic-init",
        default=None,
        help="model folder whose DiT starts the critic (default: the teacher)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="action guidance of the teacher (1: none); the student learns the guided flow, so its exported "
        "config samples without guidance (sampler.action_guidance 1)",
    )
    parser.add_argument(
        "--data-weight",
        type=float,
        default=0.0,
        help="weight of the diffusion-forcing loss on the recorded latents in the student's update (0: DMD only)",
    )
    parser.add_argument(
        "--action-weight",
        type=float,
        default=0.0,
        help="weight of the latent action reader's loss on the student's clips in its update (0: none)",
    )
    parser.add_argument(
        "--action-reader",
        default=None,
        help="a trained action reader (.safetensors) to use (default: OUT/distill/action_reader.safetensors, "
        "trained on the recorded latents when missing)",
    )
    parser.add_argument(
        "--action-reader-steps", type=int, default=1500, help="steps of training the action reader (default: 1500)"
    )
    parser.add_argument(
        "--action-reader-frames",
        type=int,
        choices=(1, 4),
        default=1,
        help="what a reader trained here names of each latent frame's keys: 1, the share of its 4 video frames "
        "with each key held (default); 4, each video frame's keys, so the student is also pulled towards "
        "showing where inside a latent frame a key went down or up (a given --action-reader says its own)",
    )
    parser.add_argument(
        "--pixel-judge",
        default=None,
        metavar="IDM",
        help="an inverse-dynamics model saved by `matrixgame-env eval` (--idm-out): frozen, it reads the student's "
        "clips decoded by the model's own decoder, and --pixel-judge-weight times its loss against the recorded "
        "actions is added to the student's update (train/pixel_judge.py); use another judge than the one eval "
        "scores with",
    )
    parser.add_argument(
        "--pixel-judge-weight", type=float, default=0.0, help="weight of the --pixel-judge loss (0: none)"
    )
    parser.add_argument(
        "--pixel-judge-clips",
        type=int,
        default=8,
        help="how many of the student's clips per update are decoded and judged (default: 8)",
    )
    parser.add_argument(
        "--pixel-judge-floor",
        action="store_true",
        help="count the judge's loss on each window (keys and turn apart) only above its loss on the VAE round trip "
        "of the clip's recorded latents, so the student is asked to show its actions as readably as the real "
        "frames, not more",
    )
    parser.add_argument("--min-level", type=float, default=0.02, help="lowest DMD noise level (unshifted, 0..1)")
    parser.add_argument("--max-level", type=float, default=0.98, help="highest DMD noise level (unshifted, 0..1)")


class Distillation:
    """One training step of self-forcing DMD: critic updates, then a student update."""

    def __init__(
        self,
        training: TrainRun,
        teacher: CausalDiT,
        student: CausalDiT,
        critic: CausalDiT,
        image_encoder: CLIPVisionEncoder,
        rollout: SelfForcingRollout,
        dmd: DistributionMatching,
        critic_forcing: DiffusionForcing,
        critic_steps: int,
        data_forcing: DiffusionForcing | None = None,
        data_weight: float = 0.0,
        reader: LatentActionReader | None = None,
        action_weight: float = 0.0,
        pixel_judge: DecodedClipJudge | None = None,
        pixel_judge_weight: float = 0.0,
    ) -> None:
        """`data_forcing` and `data_weight` > 0: the student's update adds data_weight times the
        diffusion-forcing loss of the student on the recorded latents of its clips. `reader` and
        `action_weight` > 0: it adds action_weight times the reader's action loss on the student's clip.
        `pixel_judge` and `pixel_judge_weight` > 0: it adds pixel_judge_weight times the judge's loss on
        the student's decoded clips."""
        if data_weight < 0 or (data_weight > 0 and data_forcing is None):
            raise ValueError(f"data_weight must be >= 0, and > 0 needs data_forcing; got {data_weight}")
        if action_weight < 0 or (action_weight > 0 and reader is None):
            raise ValueError(f"action_weight must be >= 0, and > 0 needs a reader; got {action_weight}")
        if pixel_judge_weight < 0 or (pixel_judge_weight > 0 and pixel_judge is None):
            raise ValueError(f"pixel_judge_weight must be >= 0, and > 0 needs a judge; got {pixel_judge_weight}")
        self.training, self.teacher, self.student, self.critic = training, teacher, student, critic
        self.image_encoder, self.rollout, self.dmd = image_encoder, rollout, dmd
        self.critic_forcing, self.critic_steps = critic_forcing, critic_steps
        self.data_forcing, self.data_weight = data_forcing, data_weight
        self.reader, self.action_weight = reader, action_weight
        self.pixel_judge, self.pixel_judge_weight = pixel_judge, pixel_judge_weight
        # Data-parallel over the processes of a distributed run (each is the function itself in one process).
        self.critic_loss = training.data_parallel(self._critic_loss, critic)
        self.student_loss = training.data_parallel(self._student_loss, student)

    @torch.no_grad()
    def conditions(self, batch: ClipBatch) -> ClipConditions:
        return build_conditions(batch, self.student.config, self.image_encoder)

    def critic_steps_on(self, batch: ClipBatch) -> torch.Tensor:
        """`critic_steps` diffusion-forcing updates of the critic, each on its share of `batch`,
        generated by the student; returns their mean loss."""
        conditions = self.conditions(batch)
        # One rollout for all updates: the student does not change in between, and a rollout is
        # bound by its sequence of small DiT calls, so it costs about the same for many more clips.
        with self.training.autocast(), torch.no_grad():
            samples = self.rollout(conditions, torch.randn_like(batch.latents))
        size = len(samples) // self.critic_steps
        losses = []
        for part in (slice(i * size, (i + 1) * size) for i in range(self.critic_steps)):
            with self.training.autocast():
                loss = self.critic_loss(samples[part], conditions.clips(part))
            self.training.optimize(loss, "critic")
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def student_step(self, batch: ClipBatch) -> dict[str, torch.Tensor]:
        """One DMD update of the student; returns its losses (`dmd_loss`, `data_loss` with a data
        weight, `action_loss` with an action weight, `judge_loss` with a pixel judge's weight) and
        `grad_norm`."""
        conditions = self.conditions(batch)
        frame_mask = self.critic_forcing.frame_mask(batch.num_frames, batch.latents.device)
        with self.training.autocast():
            losses = self.student_loss(conditions, torch.randn_like(batch.latents), frame_mask, batch)
        weights = {
            "dmd_loss": 1.0,
            "data_loss": self.data_weight,
            "action_loss": self.action_weight,
            "judge_loss": self.pixel_judge_weight,
        }
        loss = sum(weights[name] * value for name, value in losses.items())
        result = {name: value.detach() for name, value in losses.items()}
        result["grad_norm"] = self.training.optimize(loss, "student")
        return result

    def _critic_loss(self, samples: torch.Tensor, conditions: ClipConditions) -> torch.Tensor:
        return self.critic_forcing.loss(self.critic, samples, conditions).loss

    def _student_loss(
        self, conditions: ClipConditions, noise: torch.Tensor, frame_mask: torch.Tensor, batch: ClipBatch
    ) -> dict[str, torch.Tensor]:
        """The DMD loss of a clip the student streams from `noise` (with gradient on each block's exit
        step); with a data weight the student's diffusion-forcing loss on the recorded latents; with an
        action weight the reader's action loss on the streamed clip against the clip's actions; with a
        pixel judge's weight that judge's loss on the decoded clip."""
        sample = self.rollout(conditions, noise)
        losses = {"dmd_loss": self.dmd.loss(sample, self.teacher, self.critic, conditions, frame_mask).loss}
        if self.data_weight:
            losses["data_loss"] = self.data_forcing.loss(self.student, batch.latents, conditions).loss
        if self.action_weight:
            losses["action_loss"] = action_loss(self.reader, sample, reader_targets(self.reader, batch))
        if self.pixel_judge_weight:
            losses["judge_loss"] = self.pixel_judge.loss(sample, batch.keyboard, batch.mouse, batch.latents)
        return losses

    def step(self, batch: ClipBatch) -> dict[str, torch.Tensor]:
        """Critic updates on the first `critic_steps` shares of `batch`, then a student update on the last:
        `batch` holds (critic_steps + 1) * B clips."""
        shares = self.critic_steps + 1
        size, rest = divmod(len(batch.latents), shares)
        if rest or not size:
            raise ValueError(f"a step takes a multiple of {shares} clips, got {len(batch.latents)}")
        critic_loss = self.critic_steps_on(batch.clips(slice(0, size * self.critic_steps)))
        student = self.student_step(batch.clips(slice(size * self.critic_steps, None)))
        return {"critic_loss": critic_loss, **student}


def action_reader(
    args: argparse.Namespace, training: TrainRun, train_clips, val_clips, student: CausalDiT
) -> tuple[LatentActionReader, dict]:
    """The frozen latent action reader of `--action-weight`: `--action-reader`'s, else the one this stage
    trained in an earlier session, else one trained now on the recorded latents (saved in the stage's
    folder); with its accuracy on real latents (validation clips where there are some)."""
    channels = student.config.out_dim
    action = student.config.action
    keys = action.keyboard_dim_in if action is not None and action.enable_keyboard else 0
    if keys == 0:
        raise StageError("--action-weight needs a model with keyboard actions")
    path = Path(args.action_reader) if args.action_reader else training.folder / READER_FILE
    if path.exists():
        reader = load_reader(path, channels, keys, training.device)
    elif args.action_reader:
        raise StageError(f"--action-reader {path}: no such file (give a reader this stage saved, or leave it out)")
    else:
        loader = torch.utils.data.DataLoader(
            train_clips,
            batch_size=args.batch_size,
            sampler=torch.utils.data.RandomSampler(
                train_clips, replacement=True, num_samples=2**31 - 1, generator=torch.Generator().manual_seed(0)
            ),
        )  # the same batches in every process, so every process trains the same reader
        batches = (ClipBatch.from_item(item) for item in loader)
        reader = train_reader(
            batches,
            channels,
            keys,
            args.action_reader_steps,
            training.device,
            progress=training.show_progress,
            frames_per_latent=args.action_reader_frames,
        )
        if training.is_main:
            save_reader(reader, path)
    judged = reader_accuracy(reader, fixed_batches(val_clips or train_clips, 256, args.batch_size), training.device)
    judged["frames_per_latent"] = reader.frames_per_latent
    training.message(
        f"action reader on real latents ({'each video frame' if reader.frames_per_latent > 1 else 'shares'}): "
        f"keys {judged['key_accuracy']:.3f} (always the commonest: "
        f"{judged['key_commonest_share']:.3f}), yaw {judged['yaw_accuracy']:.3f} "
        f"({judged['yaw_commonest_share']:.3f}), {judged['latent_frames']} latent frames"
    )
    return reader, judged


def decoded_clip_judge(
    args: argparse.Namespace, config: ModelConfig, vae, train_clips, device: torch.device
) -> DecodedClipJudge:
    """The frozen judge of --pixel-judge on the model's own decoder, checked against the clips it will read."""
    try:
        judged = DecodedClipJudge.load(vae, args.pixel_judge, args.pixel_judge_clips, device, args.pixel_judge_floor)
    except (OSError, ValueError, RuntimeError) as error:  # no IDM there, another format, or mismatched weights
        raise StageError(f"--pixel-judge {args.pixel_judge}: {error}") from error
    first = train_clips[0]
    problem = judged.judge.check(config.video_size, first["keyboard"].shape[-1], first["keyboard"].shape[0])
    if problem:
        raise StageError(f"--pixel-judge {args.pixel_judge} {problem}")
    return judged


def dit_of(folder: str, option: str, config: ModelConfig) -> CausalDiT:
    """The float32 DiT of model folder `folder` (given as `option`), which must have `config`'s DiT config."""
    existing_dir(folder, option, "give a model folder (config.json + safetensors)")
    loaded = load_model(folder, device="cpu", dtype=torch.float32)
    if loaded.config.dit != config.dit:
        changed = sorted(k for k in {*config.dit, *loaded.config.dit} if config.dit.get(k) != loaded.config.dit.get(k))
        raise StageError(
            f"{option} {folder}: its DiT config differs from --init's in {changed}; give a model of the same size"
        )
    return loaded.dit


def run(args: argparse.Namespace) -> Path:
    """Run (or continue) the stage; returns OUT/distill/model."""
    if args.init is None:
        raise StageError("distill needs --init MODEL_DIR: the model folder of `train dit` (OUT/dit/model)")
    if args.minutes <= args.finish_minutes:
        raise StageError(f"--minutes {args.minutes} leaves no time for training after --finish-minutes")
    if args.critic_steps < 1:
        raise StageError("--critic-steps must be at least 1")
    if args.data_weight < 0:
        raise StageError(f"--data-weight must be >= 0, got {args.data_weight}")
    if args.action_weight < 0:
        raise StageError(f"--action-weight must be >= 0, got {args.action_weight}")
    if args.pixel_judge_weight < 0 or (args.pixel_judge_weight > 0) != (args.pixel_judge is not None):
        raise StageError(
            f"--pixel-judge and --pixel-judge-weight > 0 go together (got {args.pixel_judge_weight}): the judge's "
            "loss needs a weight, and a weight needs a judge (an IDM folder saved by `matrixgame-env eval --idm-out`)"
        )
    if args.pixel_judge_clips < 1:
        raise StageError(f"--pixel-judge-clips must be at least 1, got {args.pixel_judge_clips}")
    if args.pixel_judge_floor and args.pixel_judge is None:
        raise StageError("--pixel-judge-floor sets how --pixel-judge's loss counts: give --pixel-judge too")
    training = TrainRun.from_args(args, STAGE, minutes=args.minutes - args.finish_minutes)
    config, initial, vae, clip, source = initial_model(args.init, args.model_config)
    if "dit" not in config.extra.get("training", {}):
        training.message(f"warning: {args.init} records no `train dit` stage; its DiT may be untrained")
    device = training.device
    if args.teacher is None:  # the --init DiT is the teacher, and the student starts as its copy
        teacher, student = initial, copy.deepcopy(initial)
    else:
        teacher, student = dit_of(args.teacher, "--teacher", config), initial
    critic = copy.deepcopy(teacher) if args.critic_init is None else dit_of(args.critic_init, "--critic-init", config)
    teacher.to(device).eval().requires_grad_(False)
    clip.to(device).eval().requires_grad_(False)
    student.to(device).train().requires_grad_(True)
    critic.to(device).train().requires_grad_(True)

    # The critic is only ever queried at one level for the whole clip: train it at such levels.
    critic_forcing = forcing_for(config.sampler, teacher, NoiseMix(per_block=0.0, uniform=1.0, clean_context=0.0))
    train_clips, val_clips = open_latent_splits(args.data, config, vae, args.frames, critic_forcing.frames_per_block)
    check_clips = fixed_batches(val_clips or train_clips, args.check_clips, args.batch_size)
    rollout = SelfForcingRollout(student, SamplerConfig.from_dict(config.sampler), config.latent_size)
    dmd = DistributionMatching(critic_forcing.scheduler, args.min_level, args.max_level, args.guidance)

    # beta1 = 0 as in DMD2 / Self-Forcing: both targets move every step.
    critic_lr = args.critic_lr or args.lr
    student_groups = parameter_groups(student, args.lr, args.action_lr_mult)
    critic_groups = parameter_groups(critic, critic_lr, args.action_lr_mult)
    student_optimizer = adamw(student_groups, args.lr, args.weight_decay, betas=(0.0, 0.999))
    critic_optimizer = adamw(critic_groups, critic_lr, args.weight_decay, betas=(0.0, 0.999))
    training.add_module("student", student, ema_decay=args.ema)
    training.add_module("critic", critic)
    training.add_optimizer(
        "student", student_optimizer, warmup_cosine(student_optimizer, args.warmup_steps, args.steps)
    )
    critic_schedule = warmup_cosine(
        critic_optimizer, args.warmup_steps * args.critic_steps, args.steps * args.critic_steps
    )
    training.add_optimizer("critic", critic_optimizer, critic_schedule)
    training.resume()

    # The student's data term: the `train dit` loss with that stage's default noise patterns.
    data_forcing = forcing_for(config.sampler, teacher, NoiseMix()) if args.data_weight else None
    reader = reader_judged = None
    if args.action_weight:
        reader, reader_judged = action_reader(args, training, train_clips, val_clips, student)
    pixel_judge = decoded_clip_judge(args, config, vae, train_clips, device) if args.pixel_judge_weight else None
    distillation = Distillation(
        training, teacher, student, critic, clip, rollout, dmd, critic_forcing, args.critic_steps,
        data_forcing, args.data_weight, reader, args.action_weight, pixel_judge, args.pixel_judge_weight,
    )  # fmt: skip
    if not training.finished:
        training.local_batch_size(args.batch_size)  # each process takes its share of every part of a step
        # One loader batch per step, so that a resumed run continues at the right one.
        loader = training.batches(train_clips, args.batch_size * (args.critic_steps + 1), args.workers)
        while training.keep_going():
            training.end_step(**distillation.step(ClipBatch.from_item(next(loader), device)))
        training.save()
    parts = (training.weights("student"), vae, clip)
    trends = ("dmd_loss", "critic_loss")
    if args.guidance != 1.0:  # the student learned the guided teacher: guiding it again would overshoot
        sampler = {k: v for k, v in config.sampler.items() if k != "keyboard_guidance"}
        config.sampler = {**sampler, "action_guidance": 1.0}
    settings = {"teacher_guidance": args.guidance}
    for name, folder in (("teacher", args.teacher), ("critic_init", args.critic_init)):
        if folder is not None:
            settings[name] = str(folder)
    if args.data_weight:
        settings["data_weight"] = args.data_weight
    if args.action_weight:
        settings["action_weight"] = args.action_weight
        settings["action_reader_on_real_latents"] = reader_judged
    if pixel_judge is not None:
        settings.update(
            pixel_judge=pixel_judge.judge.source,
            pixel_judge_sha256=pixel_judge.judge.sha256,
            pixel_judge_weight=args.pixel_judge_weight,
            pixel_judge_clips=args.pixel_judge_clips,
            pixel_judge_floor=args.pixel_judge_floor,
        )
    folder = export_and_check(
        training, STAGE, config, parts, source, check_clips, args.check_blocks, trends, settings=settings
    )
    if not training.finished:
        training.message(f"stopped at step {training.step}/{training.total_steps}; continue with --resume")
    training.close()
    return folder
