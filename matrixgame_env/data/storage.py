"""The on-disk dataset format: `DIR/manifest.json` and `DIR/chunks/chunk_000123.npz`.

A chunk is one contiguous piece of one episode: `frames` uint8 [T, H, W, 3], `keyboard` int8 [T, 4],
`mouse` float32 [T, 2] and `variables` float32 [T, V], stored uncompressed so that readers can
memory-map every array instead of loading whole chunks. Chunks and the manifest are written to a
temporary file first and renamed into place, so a killed recording never leaves a half-written file
under the final name; the manifest lists only chunks that were completely written.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

FORMAT = "matrixgame-env/vizdoom-chunks"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHUNK_DIR = "chunks"
CHUNK_ARRAYS = {"frames": np.uint8, "keyboard": np.int8, "mouse": np.float32, "variables": np.float32}


@dataclass(frozen=True)
class ChunkInfo:
    """A finished chunk: its global index, the episode it belongs to and its place in it (`part`), the
    map and seed of that episode, and its number of frames."""

    index: int
    episode: int
    part: int
    map: str
    seed: int
    frames: int

    @property
    def file(self) -> str:
        """Path of the chunk relative to the dataset directory."""
        return chunk_file(self.index)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "file": self.file, **{k: v for k, v in asdict(self).items() if k != "index"}}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ChunkInfo:
        return cls(**{key: values[key] for key in ("index", "episode", "part", "map", "seed", "frames")})


@dataclass
class Manifest:
    """Everything a reader needs to interpret the chunks (`settings`) and the list of finished chunks.

    `settings` holds fps, tics_per_frame, frame_size [H, W], the action layout and its units
    (degrees_per_unit), the variable names and the recording parameters; see `recording.py`.
    """

    settings: dict[str, Any]
    chunks: list[ChunkInfo] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return float(self.settings["fps"])

    @property
    def frame_size(self) -> tuple[int, int]:
        height, width = self.settings["frame_size"]
        return int(height), int(width)

    @property
    def variable_names(self) -> list[str]:
        return list(self.settings["variables"])

    @property
    def episodes(self) -> list[int]:
        """Episode ids with at least one finished chunk, in increasing order."""
        return sorted({chunk.episode for chunk in self.chunks})

    def add(self, chunk: ChunkInfo) -> None:
        """Record a finished chunk (replacing an older entry with the same index), keeping index order."""
        self.chunks = sorted([c for c in self.chunks if c.index != chunk.index] + [chunk], key=lambda c: c.index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.settings,
            "chunks": [chunk.to_dict() for chunk in self.chunks],
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "manifest") -> Manifest:
        if values.get("format") != FORMAT:
            raise ValueError(f"{source} is not a {FORMAT} manifest (format={values.get('format')!r})")
        if values.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{source} has format version {values.get('format_version')}; this code reads version {FORMAT_VERSION}"
            )
        settings = {k: v for k, v in values.items() if k not in ("format", "format_version", "chunks")}
        return cls(settings, [ChunkInfo.from_dict(chunk) for chunk in values.get("chunks", [])])


def chunk_file(index: int) -> str:
    """Path of chunk `index` relative to the dataset directory."""
    return f"{CHUNK_DIR}/chunk_{index:06d}.npz"


def read_manifest(root: str | Path) -> Manifest:
    """The manifest of the dataset in `root`; FileNotFoundError when there is none."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no dataset manifest at {path}: record a dataset first (matrixgame-env record --out {root} --minutes N)"
        )
    return Manifest.from_dict(json.loads(path.read_text()), source=str(path))


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    """Write `root/manifest.json` atomically."""
    text = json.dumps(manifest.to_dict(), indent=1) + "\n"
    _write_atomically(Path(root) / MANIFEST_NAME, lambda file: file.write(text.encode()))


def write_chunk(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one chunk's arrays (the keys and dtypes of `CHUNK_ARRAYS`, equal lengths) atomically."""
    if set(arrays) != set(CHUNK_ARRAYS):
        raise ValueError(f"a chunk holds exactly {sorted(CHUNK_ARRAYS)}, got {sorted(arrays)}")
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"chunk arrays differ in length: {lengths}")
    converted = {name: np.ascontiguousarray(arrays[name], dtype=dtype) for name, dtype in CHUNK_ARRAYS.items()}
    _write_atomically(Path(path), lambda file: np.savez(file, **converted))


def open_chunk(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a chunk, memory-mapped read-only (pages are read from disk only when touched)."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive, path.open("rb") as file:
        arrays = {}
        for member in archive.infolist():
            name = member.filename.removesuffix(".npy")
            if member.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: array {name!r} is compressed and cannot be memory-mapped")
            # The local file header (30 bytes, then name and extra field) precedes the .npy data.
            file.seek(member.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", file.read(4))
            file.seek(member.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
            order = "F" if fortran_order else "C"
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=file.tell(), shape=shape, order=order)
    return arrays


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
