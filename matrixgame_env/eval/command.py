"""`matrixgame-env eval`: a world model against the real game, on held-out recordings.

    matrixgame-env eval --model doom-small --data data/doom --out runs/eval \\
        --clips 32 --horizon-s 4 --drift-minutes 10 --steps 2000

Writes OUT/eval.json (settings, fidelity per horizon, IDM accuracy, drift, targets, timings),
OUT/eval.png (the figure) and, when the inverse-dynamics model is trained here, OUT/idm/ (reuse it
with --idm). Parts can be skipped: --clips 0 (fidelity and the IDM on generated video),
--steps 0 without --idm (the IDM), --drift-minutes 0 (drift).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..dtype_names import add_dtype_argument, dtype_from_name

DEFAULT_HORIZON_S = 4.0
DEFAULT_DRIFT_MINUTES = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `matrixgame-env eval`."""
    parser.add_argument("--model", default="doom-small", help="preset name, model folder or hub id")
    parser.add_argument("--data", required=True, help="a recording (matrixgame-env record); its held-out episodes")
    parser.add_argument("--out", required=True, help="folder for eval.json, eval.png and the trained IDM")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of episodes, as `train encode`")
    parser.add_argument("--clips", type=int, default=32, help="held-out clips generated and compared (0: skip)")
    parser.add_argument("--horizon-s", type=float, default=DEFAULT_HORIZON_S, help="seconds generated per clip")
    parser.add_argument("--batch-size", type=int, default=8, help="worlds generated together")
    parser.add_argument("--idm", default=None, help="a trained inverse-dynamics model folder (default: train one)")
    parser.add_argument("--also-judge", action="append", default=[], metavar="IDM",
                        help="another trained IDM folder that reads the same clips, reported beside the main one "
                             "(idm.also); repeat for more")  # fmt: skip
    parser.add_argument("--idm-out", default=None, help="where to save the trained IDM (default: OUT/idm)")
    parser.add_argument("--steps", type=int, default=2000, help="IDM training steps (0 without --idm: no IDM)")
    parser.add_argument("--idm-batch-size", type=int, default=64, help="IDM training batch size")
    parser.add_argument("--idm-lr", type=float, default=1e-3, help="IDM learning rate (AdamW, cosine decay)")
    parser.add_argument("--idm-width", type=int, default=32, help="IDM channels of the first conv layer")
    parser.add_argument("--idm-context", type=int, default=3, help="frames the trained IDM reads per window")
    parser.add_argument("--idm-before", type=int, default=1,
                        help="window frames before the labelled one (at least one comes after it)")  # fmt: skip
    parser.add_argument("--drift-minutes", type=float, default=DEFAULT_DRIFT_MINUTES,
                        help="minutes of video time rolled out for drift (0: skip)")  # fmt: skip
    parser.add_argument("--drift-worlds", type=int, default=4, help="worlds rolled out together for drift")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes for IDM training")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    add_dtype_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of generation noise and IDM training")
    parser.add_argument(
        "--action-guidance",
        type=float,
        default=None,
        help="sampler action guidance for this evaluation (default: the model's own; 1: off)",
    )
    parser.add_argument(
        "--keyboard-guidance",
        type=float,
        default=None,
        help="a separate guidance scale for the keyboard (default: the model's own, else the action guidance; "
        "a different value costs a third DiT pass per step)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> Path:
    """Run the evaluation; returns the path of eval.json."""
    from ..cli import CommandError, _check_local_model
    from ..data.storage import read_manifest
    from ..world.model import WorldModel
    from .real_data import check_recording

    _check_arguments(args, CommandError)
    started = time.monotonic()
    manifest = read_manifest(args.data)  # a missing recording is reported before the model loads
    _check_local_model(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    world = WorldModel.from_pretrained(args.model, device=device, dtype=dtype_from_name(args.dtype))
    if args.action_guidance is not None:
        world.sampler.set_action_guidance(args.action_guidance)
    if args.keyboard_guidance is not None:
        world.sampler.set_keyboard_guidance(args.keyboard_guidance)
    try:
        check_recording(manifest, world.config.fps, world.sampler.keyboard_dim, world.sampler.mouse_dim, args.data)
    except ValueError as error:
        raise CommandError(str(error)) from error
    # given judges load before anything is generated, so that a wrong folder fails at once
    main_judge = None if args.idm is None else _load_judge(args.idm, world, device)
    other_judges = [_load_judge(folder, world, device) for folder in args.also_judge]
    timing: dict[str, float] = {"load": time.monotonic() - started}
    report: dict[str, Any] = {"settings": _settings(args, world, manifest, device)}
    clips = _fidelity(args, world, report, timing)
    _idm(args, world, report, timing, clips, out, device, manifest, main_judge, other_judges)
    _drift(args, world, report, timing)
    report["timing_s"] = {**timing, "total": time.monotonic() - started}
    return _write(report, out)


def _fidelity(args: argparse.Namespace, world, report: dict, timing: dict) -> dict | None:
    """Generate the held-out clips and score them; returns the real and generated clips for the IDM."""
    from .fidelity import clip_frames, evaluate_fidelity, generate_clips, horizon_frames, reconstruct_clips
    from .real_data import resize_frames

    if args.clips == 0:
        return None
    started = time.monotonic()
    horizon = horizon_frames(args.horizon_s, world.config.fps)
    length = clip_frames(world, horizon)
    windows = _windows(args, "val", length, stride=length)
    chosen = windows.evenly_spaced(args.clips)
    items = windows.stack(chosen)
    real = resize_frames(items["frames"], world.video_size)
    generated = generate_clips(world, real[:, 0], items["keyboard"], items["mouse"], args.batch_size, args.seed,
                               progress=not args.no_progress)  # fmt: skip
    timing["generate"] = time.monotonic() - started
    started = time.monotonic()
    sources = [windows.source(i) for i in chosen]
    reconstructed = reconstruct_clips(world, real, args.batch_size)
    report["fidelity"] = evaluate_fidelity(world, real, generated, horizon, sources=sources, batch_size=args.batch_size,
                                           reconstructed=reconstructed)  # fmt: skip
    report["fidelity"]["clips_available"] = len(windows)
    timing["fidelity_scores"] = time.monotonic() - started
    return {"real": real, "generated": generated, "reconstructed": reconstructed, "keyboard": items["keyboard"],
            "mouse": items["mouse"]}  # fmt: skip


def _idm(
    args: argparse.Namespace,
    world,
    report: dict,
    timing: dict,
    clips: dict | None,
    out: Path,
    device,
    manifest,
    main_judge: tuple[Any, dict[str, Any]] | None,
    other_judges: list[tuple[Any, dict[str, Any]]],
) -> None:
    """The IDM section: the main judge (--idm's `main_judge`, or one trained here) and the --also-judge
    ones (`other_judges`) reading the held-out episodes and the clips."""
    from .idm import IDMConfig, TrainSettings, save_idm, train_idm

    if main_judge is None and args.steps == 0:
        return
    started = time.monotonic()
    if main_judge is not None:
        model, section = main_judge
    else:
        config = IDMConfig(video_size=world.video_size, width=args.idm_width, context=args.idm_context,
                           before=args.idm_before)  # fmt: skip
        settings = TrainSettings(args.steps, args.idm_batch_size, args.idm_lr, seed=args.seed, workers=args.workers)
        train = _windows(args, "train", config.context)
        model, history = train_idm(train, config, settings, device, progress=not args.no_progress)
        section = {"training": {"steps": settings.steps, "batch_size": settings.batch_size, "lr": settings.lr,
                                "windows": len(train), "loss": history}}  # fmt: skip
        timing["idm_train"] = time.monotonic() - started
        started = time.monotonic()
    section.update(_judge_readings(args, model, clips, by_parts=True))
    if main_judge is None:  # trained here: saved
        idm_out = Path(args.idm_out) if args.idm_out else out / "idm"
        save_idm(model, idm_out, {"training": section["training"], "accuracy_real_val": section["real_val"],
                                  "data": str(Path(args.data).resolve())})  # fmt: skip
        section["saved"] = str(idm_out)
    if other_judges:  # the same clips read by more judges: how far the figures depend on the judge
        section["also"] = [{**entry, **_judge_readings(args, judge, clips, by_parts=False)}
                           for judge, entry in other_judges]  # fmt: skip
    section["readable_from_motion"] = _key_readability(args, manifest)
    timing["idm_eval"] = time.monotonic() - started
    report["idm"] = section


def _load_judge(folder: str, world, device) -> tuple[Any, dict[str, Any]]:
    """A trained IDM and its report entry: where it is, its weights' hash, and whether the model's VAE
    was trained against it."""
    from .idm import idm_weights_sha256, load_idm

    try:
        model = load_idm(folder, device)
    except (OSError, ValueError, RuntimeError) as error:  # none there, another format, or mismatched weights
        from ..cli import CommandError

        raise CommandError(f"cannot use the IDM at {folder}: {error}") from error
    entry: dict[str, Any] = {"source": str(Path(folder).resolve()), "sha256": idm_weights_sha256(folder)}
    if entry["sha256"] in _action_judges(world.config.extra.get("training", {})):
        entry["trained_against"] = True  # the VAE or the DiT learned to please this very judge: not independent
    return model, entry


def _judge_readings(args: argparse.Namespace, model, clips: dict | None, by_parts: bool) -> dict[str, Any]:
    """What an IDM reads: its config, the held-out episodes, and (with clips) the real clips, the generated
    ones and the VAE round trip of the real ones (`by_parts`: also by phase and yaw size)."""
    from .idm import evaluate_split, judge_clips, share_above_chance

    config = model.config
    described = {"context": config.context, "before": config.before, "video_size": list(config.video_size),
                 "yaw_dead_zone": config.yaw_dead_zone, "width": config.width}  # fmt: skip
    readings = {"config": described, "real_val": evaluate_split(model, _windows(args, "val", config.context))}
    if clips is not None:  # the same windows of the same clips, real and generated
        # "vae_round_trip": what survives of the actions in the VAE round trip of the real clips, about what a
        # DiT that renders them as the game does can reach (one that exaggerates them can score higher).
        for key, frames in (("real_clips", "real"), ("generated", "generated"), ("vae_round_trip", "reconstructed")):
            judged, by_phase, by_size = judge_clips(model, clips[frames], clips["keyboard"], clips["mouse"])
            readings[key] = {**judged, "by_phase": by_phase, "yaw_by_size": by_size} if by_parts else judged
        readings["generated_share_of_round_trip"] = share_above_chance(readings["generated"],
                                                                       readings["vae_round_trip"])  # fmt: skip
        readings["generated_above_real"] = reads_above_real(readings["generated"], readings["real_clips"])
    return readings


def reads_above_real(generated: dict[str, Any], real: dict[str, Any], margin: float = 0.01) -> list[str]:
    """The measures ("keyboard", "yaw_direction") an IDM reads more than `margin` better in generated
    video than in the real frames of the same clips under the same actions. A faithful model reads at
    most as well as the game; above it the video exaggerates its actions, or a judge of pixels that the
    model was trained against (`train distill --pixel-judge`, `train vae --action-judge`) taught it
    cues that this IDM reads too: judges of one kind trained on the same frames share what they read."""
    return [name for name in ("keyboard", "yaw_direction") if generated[name] > real[name] + margin]


def _action_judges(record: Any) -> set[str]:
    """The weights hashes of every IDM a training record trained against: a VAE's `--action-judge`, a
    distillation's `--pixel-judge`, also in the records they continued and in lists such as a model
    card's `decoder_stages`."""
    if isinstance(record, list):
        return set().union(*(_action_judges(item) for item in record))
    if not isinstance(record, dict):
        return set()
    found = {
        value for key in ("action_judge_sha256", "pixel_judge_sha256") if isinstance(value := record.get(key), str)
    }
    for value in record.values():
        found |= _action_judges(value)
    return found


def _key_readability(args: argparse.Namespace, manifest) -> dict[str, Any]:
    """How well the held-out episodes' keys can be read from the player's true motion: the limit any
    judge of frames meets (see `key_readability`); a note instead for recordings without positions."""
    from ..data.dataset import validation_episodes
    from .key_readability import key_readability

    episodes = validation_episodes(manifest.episodes, args.val_fraction)
    try:
        return key_readability(args.data, episodes=episodes, manifest=manifest)
    except ValueError as error:
        return {"unavailable": str(error)}


def _drift(args: argparse.Namespace, world, report: dict, timing: dict) -> None:
    from .drift import REAL_FRAMES, drift_report, real_ranges, rollout_statistics
    from .real_data import resize_frames, split_actions

    if args.drift_minutes == 0:
        return
    started = time.monotonic()
    pairs = _windows(args, "val", 2)
    ranges = real_ranges(pairs, world.video_size, device=world.device)
    singles = _windows(args, "val", 1)
    chosen = singles.evenly_spaced(args.drift_worlds)
    starts = resize_frames(singles.stack(chosen)["frames"][:, 0], world.video_size)
    frames = math.ceil(args.drift_minutes * 60 * world.config.fps - 1e-6)  # 1e-6: no extra block for rounding
    statistics = rollout_statistics(world, starts, split_actions(singles), frames, seed=args.seed + 1_000_003,
                                    progress=not args.no_progress)  # fmt: skip
    section = drift_report(statistics, ranges, world.config.fps)
    section["minutes"] = section["frames"] / world.config.fps / 60
    section["real_frames"] = min(len(pairs), REAL_FRAMES)
    section["sources"] = [singles.source(i) for i in chosen]
    report["drift"] = section
    timing["drift"] = time.monotonic() - started


def _windows(args: argparse.Namespace, split: str, length: int, stride: int = 1):
    """Windows of the recording, or the command's error when the split cannot provide them."""
    from ..cli import CommandError
    from .real_data import FrameWindows

    try:
        return FrameWindows(args.data, split, length, args.val_fraction, stride=stride)
    except ValueError as error:
        raise CommandError(str(error)) from error


def _write(report: dict[str, Any], out: Path) -> Path:
    from .report import check_targets, plot_report, write_json

    report["targets"] = check_targets(report)
    path = write_json(report, out / "eval.json")
    plot_report(report, out / "eval.png")
    for line in summary_lines(report):
        print(line)
    print(f"wrote {path} and {out / 'eval.png'}")
    return path


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few printed lines with the headline numbers of a report."""
    lines = []
    fidelity = report.get("fidelity")
    if fidelity:
        for label, entry in fidelity["at"].items():
            model, baseline = entry["model"], entry["copy_last_frame"]
            lines.append(f"fidelity at {label}: PSNR {model['psnr']:.2f} dB (copy last frame {baseline['psnr']:.2f}), "
                         f"SSIM {model['ssim']:.3f} (copy last frame {baseline['ssim']:.3f})")  # fmt: skip
    for key in ("real_val", "real_clips", "vae_round_trip", "generated"):
        result = report.get("idm", {}).get(key)
        if result:
            chance = result["chance"]
            lines.append(f"IDM on {key}: keys {result['keyboard']:.3f} (chance {chance['keyboard']:.3f}, "
                         f"balanced {result['keyboard_balanced']:.3f}), exact {result['keyboard_exact']:.3f}, "
                         f"yaw direction {result['yaw_direction']:.3f} (chance {chance['yaw_direction']:.3f}, "
                         f"balanced {result['yaw_direction_balanced']:.3f}), {result['frames']} frames")  # fmt: skip
            sizes = result.get("yaw_by_size")
            if sizes and sizes["yaw_direction"][-1] is not None:
                low, clear, count = sizes["bands"][-1][0], sizes["yaw_direction"][-1], sizes["windows"][-1]
                lines.append(f"  yaw direction of clear turns (|yaw| > {low:g}): {clear:.3f} of {count} frames")
    if report.get("idm", {}).get("trained_against"):
        lines.append("note: this model was trained against this IDM (train vae --action-judge or train distill "
                     "--pixel-judge): its reads are not an independent measure; judge with another IDM")  # fmt: skip
    above = report.get("idm", {}).get("generated_above_real")
    if above:
        lines.append(f"note: the generated video reads better than the real frames in {' and '.join(above)}: the "
                     "model exaggerates those actions, or learned from a judge of pixels what this IDM reads too; "
                     "not a sign of fidelity")  # fmt: skip
    for other in report.get("idm", {}).get("also", []):
        config, parts = other["config"], []
        for key, label in (("generated", "generated"), ("real_clips", "real clips"), ("vae_round_trip", "round trip")):
            if key in other:
                parts.append(f"{label} keys {other[key]['keyboard']:.3f}, yaw {other[key]['yaw_direction']:.3f}")
        if not parts:
            parts.append(f"held-out episodes keys {other['real_val']['keyboard']:.3f}, "
                         f"yaw {other['real_val']['yaw_direction']:.3f}")  # fmt: skip
        against = "; the model was trained against this judge" if other.get("trained_against") else ""
        lines.append(f"also judged by {other['source']} ({config['context']} frames, {config['before']} before): "
                     f"{'; '.join(parts)}{against}")  # fmt: skip
    shares = report.get("idm", {}).get("generated_share_of_round_trip")
    if shares:
        told = ", ".join(f"{name} {'-' if v is None else f'{v:.2f}'}" for name, v in shares.items())
        lines.append(f"generated video reads, of what the VAE round trip reads above chance: {told} "
                     "(near 1: the VAE is the limit; lower: the DiT)")  # fmt: skip
    readable = report.get("idm", {}).get("readable_from_motion", {}).get("mean")
    if readable:
        lines.append(f"keys readable from the player's true motion (held-out episodes): {readable['readable']:.3f} "
                     f"(chance {readable['chance']:.3f}): the most a judge of frames can expect")  # fmt: skip
    drift = report.get("drift")
    if drift:
        shares = ", ".join(f"{name} {v['in_range_share']:.2f}" for name, v in drift["statistics"].items())
        onsets = {name: drift["statistics"][name].get("onset") for name in drift["collapsed_statistics"]}
        named = [name if onset is None else f"{name}, {onset}" for name, onset in onsets.items()]
        verdict = f"collapsed ({'; '.join(named)})" if drift["collapsed"] else "no collapse"
        lines.append(f"drift over {drift['minutes']:.2f} min: {verdict}; share in the real range: {shares}")
    for name, target in report.get("targets", {}).items():
        state = {True: "met", False: "NOT met", None: "not measured"}[target["passed"]]
        lines.append(f"target {name} ({target['target']}): {state}")
    return lines


def _settings(args: argparse.Namespace, world, manifest, device: torch.device) -> dict[str, Any]:
    return {
        "model": str(args.model),
        "data": str(Path(args.data).resolve()),
        "val_fraction": args.val_fraction,
        "clips": args.clips,
        "horizon_s": args.horizon_s,
        "drift_minutes": args.drift_minutes,
        "drift_worlds": args.drift_worlds,
        "idm": args.idm,
        "also_judge": list(args.also_judge),
        "idm_steps": None if args.idm else args.steps,  # a given IDM was trained elsewhere (its idm.json)
        "seed": args.seed,
        "action_guidance": world.sampler.config.action_guidance,
        "keyboard_guidance": world.sampler.config.effective_keyboard_guidance,
        "device": str(device),
        "dtype": str(world.dit.dtype).removeprefix("torch."),
        "fps": world.config.fps,
        "video_size": list(world.video_size),
        "recorded_size": list(manifest.frame_size),
        "torch": torch.__version__,
    }


def _check_arguments(args: argparse.Namespace, error: type[Exception]) -> None:
    checks = [
        (args.clips >= 0, f"--clips must be 0 or more, got {args.clips}"),
        (args.horizon_s > 0, f"--horizon-s must be positive, got {args.horizon_s}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.steps >= 0, f"--steps must be 0 or more, got {args.steps}"),
        (args.idm_batch_size >= 1, f"--idm-batch-size must be at least 1, got {args.idm_batch_size}"),
        (args.idm_width >= 1, f"--idm-width must be at least 1, got {args.idm_width}"),
        (args.idm_context >= 2, f"--idm-context must be at least 2 frames, got {args.idm_context}"),
        (
            0 <= args.idm_before < args.idm_context - 1,
            f"--idm-before must be 0 to --idm-context - 2 (one frame after the labelled one at least), got "
            f"{args.idm_before} with --idm-context {args.idm_context}",
        ),
        (args.drift_minutes >= 0, f"--drift-minutes must be 0 or more, got {args.drift_minutes}"),
        (args.drift_worlds >= 1, f"--drift-worlds must be at least 1, got {args.drift_worlds}"),
        (0 <= args.val_fraction < 1, f"--val-fraction must be in [0, 1), got {args.val_fraction}"),
        (
            args.action_guidance is None or (math.isfinite(args.action_guidance) and args.action_guidance >= 1),
            f"--action-guidance must be a finite number >= 1 (1: off), got {args.action_guidance}",
        ),
        (
            args.keyboard_guidance is None or (math.isfinite(args.keyboard_guidance) and args.keyboard_guidance >= 1),
            f"--keyboard-guidance must be a finite number >= 1 (1: off), got {args.keyboard_guidance}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise error(message)
