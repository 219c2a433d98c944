"""Streaming VAE decode speed in several forms and layouts of the same computation.

  native         torch's conv3d on standard (NCDHW) tensors
  stacked        each causal 3D convolution as one 2D convolution over its temporal taps stacked in
                 channels (`matrixgame_env.nn.vae.set_conv3d_mode`)
  channels_last  conv3d on channels-last (NDHWC) activations and weights (`WanVAE.set_decoder_channels_last`)
  onednn         oneDNN's 3D convolution called directly (CPUs; `set_conv3d_mode("onednn")`)
  onednn_channels_last  the same on channels-last activations and weights
  MODE+transposed  any of these with the upsamplers' nearest upsampling and 3x3 convolution run as one
                 transposed convolution (`matrixgame_env.nn.vae.set_upsample_mode`); without the suffix
                 they upsample as written

All compute the same function; this measures which is faster where, in each of `--dtypes` on GPUs
(bfloat16 by default; float16 is the official decoder's precision). Per model, batch, mode and dtype:
seconds per block of 3 latent frames (12 video frames), the decoded fps, peak memory, and the frames'
agreement with the first mode on the same latents.

  doom-small  the bundled model's VAE (its weights), 96x176
  universal   the full-size Wan 2.1 VAE (random weights), 352x640

Usage: python benchmarks/bench_decoder.py [--device cuda] [--small-batches 1 16 64] [--full-batches 1 4 8]
           [--dtypes bfloat16 float16]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, random_init_, synchronize, table, write_json  # noqa: E402

from matrixgame_env.checkpoints import load_model  # noqa: E402
from matrixgame_env.model_config import ModelConfig  # noqa: E402
from matrixgame_env.nn.vae import WanVAE, set_conv3d_mode, set_upsample_mode  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
LATENTS_PER_BLOCK = 3
FRAMES_PER_BLOCK = 12


def build_vae(model: str, device: str, dtype: torch.dtype) -> WanVAE:
    """The VAE of a preset: doom-small with its trained weights, others with random weights."""
    if (MODELS / model / "vae.safetensors").is_file():
        return load_model(MODELS / model, device=device, dtype=dtype).vae
    config = ModelConfig.load(MODELS / model / "config.json")
    with torch.device("meta"):
        vae = WanVAE.from_config(config.vae)
    vae = vae.to_empty(device=device)
    random_init_(vae)
    vae.latent_mean.zero_()
    vae.latent_std.fill_(1.0)
    return vae.to(dtype).eval()


def latent_shape(model: str) -> tuple[int, int]:
    height, width = ModelConfig.load(MODELS / model / "config.json").video_size
    return height // 8, width // 8


LAYOUTS = ("native", "stacked", "channels_last", "onednn", "onednn_channels_last", "triton_channels_last")


def decode_blocks(vae: WanVAE, latents: list[torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
    """Streams the first latent then each block; returns the last block's frames and per-block seconds."""
    cache = vae.new_decoder_cache(latents[0].shape[0])
    frames = vae.decode_stream(latents[0], cache, check_finite=False)
    seconds = []
    for block in latents[1:]:
        synchronize(block.device)
        start = time.perf_counter()
        frames = vae.decode_stream(block, cache, check_finite=False)
        synchronize(block.device)
        seconds.append(time.perf_counter() - start)
    return frames, seconds


def set_mode(vae: WanVAE, mode: str) -> None:
    layout, _, upsample = mode.partition("+")
    if layout not in LAYOUTS or upsample not in ("", "transposed"):
        raise ValueError(f"unknown mode {mode!r}: expected one of {LAYOUTS}, optionally with '+transposed'")
    forms = {
        "stacked": "stacked",
        "onednn": "onednn",
        "onednn_channels_last": "onednn",
        "triton_channels_last": "triton",
    }
    set_conv3d_mode(forms.get(layout, "native"))
    set_upsample_mode(upsample or "nearest")
    vae.set_decoder_channels_last(layout.endswith("channels_last"))


def measure(
    model: str, vae: WanVAE, batch: int, blocks: int, warmup: int, modes: list[str], dtypes: list[torch.dtype]
) -> list[dict]:
    """Each mode in each dtype on the same latents: timing after `warmup` blocks and agreement with the
    first mode in the first dtype."""
    h, w = latent_shape(model)
    generator = torch.Generator(device="cpu").manual_seed(batch)
    shapes = [(batch, vae.z_dim, 1, h, w)] + [(batch, vae.z_dim, LATENTS_PER_BLOCK, h, w)] * (warmup + blocks)
    latents = [torch.randn(shape, generator=generator).to(vae.device) for shape in shapes]
    rows, reference = [], None
    # Every tensor of the VAE as loaded (non-persistent buffers too), so that no dtype's run starts from
    # values an earlier, coarser dtype rounded.
    loaded = [(t, t.detach().clone()) for t in itertools.chain(vae.parameters(), vae.buffers())]
    for dtype, mode in ((dtype, mode) for dtype in dtypes for mode in modes):
        with torch.no_grad():
            for tensor, value in loaded:
                tensor.data = value.to(dtype) if value.is_floating_point() else value
        set_mode(vae, mode)
        if vae.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        frames, seconds = decode_blocks(vae, [latent.to(dtype) for latent in latents])
        timed = seconds[warmup:]
        block_s = statistics.median(timed)
        row = {
            "model": model, "batch": batch, "mode": mode, "dtype": str(dtype).removeprefix("torch."),
            "block_s": block_s, "fps": batch * FRAMES_PER_BLOCK / block_s,
            "spread": (max(timed) - min(timed)) / block_s,
        }  # fmt: skip
        if vae.device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        frames = frames.float()
        row["finite"] = bool(frames.isfinite().all())
        if reference is None:
            reference = frames
        row["rel_l2_vs_first"] = float((frames - reference).norm() / reference.norm())
        row["speedup"] = rows[0]["block_s"] / block_s if rows else 1.0
        rows.append(row)
    set_mode(vae, "native")
    set_conv3d_mode("auto")
    set_upsample_mode("auto")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--small-batches", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--full-batches", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--modes", nargs="+", default=["native", "stacked", "channels_last"])
    parser.add_argument(
        "--dtypes", nargs="+", default=None, help="GPU dtypes to compare (default: bfloat16; CPUs: float32)"
    )
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    dtypes = [getattr(torch, name) for name in args.dtypes] if args.dtypes else [dtype]
    rows = []
    for model, batches in (("doom-small", args.small_batches), ("universal", args.full_batches)):
        if not batches:
            continue
        vae = build_vae(model, args.device, dtype)
        for batch in batches:
            rows += measure(model, vae, batch, args.blocks, args.warmup, args.modes, dtypes)
            latest = rows[-len(args.modes) * len(dtypes) :]
            print(table(latest, ["model", "batch", "mode", "dtype", "block_s", "fps", "speedup"]), flush=True)
        del vae
    columns = ["model", "batch", "mode", "dtype", "block_s", "fps", "speedup", "spread", "peak_gib", "rel_l2_vs_first"]
    print(table(rows, columns))
    name = "decoder_" + (torch.cuda.get_device_name(0).split()[1].lower() if args.device.startswith("cuda") else "cpu")
    payload = {"environment": environment(), "device": args.device, "dtype": str(dtype), "rows": rows}
    print(f"wrote {write_json(name, payload, args.out)}")


if __name__ == "__main__":
    main()
