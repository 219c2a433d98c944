"""The live play window: drive a `MatrixGameEnv` with keyboard and mouse in a pygame window.

Every env step generates one block of video (9 frames first, 12 after). The window plays frames at
the model's frame rate (evenly slower when generation cannot keep up) while a worker thread
generates the next block, so input and drawing never wait for the model. A block's action is
sampled from the controls when that block starts, as late as the frames still queued for display
allow: what you press shows up as early as possible.

    matrixgame-env play --model universal --image street.png --record-dir clips

Its parts: `play_controls` (input -> actions), `play_overlay` (the action drawn on the video),
`play_worker` (generation and mp4 recording off the event loop). These are the package's only
modules that import pygame at import time (the `[play]` extra).
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
try:
    import pygame
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError("the play window needs pygame-ce: pip install 'matrixgame-env[play]'") from error

from .dtype_names import add_dtype_argument, dtype_from_name
from .play_controls import MOUSE_SENSITIVITY, Controls
from .play_overlay import DARK, GREY, RED, WHITE, ActionOverlay
from .play_worker import Generator, Recorder, Request, Result

WINDOW_CLASS = "matrixgame-env"  # X11 WM_CLASS: `xdotool search --classname matrixgame-env` finds the window

_LOOP_HZ = 100  # event-loop rate: input latency and frame-time jitter are at most 10 ms
_HUD_REFRESH_S = 0.25
_MESSAGE_S = 4.0
GUIDANCE_CYCLE = (1.0, 2.0, 3.0)  # G steps through these action-guidance scales (1: the official sampler)


def _first_block_frames(block_frames: int) -> int:
    # The causal VAE decodes the first latent frame to 1 video frame and every later one to 4, so the
    # first block has 3 frames fewer than the others (9 vs 12 for the released models).
    return max(1, block_frames - 3)


@dataclass
class _Shown:
    """A frame queued for display, with the action of its block."""

    frame: np.ndarray
    index: int
    action: Any
    keys: tuple[int, ...] = field(default_factory=tuple)


def default_scale(video_size: tuple[int, int], screen: tuple[int, int] = (1280, 720)) -> int:
    """The largest whole zoom that fits the video (height, width) in `screen` (width, height)."""
    height, width = video_size
    return max(1, min(screen[0] // width, screen[1] // height))


class Viewer:
    """A pygame window that plays a `MatrixGameEnv` live (see the module docstring).

    env: a `MatrixGameEnv`, possibly wrapped; the viewer only calls `reset` and `step` (from its
    worker thread) and never closes it. scale: whole zoom of the video (default: fits 1280x720).
    record_dir: where V saves mp4 recordings. images: start pictures that O cycles through (paths,
    PIL images or HxWx3 uint8 arrays; default: the model's shipped pictures). fps: display rate
    (default: the model's `render_fps`). sensitivity: see `MOUSE_SENSITIVITY`. seed: seed of the
    first reset.
    """

    def __init__(
        self,
        env: Any,
        scale: int | None = None,
        record_dir: str | os.PathLike = "recordings",
        images: Sequence[Any] | None = None,
        *,
        fps: float | None = None,
        sensitivity: float = MOUSE_SENSITIVITY,
        seed: int | None = None,
    ) -> None:
        base = env.unwrapped
        self.env = env
        self.fps = float(fps or env.metadata.get("render_fps", 25))
        self.record_dir = Path(record_dir)
        self.images: list[Any] = list(images) if images is not None else self._shipped_images(base)
        self._image_index = 0
        self._seed = seed
        self._block_frames = int(getattr(base, "block_frames", 12))
        self._model_name = str(getattr(getattr(getattr(base, "world", None), "config", None), "name", "world"))
        sampler = getattr(getattr(base, "world", None), "sampler", None)
        self.action_guidance: float | None = sampler.config.action_guidance if sampler is not None else None
        self._pending_guidance: float | None = None
        height, width = base.observation_space.shape[-3:-1]

        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")  # no sound: avoids ALSA errors on servers
        # pygame's import sets the WM_CLASS to the script's name; replace that default, keep a user's.
        if os.environ.get("SDL_VIDEO_X11_WMCLASS") in (None, os.path.basename(sys.argv[0])):
            os.environ["SDL_VIDEO_X11_WMCLASS"] = WINDOW_CLASS
        pygame.init()
        screen = (1280, 720)
        desktop = pygame.display.get_desktop_sizes()
        if desktop and min(desktop[0]) > 0:  # leave room for the HUD, title bar and task bar
            screen = (min(screen[0], int(desktop[0][0] * 0.9)), min(screen[1], int(desktop[0][1] * 0.8)))
        self.scale = int(scale or default_scale((height, width), screen))
        self.video_rect = pygame.Rect(0, 0, width * self.scale, height * self.scale)
        # Narrow windows (small models at a small zoom) get smaller text and room for wrapped lines.
        narrow = self.video_rect.width < 800
        self._font = pygame.font.Font(None, 17 if narrow else 22)
        self._hud_height = (6 if narrow else 3) * self._font.get_linesize() + 12
        self.window = pygame.display.set_mode((self.video_rect.width, self.video_rect.height + self._hud_height))
        pygame.display.set_caption(f"matrixgame-env play: {self._model_name}")

        self.controls = Controls(base.layout, getattr(base, "mode", None), sensitivity)
        self._overlay = ActionOverlay(self.controls, self.video_rect.height)
        self._help_font = pygame.font.Font(None, 24)
        self._generator = Generator(env)
        self._generator.start()
        self._clock = pygame.time.Clock()

        self.paused = False
        self.help_visible = False
        self.quit_requested = False
        self.last_recording: Path | None = None
        self._recorder: Recorder | None = None
        self._queue: deque[_Shown] = deque()
        self._video: pygame.Surface | None = None  # the scaled frame on screen, with its action drawn
        self._current: _Shown | None = None
        self._epoch = 0  # bumped on every reset: results of older requests are dropped
        self._in_flight = 0
        self._started = False  # a reset was requested at least once
        self._live = False  # the env holds an episode that steps can continue
        self._next_block_frames = _first_block_frames(self._block_frames)
        self._steps_left: int | None = None
        self._next_frame_at = 0.0
        self._shown_times: deque[float] = deque(maxlen=int(self.fps * 2) + 2)
        self._generate_s = 0.0  # moving average, sets how early the next block is started
        self._generate_fps = 0.0
        self._last_block_s = 0.0
        self._message = ""
        self._message_until = 0.0
        self._hud_drawn_at = 0.0
        self._dirty = True
        self._closed = False
        self._set_captured(True)

    # ------------------------------------------------------------------ public API
    @property
    def recording(self) -> bool:
        return self._recorder is not None

    def run(self, max_blocks: int | None = None, max_seconds: float | None = None) -> None:
        """Play until the window is closed or Q is pressed; or, for scripted runs, until `max_blocks`
        more blocks have been generated and shown, or `max_seconds` have passed. Can be called again
        to continue. Raises RuntimeError when generating a block fails."""
        deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        self._steps_left = max_blocks
        if not self._started:
            self._request_reset(self._current_image(), self._seed)
        while True:
            self._handle_events()
            if self.quit_requested:
                break
            self._collect_results()
            self._maybe_start_block()
            self._advance_display()
            self._draw()
            if max_blocks is not None and self._steps_left == 0 and self._in_flight == 0:
                if not self._queue or self.paused:
                    break
            if deadline is not None and time.perf_counter() >= deadline:
                break
            self._clock.tick(_LOOP_HZ)

    def screenshot(self, path: str | os.PathLike) -> Path:
        """Save the window as it looks now (video, overlays and HUD) to an image file."""
        self._draw(force=True)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pygame.image.save(self.window, str(path))
        return path

    def close(self) -> None:
        """Stop recording (saving the file), close the window, and wait for the block being generated
        (the env must not be closed under a running step); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_recording()
        self._set_captured(False)
        pygame.display.quit()  # the window goes at once, even while a slow block finishes
        self._generator.stop()

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ input
    def _handle_events(self) -> None:
        for event in pygame.event.get():
            if event.type == pygame.QUIT:
                self.quit_requested = True
            elif event.type == pygame.WINDOWFOCUSLOST:
                self.controls.release_all()
            elif event.type == pygame.DROPFILE:
                self.images.append(event.file)
                self._image_index = len(self.images) - 1
                self._request_reset(event.file)
            elif event.type == pygame.MOUSEBUTTONDOWN and not self.controls.captured:
                self._set_captured(True)
            elif self.controls.handle(event):
                continue
            elif event.type == pygame.KEYDOWN:
                self._command(event.key)

    def _command(self, key: int) -> None:
        if key == pygame.K_ESCAPE:
            self._set_captured(False)
        elif key == pygame.K_q:  # a game key (templerun) reaches here only with Ctrl
            self.quit_requested = True
        elif key == pygame.K_p:
            self.paused = not self.paused
            self.controls.clear_motion()  # motion while paused must not turn the camera afterwards
            self._next_frame_at = time.perf_counter()
        elif key == pygame.K_r:
            self._request_reset(self._current_image())
        elif key == pygame.K_o:
            if self.images:
                self._image_index = (self._image_index + 1) % len(self.images)
                self._request_reset(self._current_image())
            else:
                self._say("no start pictures to cycle: pass --image or drop an image file on the window")
        elif key == pygame.K_v:
            self._toggle_recording()
        elif key == pygame.K_h:
            self.help_visible = not self.help_visible
        elif key == pygame.K_g:
            self._cycle_guidance()
        self._dirty = True

    def _cycle_guidance(self) -> None:
        """G: the next scale of `GUIDANCE_CYCLE`, applied by the worker before its next request."""
        if self.action_guidance is None:
            self._say("this env has no sampler whose action guidance can change")
            return
        later = [g for g in GUIDANCE_CYCLE if g > self.action_guidance]
        self.action_guidance = later[0] if later else GUIDANCE_CYCLE[0]
        self._pending_guidance = self.action_guidance
        note = "off, as the official sampler" if self.action_guidance == 1.0 else "actions count more"
        self._say(f"action guidance {self.action_guidance:g} ({note})")

    def _set_captured(self, captured: bool) -> None:
        # Grab + hidden pointer puts SDL in relative mode: motion keeps coming at the window edges.
        self.controls.captured = captured
        if pygame.display.get_init():
            pygame.event.set_grab(captured)
            pygame.mouse.set_visible(not captured)
        self._dirty = True

    # ------------------------------------------------------------------ generation
    def _request_reset(self, image: Any, seed: int | None = None) -> None:
        self._epoch += 1
        self._queue.clear()
        self._started = True
        self._in_flight += 1
        self._generator.requests.put(
            Request("reset", self._epoch, image=image, seed=seed, guidance=self._take_pending_guidance())
        )

    def _take_pending_guidance(self) -> float | None:
        guidance, self._pending_guidance = self._pending_guidance, None
        return guidance

    def _maybe_start_block(self) -> None:
        if self.paused or self._in_flight or not self._live or self._steps_left == 0:
            return
        # Start as late as possible (fresher input) but early enough that the block is ready when
        # the frames still queued run out: they must cover the expected generation time.
        lead = math.ceil(self._generate_s / self._frame_period() * 1.2)
        if len(self._queue) > lead:
            return
        action = self.controls.action(self._next_block_frames)
        self._in_flight += 1
        self._generator.requests.put(
            Request("step", self._epoch, action=action, keys=self.controls.last_keys,
                     guidance=self._take_pending_guidance())
        )  # fmt: skip
        if self._steps_left is not None:
            self._steps_left -= 1

    def _collect_results(self) -> None:
        while True:
            try:
                result = self._generator.results.get_nowait()
            except queue.Empty:
                return
            self._in_flight -= 1
            request = result.request
            if result.error is not None:
                self._on_error(result)
            elif request.epoch != self._epoch:
                continue  # a block of the world before the last reset
            elif request.kind == "reset":
                self._live = True
                self._next_block_frames = _first_block_frames(self._block_frames)
                self._queue.extend(_Shown(frame, result.first_index, None) for frame in result.frames)
                self._say(f"started from {self._image_name(request.image)}")
            else:
                self._next_block_frames = self._block_frames
                self._last_block_s = result.generate_s
                self._generate_fps = len(result.frames) / max(result.generate_s, 1e-9)
                weight = 0.3 if self._generate_s else 1.0
                self._generate_s += weight * (result.generate_s - self._generate_s)
                self._queue.extend(
                    _Shown(frame, result.first_index + i, request.action, request.keys)
                    for i, frame in enumerate(result.frames)
                )
                if result.episode_over:
                    self._say("episode over: starting again")
                    self._request_reset(self._current_image())

    def _on_error(self, result: Result) -> None:
        if result.request.kind == "step":
            raise RuntimeError(f"generating a block failed: {result.error}") from result.error
        # A picture that cannot be read: say so and keep playing the world we had (env.reset failed
        # before touching it), or wait for another picture.
        name = self._image_name(result.request.image)
        # Identity, not ==: pictures may be numpy arrays.
        self.images = [image for image in self.images if image is not result.request.image]
        self._image_index = 0
        hint = "" if self._live else " - drop an image file on the window to start"
        self._say(f"cannot start from {name}: {result.error}{hint}")

    def _current_image(self) -> Any:
        return self.images[self._image_index] if self.images else None

    @staticmethod
    def _shipped_images(base: Any) -> list[Any]:
        world = getattr(base, "world", None)
        return list(world.start_image_paths()) if world is not None and hasattr(world, "start_image_paths") else []

    @staticmethod
    def _image_name(image: Any) -> str:
        if image is None:
            return "the model's start picture"
        if isinstance(image, (str, os.PathLike)):
            return Path(image).name
        return "the given picture"

    # ------------------------------------------------------------------ display
    def _advance_display(self) -> None:
        now = time.perf_counter()
        if self.paused or not self._queue or now < self._next_frame_at:
            return
        shown = self._queue.popleft()
        period = self._frame_period()
        # Keep the cadence when on time; after a stall (queue ran dry) restart it from now.
        base = self._next_frame_at if now - self._next_frame_at < period else now
        self._next_frame_at = base + period
        self._shown_times.append(now)
        self._current = shown
        self._video = self._render_video(shown)
        if self._recorder is not None:
            self._recorder.add(
                np.frombuffer(pygame.image.tobytes(self._video, "RGB"), np.uint8).reshape(
                    self._video.get_height(), self._video.get_width(), 3
                )
            )
        self._dirty = True

    def _frame_period(self) -> float:
        """Seconds per shown frame: the model's frame rate, or slower when generation cannot keep
        up, so that play stays smooth instead of bursts of real-time frames and waits."""
        return max(1.0 / self.fps, self._generate_s * 1.1 / self._block_frames)

    def _render_video(self, shown: _Shown) -> pygame.Surface:
        frame = np.ascontiguousarray(shown.frame)
        surface = pygame.image.frombuffer(frame, (frame.shape[1], frame.shape[0]), "RGB")
        video = pygame.transform.smoothscale(surface.convert(), self.video_rect.size)
        if shown.action is not None:
            self._overlay.draw(video, shown.keys, shown.action)
        return video

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not (force or self._dirty or now - self._hud_drawn_at >= _HUD_REFRESH_S):
            return
        self.window.fill(DARK)
        if self._video is not None:
            self.window.blit(self._video, self.video_rect)
        if self.help_visible:
            self._draw_help()
        self._draw_hud(now)
        pygame.display.flip()
        self._hud_drawn_at = now
        self._dirty = False

    def _draw_hud(self, now: float) -> None:
        times = self._shown_times
        display_fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        if times and now - times[-1] > 1.0:
            display_fps = 0.0
        index = self._current.index if self._current is not None else 0
        status = []
        if self.paused:
            status.append("PAUSED (P)")
        if self._recorder is not None:
            status.append(f"REC {self._recorder.frames / self.fps:.1f} s -> {self._recorder.path}")
        if not self.controls.captured:
            status.append("pointer free: click to capture")
        if self._message and now < self._message_until:
            status.append(self._message)
        status.append("H help")
        held = " ".join(self.controls.held_names()) or "-"
        inputs = [f"keys held {held}"]
        preview = self.controls.preview(self._next_block_frames)
        if isinstance(preview, dict) and "mouse" in preview:
            inputs.append(f"next mouse pitch {preview['mouse'][0]:+.3f} yaw {preview['mouse'][1]:+.3f}")
        timing = [
            f"generate {self._generate_fps:5.1f} fps",
            f"display {display_fps:5.1f} fps",
            f"block {self._last_block_s:.2f} s",
            f"frame {index}",
        ]
        if self.action_guidance is not None:
            timing.append(f"guidance {self.action_guidance:g} (G)")
        groups = [(timing, WHITE), (inputs, WHITE), (status, RED if self._recorder is not None else GREY)]
        self._draw_text_groups(groups, self.video_rect.bottom + 6)

    def _draw_text_groups(
        self, groups: list[tuple[list[str], tuple[int, int, int]]], top: int, font: pygame.font.Font | None = None
    ) -> int:
        """Each group starts a line; its items flow and wrap at the window's edge (narrow windows).
        Returns the y below the last line."""
        font = font or self._font
        line_height, left = font.get_linesize(), 8
        gap, right = font.size("   ")[0], self.window.get_width() - left
        y = top
        for items, colour in groups:
            x = left
            for item in items:
                width = font.size(item)[0]
                if x > left and x + width > right:
                    x, y = left, y + line_height
                self.window.blit(font.render(item, True, colour), (x, y))
                x += width + gap
            y += line_height
        return y

    def _draw_help(self) -> None:
        controls = self.controls
        layout = controls.layout
        game = [f"{pygame.key.name(key).upper()} {layout.keys[index]}" for key, index in controls.key_map.items()]
        directions = {(0, 1.0): "up", (0, -1.0): "down", (1, -1.0): "left", (1, 1.0): "right"}
        camera = [
            f"{pygame.key.name(key).upper()} {directions.get(move, move)}" for key, move in controls.camera_keys.items()
        ]
        quit_keys = "Ctrl+Q" if controls.is_game_key(pygame.K_q) else "Q"
        groups = [["game keys:", *game]]
        if layout.mouse:
            groups.append(["camera: mouse (pointer captured)", *camera])
        groups += [
            ["P pause", "R restart", "O next start picture", "drop an image file: start from it"],
            [f"V record mp4 to {self.record_dir}/", "G action guidance 1 / 2 / 3", "H this help"],
            ["Esc free the pointer (click to capture)", f"{quit_keys} or close the window: quit"],
        ]
        shade = pygame.Surface(self.video_rect.size, pygame.SRCALPHA)
        shade.fill((0, 0, 0, 170))
        self.window.blit(shade, self.video_rect)
        self._draw_text_groups([(items, WHITE) for items in groups], 12, self._help_font)

    def _say(self, text: str) -> None:
        self._message, self._message_until = text, time.perf_counter() + _MESSAGE_S
        self._dirty = True

    # ------------------------------------------------------------------ recording
    def _toggle_recording(self) -> None:
        if self._recorder is not None:
            self._stop_recording()
            return
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = self.record_dir / f"{self._model_name}-{stamp}.mp4"
        suffix = 1
        while path.exists():
            suffix += 1
            path = self.record_dir / f"{self._model_name}-{stamp}-{suffix}.mp4"
        try:
            self._recorder = Recorder(path, self.fps)
        except (OSError, RuntimeError) as error:
            self._say(f"cannot record: {error}")
            return
        self._say(f"recording to {path}")

    def _stop_recording(self) -> None:
        if self._recorder is None:
            return
        recorder, self._recorder = self._recorder, None
        self.last_recording = recorder.close()
        self._say(f"saved {self.last_recording} ({recorder.frames} frames)")
        print(f"saved {self.last_recording}")


def add_play_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of `matrixgame-env play` to `parser` (returned for chaining)."""
    parser.add_argument("--model", default=None, help="preset name, model folder or hub id (default: bundled)")
    parser.add_argument(
        "--image",
        nargs="+",
        action="extend",
        default=None,
        metavar="PATH",
        help="start pictures (O cycles through them; default: the model's shipped pictures)",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: the env's choice)")
    add_dtype_argument(parser)
    parser.add_argument("--scale", type=int, default=None, help="whole zoom of the video (default: fits 1280x720)")
    parser.add_argument("--record-dir", default="recordings", help="folder of V's mp4 recordings")
    parser.add_argument("--fps", type=float, default=None, help="display frame rate (default: the model's)")
    parser.add_argument(
        "--sensitivity",
        type=float,
        default=MOUSE_SENSITIVITY,
        help=f"camera turn per pixel of mouse motion (default: {MOUSE_SENSITIVITY}: 300 px per block ~ a normal turn)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the first world")
    parser.add_argument(
        "--action-guidance", type=float, default=None,
        help="how strongly the actions act (1: the official sampler; default: the model's config; G cycles it)",
    )  # fmt: skip
    parser.add_argument(
        "--keyboard-guidance", type=float, default=None,
        help="a separate, fixed guidance scale for the keys (default: the model's config, else the action guidance)",
    )  # fmt: skip
    return parser


def play_main(args: argparse.Namespace) -> int:
    """Run `matrixgame-env play` with parsed arguments; returns the exit status."""
    from .env import MatrixGameEnv

    kwargs = {
        "device": args.device,
        "dtype": dtype_from_name(args.dtype),
        "action_guidance": args.action_guidance,
        "keyboard_guidance": args.keyboard_guidance,
    }
    if args.model is not None:
        kwargs["model"] = args.model
    env = MatrixGameEnv(**kwargs)
    try:
        with Viewer(
            env,
            scale=args.scale,
            record_dir=args.record_dir,
            images=args.image,
            fps=args.fps,
            sensitivity=args.sensitivity,
            seed=args.seed,
        ) as viewer:
            viewer.run()
    finally:
        env.close()
    return 0
