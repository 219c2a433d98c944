"""Pilot: does a decoder shown each video frame's recent actions draw the keys where they happen?

The generated video of doom-small loses the keys in the first half of each latent frame (the DiT shows
a key change late when it falls early among a latent frame's 4 video frames), and the frames read as
walking for a while after W is released. The world model knows every frame's action when it decodes,
so a decoder can be told them (`nn/frame_actions.py`). This pilot fine-tunes a model's decoder on its
frozen encoder's latents of real clips twice, side by side and alike but for the actions (a control
without them), and reads what each draws:

    python scripts/decoder_actions_pilot.py train --model MODEL --data DATA --out DIR/control --steps N
    python scripts/decoder_actions_pilot.py train --model MODEL --data DATA --out DIR/actions --steps N --lags 3
    python scripts/decoder_actions_pilot.py latents --model MODEL --data DATA --out DIR/generated.pt
    python scripts/decoder_actions_pilot.py judge --model MODEL --generated DIR/generated.pt --idm IDM \\
        --decoders DIR/control DIR/actions --out DIR/report.json

`latents` generates the latents of `matrixgame-env eval`'s held-out clips (the same clips, actions and
seeds) once; `judge` decodes them with each decoder (and with the model's own), decodes the VAE round
trip of the real clips likewise, and scores both: PSNR and SSIM to the real frames at 0.5 / 1 / 2 / 4 s,
and the IDM's keys and yaw, whole and by phase within a latent frame. A decoder folder holds
`decoder.safetensors` (the decoder's weights) and `decoder.json` (its VAE config and training record).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matrixgame_env.data.dataset import VideoClipDataset  # noqa: E402
from matrixgame_env.eval.fidelity import clip_frames, frame_scores, horizon_frames, roll_out  # noqa: E402
from matrixgame_env.eval.idm import judge_clips, load_idm  # noqa: E402
from matrixgame_env.eval.intervals import paired_interval  # noqa: E402
from matrixgame_env.eval.real_data import FrameWindows, resize_frames  # noqa: E402
from matrixgame_env.images import to_uint8_frames  # noqa: E402
from matrixgame_env.nn.frame_actions import frame_action_features  # noqa: E402
from matrixgame_env.nn.vae import WanVAE  # noqa: E402
from matrixgame_env.train.vae import reconstruction_losses  # noqa: E402
from matrixgame_env.weights import save_safetensors  # noqa: E402
from matrixgame_env.world.model import WorldModel  # noqa: E402

DECODER_WEIGHTS = "decoder.safetensors"
DECODER_CONFIG = "decoder.json"
SECONDS = (0.5, 1.0, 2.0, 4.0)


def vae_with_actions(vae: WanVAE, lags: int) -> WanVAE:
    """A copy of `vae` whose decoder is shown `lags` frames of actions (0: a plain copy), decoding as
    `vae` does until trained (the modulations start at zero)."""
    keys, mouse = 4, 2
    config = {**vae.config, "decoder_frame_actions": lags * (keys + mouse)} if lags else vae.config
    copy = WanVAE.from_config(config)
    result = copy.load_state_dict(vae.state_dict(), strict=False)
    unexpected = [k for k in result.missing_keys if ".frame_modulations." not in k] + list(result.unexpected_keys)
    if unexpected:
        raise ValueError(f"the VAE's weights do not fit the copy: {unexpected}")
    return copy


def features_for(vae: WanVAE, lags: int, keyboard: torch.Tensor, mouse: torch.Tensor) -> torch.Tensor | None:
    return frame_action_features(keyboard, mouse, lags) if vae.decoder.shown_actions else None


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    world = WorldModel.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    vae = vae_with_actions(world.vae, args.lags)
    del world
    for module in (vae.encoder, vae.conv1):
        module.requires_grad_(False)
    clips = VideoClipDataset(args.data, clip_frames=args.clip_frames, split="train", val_fraction=args.val_fraction,
                             size=tuple(args.size))  # fmt: skip
    generator = torch.Generator().manual_seed(args.seed)
    new, old = [], []  # the modulations, and the rest of the decoder (the encoder half is frozen)
    for name, p in vae.named_parameters():
        if p.requires_grad:
            (new if ".frame_modulations." in name else old).append(p)
    groups = [{"params": old, "lr": args.lr}] + ([{"params": new, "lr": args.lr * args.new_lr_mult}] if new else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    std = torch.as_tensor(vae.config["latent_std"]).view(1, -1, 1, 1, 1)
    log, started = [], time.monotonic()
    vae.train()
    for step in tqdm(range(1, args.steps + 1), desc="decoder", unit="step"):
        chosen = torch.randint(len(clips), (args.batch_size,), generator=generator).tolist()
        items = [clips[i] for i in chosen]
        video = torch.stack([item["video"] for item in items])
        keyboard = torch.stack([item["keyboard"] for item in items])
        mouse = torch.stack([item["mouse"] for item in items])
        with torch.no_grad():
            mu, _ = vae.encode_distribution(video)
            mu = mu + args.latent_noise * std * torch.randn(mu.shape, generator=generator)
        decoded = vae.decode_unnormalised(mu, features_for(vae, args.lags, keyboard, mouse))
        losses = reconstruction_losses(decoded, video, args.edge_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        log.append({"step": step, **{k: round(float(losses[k].detach()), 5) for k in ("loss", "l1", "mse", "psnr")}})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "conv2."))},
                     out / DECODER_WEIGHTS)  # fmt: skip
    record = {"vae": vae.config, "lags": args.lags, "steps": args.steps, "batch_size": args.batch_size,
              "clip_frames": args.clip_frames, "lr": args.lr, "new_lr_mult": args.new_lr_mult,
              "latent_noise": args.latent_noise, "edge_weight": args.edge_weight, "seed": args.seed,
              "model": str(args.model), "data": str(args.data), "seconds": round(time.monotonic() - started, 1),
              "log": log}  # fmt: skip
    (out / DECODER_CONFIG).write_text(json.dumps(record, indent=1) + "\n")
    first, last = log[: min(10, len(log))], log[-min(10, len(log)) :]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print(f"{out}: loss {mean(first, 'loss'):.4f} -> {mean(last, 'loss'):.4f}, PSNR {mean(first, 'psnr'):.2f} -> "
          f"{mean(last, 'psnr'):.2f} dB (means of the first and last 10 steps)")  # fmt: skip


def eval_clips(world: WorldModel, data: str, clips: int, horizon_s: float, val_fraction: float) -> dict:
    """The held-out clips `matrixgame-env eval` scores: real frames at the model's size and actions."""
    length = clip_frames(world, horizon_frames(horizon_s, world.config.fps))
    windows = FrameWindows(data, "val", length, val_fraction, stride=length)
    items = windows.stack(windows.evenly_spaced(clips))
    real = resize_frames(items["frames"], world.video_size)
    return {"real": real, "keyboard": items["keyboard"], "mouse": items["mouse"]}


@torch.no_grad()
def latents(args: argparse.Namespace) -> None:
    world = WorldModel.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    items = eval_clips(world, args.data, args.clips, args.horizon_s, args.val_fraction)
    generated = roll_out(world, world.step_latents, 2, items["real"][:, 0], items["keyboard"], items["mouse"],
                         args.batch_size, args.seed)  # fmt: skip
    torch.save({**items, "latents": generated, "seed": args.seed, "model": str(args.model)}, args.out)
    print(f"{args.out}: latents {tuple(generated.shape)} of {len(generated)} clips")


def load_decoder(world: WorldModel, folder: Path) -> tuple[WanVAE, int]:
    record = json.loads((folder / DECODER_CONFIG).read_text())
    vae = vae_with_actions(world.vae, record["lags"])
    result = vae.load_state_dict(load_file(folder / DECODER_WEIGHTS), strict=False)
    if result.unexpected_keys or any(k.startswith(("decoder.", "conv2.")) for k in result.missing_keys):
        raise ValueError(f"{folder}: decoder weights do not fit: {result}")
    return vae.eval(), record["lags"]


def decode(vae: WanVAE, lags: int, latents: torch.Tensor, keyboard, mouse, batch_size: int = 8) -> torch.Tensor:
    """Normalised latents [K, C, F, h, w] -> uint8 frames [K, T, H, W, 3]."""
    out = []
    for first in range(0, len(latents), batch_size):
        part = slice(first, first + batch_size)
        features = features_for(vae, lags, keyboard[part], mouse[part])
        video = vae.decode_unnormalised(vae.denormalise(latents[part]), features).clamp(-1, 1)
        out.append(to_uint8_frames(video.transpose(1, 2)))
    return torch.cat(out)


def scores(real: torch.Tensor, frames: torch.Tensor, fps: float, judge, keyboard, mouse) -> dict:
    per_frame = frame_scores(real, frames)
    points = {f"{s:g}s": math.floor(s * fps + 0.5) for s in SECONDS if math.floor(s * fps + 0.5) < real.shape[1]}
    judged, by_phase, _ = judge_clips(judge, frames, keyboard, mouse)
    return {
        "psnr": {label: float(per_frame["psnr"][:, t].mean()) for label, t in points.items()},
        "ssim": {label: float(per_frame["ssim"][:, t].mean()) for label, t in points.items()},
        "psnr_clips": {label: [round(float(v), 4) for v in per_frame["psnr"][:, t]] for label, t in points.items()},
        "keys": judged["keyboard"],
        "yaw_direction": judged["yaw_direction"],
        "keys_per_key": judged["keyboard_per_key"],
        "by_phase": by_phase,
        "per_clip": judged["per_clip"],
    }


@torch.no_grad()
def judge(args: argparse.Namespace) -> None:
    world = WorldModel.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    saved = torch.load(args.generated, weights_only=True)
    real, keyboard, mouse = saved["real"], saved["keyboard"], saved["mouse"]
    idm = load_idm(args.idm, "cpu")
    real_latents = torch.cat([world.vae.encode(real[i : i + 8].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0)
                              for i in range(0, len(real), 8)])  # fmt: skip
    report = {"clips": len(real), "frames": real.shape[1], "generated": str(args.generated), "idm": str(args.idm)}
    judged_real, phases_real, _ = judge_clips(idm, real, keyboard, mouse)
    report["real"] = {"judged": judged_real, "by_phase": phases_real}
    decoders = [("model's own", None), *[(str(folder), Path(folder)) for folder in args.decoders]]
    for name, folder in decoders:
        vae, lags = (world.vae.eval(), 0) if folder is None else load_decoder(world, folder)
        entry = {}
        for kind, source in (("generated", saved["latents"]), ("round_trip", real_latents)):
            frames = decode(vae, lags, source, keyboard, mouse)
            entry[kind] = scores(real, frames, world.config.fps, idm, keyboard, mouse)
        report[name] = entry
        g, r = entry["generated"], entry["round_trip"]
        print(f"{name}: generated keys {_fmt(g['keys'])} yaw {_fmt(g['yaw_direction'])} "
              f"PSNR {' / '.join(f'{v:.2f}' for v in g['psnr'].values())}; round trip keys {_fmt(r['keys'])} "
              f"yaw {_fmt(r['yaw_direction'])} PSNR {r['psnr'].get('1s', float('nan')):.2f}; "
              f"generated keys by phase {' / '.join(f'{v:.3f}' for v in g['by_phase']['keyboard'])}")  # fmt: skip
    if len(args.decoders) > 1:  # each later decoder against the first (the control), clip by clip
        first = str(args.decoders[0])
        report["against_first"] = {str(f): paired(report[first], report[str(f)]) for f in args.decoders[1:]}
        for name, pairs in report["against_first"].items():
            for kind, rows in pairs.items():
                print(f"{name} - {first}, {kind}: " + "; ".join(f"{k} {v['text']}" for k, v in rows.items()))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def paired(before: dict, after: dict) -> dict:
    """Clip-by-clip differences (after - before) of two decoders' scores with their 95 % bootstrap intervals:
    PSNR at each horizon, the IDM's keys and yaw direction; for the generated clips and the round trip."""
    out = {}
    for kind in ("generated", "round_trip"):
        a, b = before[kind], after[kind]
        rows = {f"psnr_{label}": (a["psnr_clips"][label], b["psnr_clips"][label]) for label in a["psnr_clips"]}
        rows["keys"] = (a["per_clip"]["keyboard"], b["per_clip"]["keyboard"])
        rows["yaw_direction"] = (a["per_clip"]["yaw_direction"], b["per_clip"]["yaw_direction"])
        out[kind] = {}
        for name, (x, y) in rows.items():
            interval = paired_interval(x, y)
            out[kind][name] = {**interval.as_dict(), "text": interval.format(3 if "psnr" not in name else 2)}
    return out


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="fine-tune the decoder (with --lags: shown the actions)")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--lags", type=int, default=0, help="frames of actions each video frame is shown (0: none)")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--clip-frames", type=int, default=9)
    t.add_argument("--size", type=int, nargs=2, default=(96, 176))
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--new-lr-mult", type=float, default=10.0, help="learning-rate factor of the new modulations")
    t.add_argument("--latent-noise", type=float, default=0.05)
    t.add_argument("--edge-weight", type=float, default=0.5)
    t.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of episodes, as eval's")
    t.add_argument("--seed", type=int, default=0)
    g = commands.add_parser("latents", help="generate the latents of eval's held-out clips")
    g.add_argument("--model", required=True)
    g.add_argument("--data", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--clips", type=int, default=32)
    g.add_argument("--horizon-s", type=float, default=4.0)
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    j = commands.add_parser("judge", help="decode the generated latents and the round trip with each decoder")
    j.add_argument("--model", required=True)
    j.add_argument("--generated", required=True)
    j.add_argument("--idm", required=True)
    j.add_argument("--decoders", nargs="*", default=[])
    j.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    {"train": train, "latents": latents, "judge": judge}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
