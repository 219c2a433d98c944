"""Does a judge of pixels teach cues that another judge reads too, without the frames getting truer?

    python scripts/judge_transfer_pilot.py --data ENCODED --out REPORT.json [--clips 8 --steps 6 --lr 0.05]

The model's student generates clips from the start pictures and under the recorded actions of encoded
clips (a `train encode` folder's train split, clips spread over it). Their latents are then optimised directly by Adam
on a training judge's loss (`ActionJudge`, default models/next/action-judge-w24) through the model's
frozen decoder: the strongest form of what `train distill --pixel-judge` asks of a student. At half the
steps and at the end the report gives what the scoring IDM (default the one `eval` uses) and the training
judge read (keys, yaw direction, keys by phase within a latent frame), and the PSNR of the frames to their
start and to the VAE round trip of the real clips (a proxy for the real frames). `--floor` optimises the
loss of `--pixel-judge-floor` instead: each window only above the judge's loss on that round trip. Runs on the CPU in
bfloat16 autocast for the optimisation; about 1 minute a step for 8 clips on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matrixgame_env.checkpoints import load_model  # noqa: E402
from matrixgame_env.eval.idm import judge_clips, load_idm  # noqa: E402
from matrixgame_env.train.action_judge import ActionJudge  # noqa: E402
from matrixgame_env.train.conditions import ClipBatch, build_conditions  # noqa: E402
from matrixgame_env.train.latent_clips import open_latent_splits  # noqa: E402
from matrixgame_env.train.pixel_judge import DecodedClipJudge  # noqa: E402
from matrixgame_env.train.self_forcing import SelfForcingRollout  # noqa: E402
from matrixgame_env.world.sampler import SamplerConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a `train encode` folder made with the model's VAE")
    parser.add_argument("--out", required=True, help="the JSON report to write")
    parser.add_argument("--model", default="models/doom-small")
    parser.add_argument("--judge", default="models/next/action-judge-w24", help="the IDM whose loss is optimised")
    parser.add_argument("--idm", default="models/doom-small/eval/idm", help="the IDM that scores (eval's)")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--floor", action="store_true", help="optimise the floored loss (`train distill --pixel-judge-floor`)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model, device="cpu", dtype=torch.float32)
    vae = model.vae.eval().requires_grad_(False)
    judge, scorer = ActionJudge.load(args.judge), load_idm(args.idm).eval()
    train, _ = open_latent_splits(
        args.data, model.config, vae, None, SamplerConfig.from_dict(model.config.sampler).frames_per_block
    )
    picks = torch.linspace(0, len(train) - 1, args.clips).long().tolist()  # spread over the recording
    batch = ClipBatch.from_item(torch.utils.data.default_collate([train[i] for i in picks]))
    conditions = build_conditions(batch, model.dit.config, model.clip.eval())
    rollout = SelfForcingRollout(
        model.dit.eval(), SamplerConfig.from_dict(model.config.sampler), model.config.latent_size
    )
    generator = torch.Generator().manual_seed(1)
    blocks = batch.num_frames // rollout.frames_per_block
    with torch.no_grad():  # the sampler's own path: every block to its last step
        start = rollout(conditions, torch.randn(batch.latents.shape, generator=generator),
                        exit_steps=[rollout.num_steps - 1] * blocks, generator=generator)  # fmt: skip

    def read(video: torch.Tensor) -> dict:
        frames = ((video.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
        readings = {}
        for name, idm in (("scoring_idm", scorer), ("training_judge", judge.model)):
            judged, by_phase, _ = judge_clips(idm, frames, batch.keyboard, batch.mouse)
            readings[name] = {"keys": judged["keyboard"], "yaw_direction": judged["yaw_direction"],
                              "keys_by_phase": by_phase["keyboard"]}  # fmt: skip
        return readings

    def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(10 * torch.log10(4.0 / ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean()))

    judged = DecodedClipJudge(vae, judge, args.clips, floor=args.floor)
    decode = judged.decode  # [N, 3, T, H, W]
    with torch.no_grad():
        round_trip, generated = decode(batch.latents), decode(start)
    report = {
        "settings": {**vars(args), "clips_picked": picks, "judge_sha256": judge.sha256},
        "round_trip": read(round_trip),
        "generated": {**read(generated), "psnr_to_round_trip_db": psnr(generated, round_trip)},
        "optimised": {},
        "judge_loss": [],
    }
    print("round trip", json.dumps(report["round_trip"]), "\ngenerated", json.dumps(report["generated"]), flush=True)
    latents = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([latents], lr=args.lr)
    began = time.monotonic()
    for step in range(1, args.steps + 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = judged.loss(latents, batch.keyboard, batch.mouse, batch.latents)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        report["judge_loss"].append(float(loss.detach()))
        if step in (max(1, args.steps // 2), args.steps):
            with torch.no_grad():
                video = decode(latents)
            report["optimised"][str(step)] = {
                **read(video),
                "psnr_to_start_db": psnr(video, generated),
                "psnr_to_round_trip_db": psnr(video, round_trip),
                "latent_change_rms": float((latents.detach() - start).pow(2).mean().sqrt()),
                "seconds": time.monotonic() - began,
            }
            print(f"step {step}", json.dumps(report["optimised"][str(step)]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
