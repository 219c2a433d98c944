"""Compare the VAE round trips of model folders on clips of a recording (PSNR, frame statistics).

    python scripts/compare_decoders.py --data DATA MODEL [MODEL ...] [--clips 8] [--frames 25]
        [--split val|train] [--val-fraction 0.1] [--idm IDM] [--frames-alone] [--out report.json]

Prints one row per model (and the real frames) and writes the numbers as JSON with --out. With --idm
(an inverse-dynamics model saved by `matrixgame-env eval`) the clips come with their actions and each
round trip is also judged by it: how much of the actions a VAE leaves readable, the most any DiT on
its latents can show (keys and yaw direction accuracy).
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
from matrixgame_env.eval.idm import load_idm  # noqa: E402
from matrixgame_env.eval.real_data import FrameWindows, resize_frames  # noqa: E402
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
    parser.add_argument("--idm", default=None, help="judge each round trip with this inverse-dynamics model")
    parser.add_argument(
        "--frames-alone",
        action="store_true",
        help="also each model's round trip of every frame on its own (no temporal compression)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    worlds = [(name, WorldModel.from_pretrained(name, device=args.device, dtype=torch.float32)) for name in args.models]
    size = worlds[0][1].video_size
    columns = COLUMNS
    judge = None
    if args.idm is None:
        real = real_clips(args.data, args.frames, args.clips, args.split, args.val_fraction, size)
    else:  # clips with their actions, for the judge
        windows = FrameWindows(args.data, args.split, args.frames, args.val_fraction, stride=args.frames)
        items = windows.stack(windows.evenly_spaced(args.clips))
        real = resize_frames(items["frames"], size)
        judge = (load_idm(args.idm, args.device), items["keyboard"], items["mouse"])
        columns = (*COLUMNS, "idm_keys", "idm_yaw")
    report = reconstruction_report(worlds, real, judge, frames_alone=args.frames_alone)
    width = max(len(name) for name in report)
    print(f"{'':{width}}  " + "  ".join(f"{c:>14}" for c in columns))
    for name, row in report.items():
        print(f"{name:{width}}  " + "  ".join(f"{row[c]:14.3f}" if c.startswith("idm") else f"{row[c]:14.2f}"
                                              for c in columns))  # fmt: skip
    if args.idm is not None:
        for name, row in report.items():
            phases = row["idm_by_phase"]
            print(f"{name:{width}}  by phase 0-3: keys " + " ".join(f"{v:.3f}" for v in phases["keyboard"])
                  + ", yaw " + " ".join(f"{v:.3f}" for v in phases["yaw_direction"]))  # fmt: skip
        for name, row in report.items():
            sizes = row["idm_yaw_by_size"]
            cells = zip(sizes["bands"], sizes["yaw_direction"], sizes["windows"])
            print(f"{name:{width}}  yaw by size: " + ", ".join(_band_text(*cell) for cell in cells))
    if args.out is not None:  # the real frames' PSNR against themselves is infinite: null in JSON
        rows = {name: {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}
                for name, row in report.items()}  # fmt: skip
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        args.out.write_text(json.dumps({"settings": settings, "clips": list(real.shape), "report": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


def _band_text(band: list, accuracy: float | None, windows: int) -> str:
    low, high = band
    value = "-" if accuracy is None else f"{accuracy:.3f}"
    return f"|yaw| {low:g}-{'' if high is None else f'{high:g}'}: {value} of {windows}"


if __name__ == "__main__":
    raise SystemExit(main())
