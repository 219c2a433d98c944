"""The play window's background threads: the generator (env.reset / env.step off the event loop)
and the mp4 recorder, so that neither input nor drawing ever waits for them."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Request:
    """What the event loop asks the generator for: a reset or a step of the world it shows."""

    kind: str  # "reset" or "step"
    epoch: int
    action: Any = None
    keys: tuple[int, ...] = ()
    image: Any = None
    seed: int | None = None
    guidance: float | None = None  # action guidance to use from this request on (None: unchanged)


@dataclass
class Result:
    """A request's video (or the error it raised), with where its frames sit in the episode."""

    request: Request
    frames: np.ndarray | None = None  # [T, H, W, 3] uint8
    first_index: int = 0  # video frame index of frames[0]
    generate_s: float = 0.0
    episode_over: bool = False
    error: BaseException | None = None


class Generator(threading.Thread):
    """Runs env.reset / env.step off the event loop, one request at a time, results in order."""

    def __init__(self, env: Any) -> None:
        super().__init__(name="matrixgame-generator", daemon=True)  # never keeps a closing app alive
        self.env = env
        self.requests: queue.Queue[Request | None] = queue.Queue()
        self.results: queue.Queue[Result] = queue.Queue()

    def run(self) -> None:
        while (request := self.requests.get()) is not None:
            try:
                self.results.put(self._serve(request))
            except Exception as error:  # reported to the event loop, which decides
                self.results.put(Result(request, error=error))

    def _serve(self, request: Request) -> Result:
        if request.guidance is not None:  # here, between blocks: never while the sampler runs
            self.env.unwrapped.world.sampler.set_action_guidance(request.guidance)
        if request.kind == "reset":
            options = None if request.image is None else {"image": request.image}
            _, info = self.env.reset(seed=request.seed, options=options)
            return Result(request, frames=np.asarray(info["frames"]), first_index=int(info.get("frame_index", 0)))
        started = time.perf_counter()
        _, _, terminated, truncated, info = self.env.step(request.action)
        elapsed = time.perf_counter() - started
        frames = np.asarray(info["frames"])
        generate_s = info.get("timing", {}).get("generate_s", elapsed)
        last_index = int(info.get("frame_index", 0))
        return Result(request, frames, last_index - len(frames) + 1, generate_s, bool(terminated or truncated))

    def stop(self, timeout: float = 300.0) -> None:
        self.requests.put(None)
        self.join(timeout)


class Recorder:
    """Writes frames to an mp4 from its own thread, so encoding never stalls the window."""

    def __init__(self, path: Path, fps: float) -> None:
        try:
            import imageio.v2 as imageio
        except ImportError as error:
            raise RuntimeError("recording needs imageio-ffmpeg: pip install 'matrixgame-env[play]'") from error
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.frames = 0
        self._writer = imageio.get_writer(
            path, fps=fps, codec="libx264", quality=8, pixelformat="yuv420p", ffmpeg_log_level="error"
        )
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue()
        self._thread = threading.Thread(target=self._write, name="matrixgame-recorder", daemon=True)
        self._thread.start()

    def add(self, frame: np.ndarray) -> None:
        self.frames += 1
        self._queue.put(frame)

    def close(self) -> Path:
        self._queue.put(None)
        self._thread.join()
        return self.path

    def _write(self) -> None:
        try:
            while (frame := self._queue.get()) is not None:
                self._writer.append_data(frame)
        finally:
            self._writer.close()
