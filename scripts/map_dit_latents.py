"""Carry a trained DiT over to another VAE's latent space: a warm start for `train dit`.

    python scripts/map_dit_latents.py --data DATA --model models/doom-small --vae NEW_VAE_FOLDER --out OUT

Both VAEs encode the same training clips; a linear map of the 16 normalised latent channels at each
position, z_old ~ A z_new, is fitted to them (by least squares, and as the nearest rotation, which
keeps the noise the DiT sees a standard normal). The mapped DiT reads new latents through A (the
patch embedding of the noisy latents and of the image condition) and writes its flow back through
A's inverse (the head), so it starts from what the old DiT learned instead of from scratch. Printed
and saved (OUT/latent_map.json): the fit (R^2 per channel, A) and the validation flow MSE on the same
held-out clips and noise levels of the old DiT on its own latents, of each mapped DiT on the new
latents and of the old DiT unmapped on them (the noise is drawn in each latent space, so these
agree only statistically, even for an exact map). OUT is a model folder (the new VAE, the old image
encoder, the better-scoring mapped DiT) that `train dit --init OUT` continues (its config keeps the
old DiT's training record, with the map noted in it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from assemble_model import assemble  # noqa: E402

from matrixgame_env.checkpoints import load_model, save_model  # noqa: E402
from matrixgame_env.data.dataset import VideoClipDataset  # noqa: E402
from matrixgame_env.nn.dit import CausalDiT  # noqa: E402
from matrixgame_env.train.conditions import ClipBatch, build_conditions  # noqa: E402
from matrixgame_env.train.diffusion import forcing_for  # noqa: E402
from matrixgame_env.train.encode import encode_clips  # noqa: E402


def encoded_clips(vae, clips: VideoClipDataset, indices: list[int], batch_size: int) -> list[ClipBatch]:
    """The clips `indices` as DiT training batches of one VAE's latents."""
    batches = []
    for start in range(0, len(indices), batch_size):
        items = [clips[i] for i in indices[start : start + batch_size]]
        video = torch.stack([item["video"] for item in items]).to(vae.device)
        encoded = encode_clips(vae, video)
        batches.append(
            ClipBatch(
                encoded["latents"].float(),
                torch.stack([item["keyboard"] for item in items]).float(),
                torch.stack([item["mouse"] for item in items]).float(),
                encoded["first_frame"],
                encoded["image_latents"].float(),
            )
        )
    return batches


def positions(batches: list[ClipBatch]) -> torch.Tensor:
    """Every latent position of the batches' latents and image latents as rows [N, C] (float64)."""
    rows = [t.double().transpose(0, 1).flatten(1).T for b in batches for t in (b.latents, b.image_latents)]
    return torch.cat(rows)


def fit_maps(new: torch.Tensor, old: torch.Tensor) -> dict[str, torch.Tensor]:
    """A with old ~ new @ A.T: least squares, and the rotation nearest to it (orthogonal Procrustes)."""
    least_squares = torch.linalg.lstsq(new, old).solution.T
    u, _, v_t = torch.linalg.svd(old.T @ new)
    return {"least_squares": least_squares, "rotation": u @ v_t}


def r_squared(new: torch.Tensor, old: torch.Tensor, a: torch.Tensor) -> list[float]:
    """Share of each old channel's variance the map explains."""
    residual = (old - new @ a.T).pow(2).mean(0)
    return (1 - residual / old.var(0, unbiased=False)).tolist()


def mapped_dit(dit: CausalDiT, a: torch.Tensor) -> CausalDiT:
    """A copy of `dit` that reads latents z_new (with z_old = A z_new) and predicts their flow."""
    c = dit.config.out_dim
    mapped = CausalDiT(dit.config)
    mapped.load_state_dict(dit.state_dict())
    a = a.to(torch.float64)
    with torch.no_grad():
        weight = mapped.patch_embedding.weight.double()  # [dim, in_dim, pt, ph, pw]: noisy latents, mask, image
        image = slice(dit.config.in_dim - c, dit.config.in_dim)
        for part in (slice(0, c), image):
            weight[:, part] = torch.einsum("doxyz,on->dnxyz", weight[:, part], a)
        mapped.patch_embedding.weight.copy_(weight)
        head = mapped.head.head  # rows in (pt, ph, pw, channel) order
        inverse = torch.linalg.inv(a)
        rows = head.weight.double().unflatten(0, (-1, c))  # [patch, c_old, dim]
        head.weight.copy_(torch.einsum("no,pod->pnd", inverse, rows).flatten(0, 1))
        if head.bias is not None:
            bias = head.bias.double().unflatten(0, (-1, c))
            head.bias.copy_(torch.einsum("no,po->pn", inverse, bias).flatten())
    return mapped.to(dit.device, dit.dtype).eval()


@torch.no_grad()
def flow_mse(dit: CausalDiT, clip, forcing, batches: list[ClipBatch], seed: int) -> float:
    """Mean validation flow MSE over the batches, with noise levels and noise drawn from `seed`."""
    generator = torch.Generator(device=dit.device).manual_seed(seed)
    values = []
    for batch in batches:
        batch = batch.to(dit.device)
        conditions = build_conditions(batch, dit.config, clip)
        values.append(float(forcing.loss(dit, batch.latents, conditions, generator).flow_mse))
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a recording (matrixgame-env record)")
    parser.add_argument("--model", default="models/doom-small", help="the model whose DiT is carried over")
    parser.add_argument("--vae", type=Path, required=True, help="folder with the new config.json and vae.safetensors")
    parser.add_argument("--out", type=Path, required=True, help="new model folder")
    parser.add_argument("--fit-clips", type=int, default=48, help="training clips the map is fitted on")
    parser.add_argument("--val-clips", type=int, default=16, help="held-out clips of the flow MSE")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of episodes held out (as in training)")
    parser.add_argument("--latent-frames", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    old = load_model(args.model, device=args.device, dtype=torch.float32)
    # OUT starts as the new VAE beside the old image encoder and the old DiT (unmapped).
    assemble(args.out, args.vae, clip=old.folder, dit=old.folder)
    new = load_model(args.out, device=args.device, dtype=torch.float32)
    frames = 1 + 4 * (args.latent_frames - 1)
    clips = {
        split: VideoClipDataset(
            args.data,
            clip_frames=frames,
            split=split,
            size=old.config.video_size,
            stride=frames - 1,
            val_fraction=args.val_fraction,
        )
        for split in ("train", "val")
    }
    picks = {
        "train": _evenly(len(clips["train"]), args.fit_clips),
        "val": _evenly(len(clips["val"]), args.val_clips),
    }
    encoded = {
        (name, split): encoded_clips(vae, clips[split], picks[split], args.batch_size)
        for name, vae in (("old", old.vae), ("new", new.vae))
        for split in ("train", "val")
    }
    z_old, z_new = positions(encoded["old", "train"]), positions(encoded["new", "train"])
    maps = fit_maps(z_new, z_old)
    forcing = forcing_for(old.config.sampler, old.dit)
    report = {
        "settings": {
            "data": str(args.data),
            "model": str(args.model),
            "vae": str(args.vae),
            "fit_clips": len(picks["train"]),
            "val_clips": len(picks["val"]),
            "latent_frames": args.latent_frames,
            "device": args.device,
        },
        "fit": {},
        "val_flow_mse": {
            "old DiT, old latents": flow_mse(old.dit, old.clip, forcing, encoded["old", "val"], 0),
            "old DiT unmapped, new latents": flow_mse(old.dit, old.clip, forcing, encoded["new", "val"], 0),
        },
    }
    candidates = {}
    for name, a in maps.items():
        report["fit"][name] = {
            "r_squared": r_squared(z_new, z_old, a),
            "singular_values": torch.linalg.svdvals(a).tolist(),
            "matrix": a.tolist(),
        }
        candidates[name] = mapped_dit(old.dit, a)
        report["val_flow_mse"][f"mapped ({name}), new latents"] = flow_mse(
            candidates[name], old.clip, forcing, encoded["new", "val"], 0
        )
    best = min(maps, key=lambda name: report["val_flow_mse"][f"mapped ({name}), new latents"])
    report["chosen"] = best
    for name, fit in report["fit"].items():
        r2 = fit["r_squared"]
        print(f"{name}: R^2 per channel mean {sum(r2) / len(r2):.3f} (min {min(r2):.3f})")
    for name, value in report["val_flow_mse"].items():
        print(f"val flow MSE, {name}: {value:.4f}")
    _write_model(args.out, old, new, candidates[best], report)
    (args.out / "latent_map.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} (DiT mapped by {best})")
    return 0


def _evenly(count: int, wanted: int) -> list[int]:
    if count == 0:
        raise SystemExit("the recording has no clips of that length in a split")
    wanted = min(wanted, count)
    return [int(i * count / wanted) for i in range(wanted)]


def _write_model(out: Path, old, new, dit: CausalDiT, report: dict) -> None:
    """OUT with the mapped DiT; its config carries the old DiT's training record, the map noted in it,
    so that `train dit --init OUT` continues the DiT instead of initialising a fresh one."""
    config = new.config
    records = config.extra.setdefault("training", {})
    dit_record = dict(old.config.extra.get("training", {}).get("dit", {}))
    dit_record["latent_map"] = {
        "from": report["settings"]["model"],
        "kind": report["chosen"],
        "val_flow_mse": report["val_flow_mse"],
    }
    records["dit"] = dit_record
    save_model(out, config, dit.cpu().to(torch.bfloat16), new.vae.cpu().float(), new.clip.cpu().to(torch.bfloat16))
    load_model(out, device="cpu")  # strict reload


if __name__ == "__main__":
    raise SystemExit(main())
