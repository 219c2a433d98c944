"""The walls of a Doom map, read from its WAD file, and how far the player can walk along a ray.

The exploration policy uses these distances to steer clear of walls. Reading the WAD costs a few
milliseconds once per map; asking ViZDoom for its sector information instead slows every game step
about threefold for the whole game, because it cannot be switched off after `init()`.

Only Doom-format maps (LINEDEFS, SIDEDEFS, VERTEXES, SECTORS lumps) are read; freedoom2's are.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PLAYER_HEIGHT = 56  # map units: an opening lower than this stops the player
MAX_STEP = 24  # map units: the highest floor step the player walks up
_BLOCKS_PLAYER = 0x0001  # linedef flag
_NO_SIDEDEF = 0xFFFF
_MAP_LUMPS = {
    "THINGS",
    "LINEDEFS",
    "SIDEDEFS",
    "VERTEXES",
    "SEGS",
    "SSECTORS",
    "NODES",
    "SECTORS",
    "REJECT",
    "BLOCKMAP",
}


@dataclass(frozen=True)
class Walls:
    """Line segments that stop the player: `segments` [N, 4] (x1, y1, x2, y2 in map units) and from which
    side each one stops it, `from_front` and `from_back` [N] bool (a ledge stops the player below it,
    not above it; the front of a line is on the right of its direction).

    Closed doors (sectors whose ceiling rests on their floor) are not walls, since pressing USE opens
    them; their lines are kept apart in `doors` [M, 4]. Solid things (pillars, lamps, barrels) are not
    included.
    """

    segments: np.ndarray
    from_front: np.ndarray
    from_back: np.ndarray
    doors: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))

    def distances(self, x: float, y: float, angles: np.ndarray, max_distance: float = 2048.0) -> np.ndarray:
        """Distance from (x, y) to the first wall along each ray; `angles` in degrees in the map's
        convention (0 = +x, counter-clockwise). Rays that hit nothing report `max_distance`."""
        offset = self.segments[:, 0:2] - np.array([x, y])
        along = self.segments[:, 2:4] - self.segments[:, 0:2]
        in_front = _cross(along, offset) > 0  # the origin is on the right of v1 -> v2
        blocks = np.where(in_front, self.from_front, self.from_back)
        return _first_hits(self.segments[blocks], x, y, angles, max_distance)

    def door_distances(self, x: float, y: float, angles: np.ndarray, max_distance: float = 2048.0) -> np.ndarray:
        """Like `distances`, for closed doors (walls do not hide them: compare with `distances`)."""
        return _first_hits(self.doors, x, y, angles, max_distance)


def _first_hits(segments: np.ndarray, x: float, y: float, angles: np.ndarray, max_distance: float) -> np.ndarray:
    """Distance along each ray from (x, y) to the nearest of `segments` [N, 4]."""
    radians = np.radians(np.asarray(angles, dtype=np.float64))
    direction = np.stack([np.cos(radians), np.sin(radians)], axis=1)[:, None, :]  # [R, 1, 2]
    start = segments[None, :, 0:2]  # [1, N, 2]
    along = segments[None, :, 2:4] - start
    offset = start - np.array([x, y])
    # Solve origin + t * direction = start + u * along for t (ray) and u (segment) with 2D cross products.
    denominator = _cross(direction, along)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = _cross(offset, along) / denominator
        u = _cross(offset, direction) / denominator
    hit = (denominator != 0) & (t > 0) & (u >= 0) & (u <= 1)
    return np.where(hit, t, max_distance).min(axis=1, initial=max_distance)


def load_walls(wad_path: str | Path, map_name: str) -> Walls:
    """The walls and closed doors of `map_name` (e.g. "MAP01") in the WAD file at `wad_path`."""
    lumps = _map_lumps(Path(wad_path).read_bytes(), map_name, str(wad_path))
    vertices = np.frombuffer(lumps["VERTEXES"], dtype="<i2").reshape(-1, 2).astype(np.float64)
    linedefs = np.frombuffer(lumps["LINEDEFS"], dtype="<u2").reshape(-1, 7)  # v1 v2 flags special tag right left
    sidedefs = np.frombuffer(lumps["SIDEDEFS"], dtype="<i2").reshape(-1, 15)  # the sector is the last field
    sectors = np.frombuffer(lumps["SECTORS"], dtype="<i2").reshape(-1, 13)  # floor and ceiling heights first
    floors, ceilings = sectors[:, 0].tolist(), sectors[:, 1].tolist()

    walls, from_front, from_back, doors = [], [], [], []
    for v1, v2, flags, _special, _tag, right, left in linedefs.tolist():
        if left == _NO_SIDEDEF or flags & _BLOCKS_PLAYER:
            front_blocks = back_blocks = True
        else:
            front, back = sidedefs[right, 14], sidedefs[left, 14]
            if ceilings[front] <= floors[front] or ceilings[back] <= floors[back]:
                doors.append((v1, v2))
                continue
            front_blocks = _blocks(floors[front], ceilings[front], floors[back], ceilings[back])
            back_blocks = _blocks(floors[back], ceilings[back], floors[front], ceilings[front])
        if front_blocks or back_blocks:
            walls.append((v1, v2))
            from_front.append(front_blocks)
            from_back.append(back_blocks)
    return Walls(
        _segments(vertices, walls),
        np.array(from_front, dtype=bool),
        np.array(from_back, dtype=bool),
        _segments(vertices, doors),
    )


def _segments(vertices: np.ndarray, ends: list[tuple[int, int]]) -> np.ndarray:
    indices = np.array(ends, dtype=np.int64).reshape(-1, 2)
    return np.concatenate([vertices[indices[:, 0]], vertices[indices[:, 1]]], axis=1)


def _blocks(floor_here: int, ceiling_here: int, floor_there: int, ceiling_there: int) -> bool:
    """Whether a player standing on this side's floor is stopped from walking to the other side."""
    opening = min(ceiling_here, ceiling_there) - max(floor_here, floor_there)
    return opening < PLAYER_HEIGHT or floor_there - floor_here > MAX_STEP


def list_maps(wad_path: str | Path) -> list[str]:
    """Names of the maps in the WAD file at `wad_path` (marker lumps followed by map lumps)."""
    names = _lump_names(Path(wad_path).read_bytes(), str(wad_path))
    return [name for name, after in zip(names, names[1:]) if after in _MAP_LUMPS and name not in _MAP_LUMPS]


def _lump_names(data: bytes, source: str) -> list[str]:
    ident, count, directory = struct.unpack_from("<4sii", data, 0)
    if ident not in (b"IWAD", b"PWAD"):
        raise ValueError(f"{source} is not a WAD file")
    return [_lump_name(data, directory + 16 * i + 8) for i in range(count)]


def _lump_name(data: bytes, position: int) -> str:
    return data[position : position + 8].rstrip(b"\0").decode("ascii", "replace").upper()


def _map_lumps(data: bytes, map_name: str, source: str) -> dict[str, bytes]:
    """The map lumps that follow the map's marker lump."""
    names = _lump_names(data, source)
    _, count, directory = struct.unpack_from("<4sii", data, 0)
    entries = [struct.unpack_from("<ii", data, directory + 16 * i) for i in range(count)]
    if map_name.upper() not in names:
        raise ValueError(f"map {map_name!r} is not in {source}")
    marker = names.index(map_name.upper())
    lumps: dict[str, bytes] = {}
    for name, (position, size) in zip(names[marker + 1 :], entries[marker + 1 :]):
        if name in lumps or name not in _MAP_LUMPS:
            break
        lumps[name] = data[position : position + size]
    missing = {"LINEDEFS", "SIDEDEFS", "VERTEXES", "SECTORS"} - lumps.keys()
    if missing:
        raise ValueError(f"map {map_name} in {source} is not in Doom format (missing {sorted(missing)})")
    return lumps


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]
