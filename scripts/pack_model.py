"""Pack a model folder for transfer: weights cast to bfloat16, files split into pieces below a size.

    python scripts/pack_model.py SRC DST [--piece-mib 15]      # on the training machine
    python scripts/pack_model.py --unpack DST FOLDER            # here: join the pieces again
    python scripts/pack_model.py --cast SRC.safetensors DST.safetensors   # one file cast, not split
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file  # noqa: E402

from matrixgame_env.weights import save_safetensors  # noqa: E402


def cast_to_bfloat16(src: Path, dst: Path) -> None:
    """The safetensors file `src` with its floating-point weights in bfloat16, written to `dst`."""
    state = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in load_file(str(src)).items()}
    save_safetensors(state, dst)


def pack(src: Path, dst: Path, piece_bytes: int) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix == ".safetensors":
            cast_to_bfloat16(path, dst / path.name)
            data = (dst / path.name).read_bytes()
            (dst / path.name).unlink()
            for i in range(0, len(data), piece_bytes):
                (dst / f"{path.name}.part{i // piece_bytes:02d}").write_bytes(data[i : i + piece_bytes])
        elif path.is_file():
            shutil.copy(path, dst / path.name)


def unpack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted({p.name.split(".part")[0] for p in src.glob("*.part*")})
    for name in names:
        pieces = sorted(src.glob(f"{name}.part*"))
        (dst / name).write_bytes(b"".join(p.read_bytes() for p in pieces))
    for path in src.iterdir():
        if ".part" not in path.name and path.is_file():
            shutil.copy(path, dst / path.name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--unpack", action="store_true")
    parser.add_argument("--cast", action="store_true", help="SRC and DST are single .safetensors files")
    parser.add_argument("--piece-mib", type=float, default=15)
    args = parser.parse_args()
    if args.cast:
        cast_to_bfloat16(args.src, args.dst)
    elif args.unpack:
        unpack(args.src, args.dst)
    else:
        pack(args.src, args.dst, int(args.piece_mib * 2**20))
