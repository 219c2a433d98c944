"""GPU check of the encoders and the whole world model at full size (random weights).

1. Wan VAE (dim 96) and CLIP ViT-H/14: encode one 352x640 start image (image condition up to the
   encoder's fixed point + CLIP tokens), stream-decode 5 blocks of 3 latents; time per block and
   peak memory, in bf16 and float32.
2. The VAE fixture in bf16 against the official float32 outputs.
3. WorldModel end to end (DiT + streaming decode) for 8 blocks after 2 warm-up blocks: fps.

Usage: python benchmarks/check_encoders_gpu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, random_init_, random_world, synchronize, table, write_json  # noqa: E402

from matrixgame_env.checkpoints import build_modules  # noqa: E402
from matrixgame_env.model_config import ModelConfig  # noqa: E402
from matrixgame_env.nn.vae import WanVAE  # noqa: E402
from matrixgame_env.reference import load_fixture, max_relative_error, norm_relative_error  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"


def timed(device, fn, *args):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return out, time.perf_counter() - t0


def encoders(device: str, dtype: torch.dtype, config: ModelConfig) -> dict:
    _, vae, clip = build_modules(config, device="meta")
    vae = vae.to_empty(device=device)
    clip = clip.to_empty(device=device)
    random_init_(vae, seed=1)
    random_init_(clip, seed=2)
    vae.latent_mean.zero_()
    vae.latent_std.fill_(1.0)
    vae, clip = vae.to(dtype).eval(), clip.to(dtype).eval()
    torch.cuda.reset_peak_memory_stats()
    image = torch.rand(1, 3, *config.video_size, device=device, dtype=dtype) * 2 - 1
    with torch.no_grad():
        condition, encode_s = timed(device, vae.encode_image_condition, image, 4096)
        _, clip_s = timed(device, clip, image)
        cache = vae.new_decoder_cache(1)
        latents = torch.randn(1, 16, 15, *config.latent_size, device=device, dtype=dtype)
        times, frames = [], 0
        for b in range(5):
            out, s = timed(device, vae.decode_stream, latents[:, :, 3 * b : 3 * b + 3], cache)
            times.append(s)
            frames += out.shape[1]
            finite = bool(torch.isfinite(out).all())
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "image_condition_s": encode_s,
        "distinct_latents": condition.num_distinct,
        "clip_s": clip_s,
        "decode_first_block_s": times[0],
        "decode_block_median_s": statistics.median(times[1:]),
        "decoded_frames": frames,
        "decode_finite": finite,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "decoder_cache_mib": cache.nbytes / 2**20,
    }


def vae_fixture_bf16(device: str) -> dict:
    f = load_fixture("vae")
    model = f.spec["model"]
    vae = WanVAE(
        dim=model["dim"],
        z_dim=model["z_dim"],
        dim_mult=tuple(model["dim_mult"]),
        num_res_blocks=model["num_res_blocks"],
        temporal_downsample=tuple(model["temperal_downsample"]),
    )
    vae.load_state_dict(f.weights(), strict=True)
    vae = vae.to(device=device, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        enc = vae.encode(f.io("rand_clip").to(device, torch.bfloat16))
        cache = vae.new_decoder_cache(1)
        latents = f.io("latents").to(device, torch.bfloat16)
        chunks = [vae.decode_stream(latents[:, :, 3 * i : 3 * i + 3], cache) for i in range(3)]
    dec = torch.cat(chunks, 1)
    ref = torch.cat([f.io(f"decode_chunk{i}") for i in range(3)], 1)
    return {
        "encode_max_abs_err": max_relative_error(enc, f.io("encode_rand_clip")),
        "encode_rel_l2": norm_relative_error(enc, f.io("encode_rand_clip")),
        "decode_max_abs_err": max_relative_error(dec, ref),
        "decode_rel_l2": norm_relative_error(dec, ref),
    }


def end_to_end(device: str, config: ModelConfig, blocks: int = 10, warmup: int = 2) -> dict:
    world = random_world(config, device)
    torch.cuda.reset_peak_memory_stats()
    picture = (torch.rand(352, 640, 3) * 255).to(torch.uint8)
    state, start_s = timed(device, world.start, picture, 0)
    times, dit_times = [], []
    for b in range(blocks):
        keys = torch.tensor([[1.0, 0, 0, 0]])
        look = torch.tensor([[0.0, 0.1]])
        latents, dit_s = timed(device, world.step_latents, state, keys, look)
        frames, dec_s = timed(device, world.decode, state, latents)
        if b >= warmup:
            times.append(dit_s + dec_s)
            dit_times.append(dit_s)
    return {
        "start_s": start_s,
        "dit_block_s": statistics.median(dit_times),
        "block_s": statistics.median(times),
        "fps_end_to_end": 12 / statistics.median(times),
        "fps_dit_only": 12 / statistics.median(dit_times),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "frames_shape": list(frames.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda"
    config = ModelConfig.load(MODELS / "universal")
    result = {"environment": environment()}
    rows = [encoders(device, dtype, config) for dtype in (torch.bfloat16, torch.float32)]
    result["encoders"] = rows
    result["vae_fixture_bf16"] = vae_fixture_bf16(device)
    result["world_model_end_to_end_bf16"] = end_to_end(device, config)
    path = write_json("encoders_gpu", result, args.out)
    print(table(rows, list(rows[0])))
    print("\nVAE fixture in bf16:", result["vae_fixture_bf16"])
    print("WorldModel end to end (bf16, eager):", result["world_model_end_to_end_bf16"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
