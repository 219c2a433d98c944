"""Record a dataset: minutes of ViZDoom gameplay, in chunks, over worker processes, resumable.

The recording is a list of chunks of `chunk_frames` frames; `chunks_per_episode` consecutive chunks
form one episode (one map, one seed). Chunk i belongs to episode i // chunks_per_episode; the
episode's seed comes from the base seed and the episode index, and its map from a seeded shuffle of
the maps that visits every map once per len(maps) episodes. So every chunk's content depends only
on the settings, the base seed and its index: re-running the same command records only the chunks
that are missing (an episode with some chunks done is replayed from its start, writing only the
missing ones), and asking for more minutes appends episodes.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .doom_map import list_maps
from .storage import ChunkInfo, Manifest, chunk_file, read_manifest, write_chunk, write_manifest
from .vizdoom_recorder import (
    DEFAULT_MAPS,
    KEYBOARD_KEYS,
    MOUSE_AXES,
    VARIABLE_NAMES,
    DoomRecorder,
    RecorderConfig,
    wad_path,
)

LABEL_TIMING = (
    "frame t is the screen before action t; action t is held for tics_per_frame game tics and leads to "
    "frame t + 1; variables[t] are read with frame t"
)
_PROGRESS_FRAMES = 100  # frames recorded between progress reports from a worker


def episode_seed(base_seed: int, episode: int) -> int:
    """The seed of `episode` (a 32-bit integer) in a recording with `base_seed`."""
    return int(np.random.SeedSequence([base_seed, episode]).generate_state(1)[0])


def episode_map(base_seed: int, episode: int, maps: tuple[str, ...]) -> str:
    """The map of `episode`: every block of len(maps) episodes visits each map once, in a seeded order."""
    cycle, slot = divmod(episode, len(maps))
    order = np.random.default_rng([base_seed, cycle]).permutation(len(maps))
    return maps[int(order[slot])]


def recording_settings(config: RecorderConfig, seed: int, chunk_frames: int, chunks_per_episode: int) -> dict[str, Any]:
    """The manifest's settings: how to read the chunks and how they were recorded."""
    return {
        "fps": config.fps,
        "tics_per_frame": config.tics_per_frame,
        "frame_size": list(config.size),
        "action_layout": "universal",
        "keyboard": list(KEYBOARD_KEYS),
        "mouse": list(MOUSE_AXES),
        "mouse_units": {
            "degrees_per_unit": config.degrees_per_unit,
            "meaning": "degrees turned during one frame / degrees_per_unit; pitch up and yaw right are positive",
        },
        "label_timing": LABEL_TIMING,
        "variables": list(VARIABLE_NAMES),
        "recording": {
            "source": "vizdoom",
            "vizdoom_version": _vizdoom_version(),
            "seed": seed,
            "chunk_frames": chunk_frames,
            "chunks_per_episode": chunks_per_episode,
            "screen_resolution": config.screen_resolution,
            "recorder": config.to_dict(),
        },
    }


def record(
    out_dir: str | Path,
    minutes: float,
    workers: int = 1,
    seed: int = 0,
    size: tuple[int, int] = (96, 176),
    tics_per_frame: int = 2,
    monsters: bool = False,
    progress: bool = True,
    *,
    maps: tuple[str, ...] = DEFAULT_MAPS,
    degrees_per_unit: float = 40.0,
    chunk_frames: int = 1000,
    chunks_per_episode: int = 2,
) -> Manifest:
    """Record at least `minutes` of game time into `out_dir` (rounded up to whole chunks) and return
    the manifest. `size` is (height, width) of the stored frames. Chunks already recorded with the
    same settings are kept; a directory recorded with other settings raises ValueError."""
    if minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if chunk_frames < 1 or chunks_per_episode < 1:
        raise ValueError(
            f"chunk_frames and chunks_per_episode must be positive, got {chunk_frames}, {chunks_per_episode}"
        )
    config = RecorderConfig(
        size=tuple(size),
        tics_per_frame=tics_per_frame,
        degrees_per_unit=degrees_per_unit,
        maps=tuple(maps),
        monsters=monsters,
    )
    available = list_maps(wad_path(config.wad))
    unknown = [name for name in config.maps if name not in available]
    if unknown:
        raise ValueError(f"maps {unknown} are not in {config.wad}; it has {', '.join(available)}")
    root = Path(out_dir)
    manifest = _open_manifest(root, recording_settings(config, seed, chunk_frames, chunks_per_episode))
    num_chunks = math.ceil(minutes * 60 * config.fps / chunk_frames - 1e-9)  # no extra chunk for rounding noise
    tasks = _plan(root, manifest, config, seed, num_chunks, chunk_frames, chunks_per_episode)
    missing_frames = sum(len(task.parts_to_write) for task in tasks) * chunk_frames
    with tqdm(total=missing_frames, unit="frame", desc="recording", disable=not progress) as bar:
        _run(tasks, workers, manifest, root, bar)
    return manifest


@dataclass(frozen=True)
class _EpisodeTask:
    root: str
    config: RecorderConfig
    episode: int
    seed: int
    map_name: str
    chunk_frames: int
    first_index: int  # global index of the episode's first chunk
    parts_to_write: tuple[int, ...]  # the episode is played up to the last of these


def _open_manifest(root: Path, settings: dict[str, Any]) -> Manifest:
    """The existing manifest (checked against `settings`, without chunks whose file is gone) or a new one."""
    if not (root / "manifest.json").exists():
        manifest = Manifest(settings)
    else:
        manifest = read_manifest(root)
        # Compare through JSON so tuples and lists are equal.
        expected = _json_round_trip(settings)
        differences = sorted(
            key for key in expected.keys() | manifest.settings.keys() if expected.get(key) != manifest.settings.get(key)
        )
        if differences:
            raise ValueError(
                f"{root} holds a recording with other settings ({', '.join(differences)} differ); "
                "record into a new directory or repeat the original arguments"
            )
        manifest.chunks = [chunk for chunk in manifest.chunks if (root / chunk.file).is_file()]
    write_manifest(root, manifest)
    return manifest


def _plan(
    root: Path,
    manifest: Manifest,
    config: RecorderConfig,
    seed: int,
    num_chunks: int,
    chunk_frames: int,
    chunks_per_episode: int,
) -> list[_EpisodeTask]:
    finished = {chunk.index for chunk in manifest.chunks}
    tasks = []
    for episode in range(math.ceil(num_chunks / chunks_per_episode)):
        first = episode * chunks_per_episode
        parts = range(min(chunks_per_episode, num_chunks - first))
        missing = tuple(part for part in parts if first + part not in finished)
        if missing:
            tasks.append(
                _EpisodeTask(
                    root=str(root.resolve()),  # workers run in another directory
                    config=config,
                    episode=episode,
                    seed=episode_seed(seed, episode),
                    map_name=episode_map(seed, episode, config.maps),
                    chunk_frames=chunk_frames,
                    first_index=first,
                    parts_to_write=missing,
                )
            )
    return tasks


def _run(tasks: list[_EpisodeTask], workers: int, manifest: Manifest, root: Path, bar: tqdm) -> None:
    """Record the tasks in worker processes; this process alone writes the manifest."""
    if not tasks:
        return
    # Spawn, not fork: the parent may hold threads (torch) that a forked child would inherit broken.
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    with ProcessPoolExecutor(
        min(workers, len(tasks)), mp_context=context, initializer=_start_worker, initargs=(messages,)
    ) as pool:
        futures = [pool.submit(_record_episode, task) for task in tasks]
        try:
            pending = len(tasks)
            while pending:
                try:
                    kind, payload = messages.get(timeout=0.5)
                except queue.Empty:
                    _raise_failures(futures)
                    continue
                if kind == "frames":
                    bar.update(payload)
                elif kind == "chunk":
                    manifest.add(ChunkInfo.from_dict(payload))
                    write_manifest(root, manifest)
                else:  # "done": sent after the task's other messages, which arrive in order
                    pending -= 1
        except BaseException:
            # Do not wait for the queued episodes; what is finished is in the manifest and a re-run resumes.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _raise_failures(futures: list[Future]) -> None:
    for future in futures:
        if future.done() and future.exception() is not None:
            if isinstance(future.exception(), BrokenProcessPool):  # the process itself died, e.g. by a signal
                raise RuntimeError(
                    "a recording worker process died without a Python error: the ViZDoom engine crashed or was "
                    "killed (out of memory?); check that one game starts: "
                    "matrixgame-env record --minutes 0.1 --workers 1"
                ) from future.exception()
            raise RuntimeError("a recording worker failed") from future.exception()


_messages: Any = None  # the worker's queue to the parent


def _start_worker(messages: Any) -> None:
    """Run the worker in its own temporary directory: ViZDoom writes cache and crash files into the cwd."""
    global _messages
    _messages = messages
    workdir = tempfile.mkdtemp(prefix="matrixgame-record-")
    sys.path[:] = [os.path.abspath(entry) for entry in sys.path]  # "" (the old cwd) must keep meaning it
    os.chdir(workdir)
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)


def _record_episode(task: _EpisodeTask) -> None:
    last = max(task.parts_to_write)
    with DoomRecorder(task.config) as recorder:
        recorder.start_episode(task.seed, task.map_name)
        for part in range(last + 1):
            write = part in task.parts_to_write
            pieces = []
            for start in range(0, task.chunk_frames, _PROGRESS_FRAMES):
                pieces.append(recorder.record(min(_PROGRESS_FRAMES, task.chunk_frames - start)))
                if write:
                    _messages.put(("frames", len(pieces[-1])))
            if write:
                index = task.first_index + part
                arrays = {
                    name: np.concatenate([getattr(piece, name) for piece in pieces])
                    for name in ("frames", "keyboard", "mouse", "variables")
                }
                write_chunk(Path(task.root) / chunk_file(index), arrays)
                info = ChunkInfo(index, task.episode, part, task.map_name, task.seed, task.chunk_frames)
                _messages.put(("chunk", info.to_dict()))
    _messages.put(("done", task.episode))


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `record` command's options to `parser`."""
    parser.add_argument("--out", required=True, help="dataset directory (created; resumed if it exists)")
    parser.add_argument("--minutes", type=float, required=True, help="minutes of game time to record")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="parallel game processes")
    parser.add_argument("--seed", type=int, default=0, help="base seed: episodes, maps and policies derive from it")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(96, 176), metavar=("HEIGHT", "WIDTH"), help="stored frame size"
    )
    parser.add_argument("--tics-per-frame", type=int, default=2, help="game tics per video frame (35 tics/s)")
    parser.add_argument("--monsters", action="store_true", help="keep the maps' monsters (default: -nomonsters)")
    parser.add_argument("--maps", nargs="+", default=list(DEFAULT_MAPS), help="freedoom2 maps to play")
    parser.add_argument(
        "--degrees-per-unit",
        type=float,
        default=40.0,
        help="degrees of turn per frame that a mouse label of 1.0 stands for",
    )
    parser.add_argument("--chunk-frames", type=int, default=1000, help="frames per chunk file")
    parser.add_argument("--chunks-per-episode", type=int, default=2, help="chunks per episode (one map, one seed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_record(args: argparse.Namespace) -> None:
    """Run the `record` command from parsed `add_record_arguments` options."""
    manifest = record(
        args.out,
        args.minutes,
        workers=args.workers,
        seed=args.seed,
        size=tuple(args.size),
        tics_per_frame=args.tics_per_frame,
        monsters=args.monsters,
        progress=not args.no_progress,
        maps=tuple(args.maps),
        degrees_per_unit=args.degrees_per_unit,
        chunk_frames=args.chunk_frames,
        chunks_per_episode=args.chunks_per_episode,
    )
    frames = sum(chunk.frames for chunk in manifest.chunks)
    print(
        f"{args.out}: {len(manifest.chunks)} chunks, {len(manifest.episodes)} episodes, {frames} frames "
        f"({frames / manifest.fps / 60:.1f} minutes at {manifest.fps:g} fps)"
    )


def _json_round_trip(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values))


def _vizdoom_version() -> str | None:
    try:
        return metadata.version("vizdoom")
    except metadata.PackageNotFoundError:
        return None
