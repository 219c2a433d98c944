"""Compare the VAE round trips of model folders on clips of a recording (PSNR, frame statistics).

    python scripts/compare_decoders.py --data DATA MODEL [MODEL ...] [--clips 8] [--frames 25]
        [--split val|train] [--val-fraction 0.1] [--out report.json]

Prints one row per model (and the real frames) and writes the numbers as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matrixgame_env.eval.drift import STATISTICS  # noqa: E402
from matrixgame_env.eval.reconstruction import real_clips, reconstruction_report  # noqa: E402
from matrixgame_env.world.model import WorldModel  # noqa: E402

COLUMNS = ("psnr_db", *STATISTICS, "temporal_error")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders or preset names")
    parser.add_argument("--data", required=True, help="a recording (matrixgame-env record)")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=25, help="video frames per clip, 1 + 4k")
    parser.add_argument("--split", choices=["val", "train"], default="val")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    worlds = [(name, WorldModel.from_pretrained(name, device=args.device, dtype=torch.float32)) for name in args.models]
    size = worlds[0][1].video_size
    real = real_clips(args.data, args.frames, args.clips, args.split, args.val_fraction, size)
    report = reconstruction_report(worlds, real)
    width = max(len(name) for name in report)
    print(f"{'':{width}}  " + "  ".join(f"{c:>14}" for c in COLUMNS))
    for name, row in report.items():
        print(f"{name:{width}}  " + "  ".join(f"{row[c]:14.2f}" for c in COLUMNS))
    if args.out is not None:  # the real frames' PSNR against themselves is infinite: null in JSON
        rows = {name: {k: (None if math.isinf(v) else v) for k, v in row.items()} for name, row in report.items()}
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        args.out.write_text(json.dumps({"settings": settings, "clips": list(real.shape), "report": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
