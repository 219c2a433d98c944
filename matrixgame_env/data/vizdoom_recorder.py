"""Headless ViZDoom gameplay, driven by `ExplorationPolicy`, labelled in Matrix-Game's universal layout.

Timing convention: frame t is the screen before action t; action t is held for `tics_per_frame` game
tics and leads to frame t + 1; the variables of row t are read together with frame t.

Mouse labels are exact: the engine turns (and pitches) in whole steps of 360/65536 degree per tic,
rounding the requested angle down, so the recorder asks for a whole number of steps and labels what
the engine then does.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .doom_map import Walls, load_walls
from .policy import RAY_ANGLES, ExplorationPolicy, PolicyConfig

TICRATE = 35  # game tics per second
ANGLE_STEP = 360.0 / 65536.0  # degrees: the engine's resolution for turning per tic
GAME_VARIABLES = (
    "POSITION_X",
    "POSITION_Y",
    "POSITION_Z",
    "ANGLE",
    "PITCH",
    "VELOCITY_X",
    "VELOCITY_Y",
    "HEALTH",
    "KILLCOUNT",
)
# EPISODE_START: first frame after the game (re)started; DEAD: this frame's action killed the player.
FLAGS = ("EPISODE_START", "DEAD")
VARIABLE_NAMES = GAME_VARIABLES + FLAGS
_EPISODE_START = VARIABLE_NAMES.index("EPISODE_START")
_DEAD = VARIABLE_NAMES.index("DEAD")
_STRAIGHT_RAY = RAY_ANGLES.index(0.0)
KEYBOARD_KEYS = ("forward", "back", "left", "right")  # W, S, A, D
MOUSE_AXES = ("pitch", "yaw")  # positive: look up, turn right
DEFAULT_MAPS = tuple(f"MAP{number:02d}" for number in range(1, 11))
# ViZDoom's 16:9 screen resolutions, smallest first.
WIDE_RESOLUTIONS = (
    (256, 144),
    (320, 180),
    (400, 225),
    (512, 288),
    (640, 360),
    (800, 450),
    (1024, 576),
    (1280, 720),
    (1600, 900),
    (1920, 1080),
)


@dataclass(frozen=True)
class RecorderConfig:
    """What to record and how. `size` is (height, width) of the stored frames; one video frame spans
    `tics_per_frame` game tics; a mouse label of 1.0 means `degrees_per_unit` degrees in one frame."""

    size: tuple[int, int] = (96, 176)
    tics_per_frame: int = 2
    degrees_per_unit: float = 40.0
    maps: tuple[str, ...] = DEFAULT_MAPS
    monsters: bool = False
    skill: int = 3  # only matters with monsters
    wad: str = "freedoom2.wad"  # a file name inside the vizdoom package, or a path
    render_resolution: str | None = None  # e.g. "RES_320X180"; None picks one from `size`
    warmup_tics: int = 10  # the engine ignores turning for the first ~7 tics of a map
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        height, width = self.size
        if height <= 0 or width <= 0:
            raise ValueError(f"frame size must be positive (height, width), got {self.size}")
        if self.tics_per_frame < 1:
            raise ValueError(f"tics_per_frame must be at least 1, got {self.tics_per_frame}")
        if self.degrees_per_unit <= 0:
            raise ValueError(f"degrees_per_unit must be positive, got {self.degrees_per_unit}")
        if not self.maps:
            raise ValueError("at least one map is needed")

    @property
    def fps(self) -> float:
        """Video frames per second of game time."""
        return TICRATE / self.tics_per_frame

    @property
    def screen_resolution(self) -> str:
        """The ViZDoom resolution rendered before resizing: the smallest 16:9 one at least 1.5 times the
        frame size (downscaling by that much keeps the antialiased result sharp)."""
        if self.render_resolution is not None:
            return self.render_resolution
        height, width = self.size
        for render_width, render_height in WIDE_RESOLUTIONS:
            if render_width >= 1.5 * width and render_height >= 1.5 * height:
                return f"RES_{render_width}X{render_height}"
        return "RES_{}X{}".format(*WIDE_RESOLUTIONS[-1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (lists for tuples)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RecorderConfig:
        policy = values.get("policy", {})
        policy = PolicyConfig(**{key: _tuples(value) for key, value in policy.items()})
        return cls(**{key: _tuples(value) for key, value in values.items() if key != "policy"}, policy=policy)


@dataclass
class Trajectory:
    """T consecutive frames of one episode and their labels."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    keyboard: np.ndarray  # int8 [T, 4]: forward, back, left, right
    mouse: np.ndarray  # float32 [T, 2]: pitch (up +), yaw (right +), model units
    variables: np.ndarray  # float32 [T, len(VARIABLE_NAMES)]

    def __len__(self) -> int:
        return len(self.frames)


class DoomRecorder:
    """Headless ViZDoom that records labelled trajectories.

    Use `start_episode(seed, map_name)`, then `record(num_frames)` as often as needed: consecutive calls
    continue the same trajectory. When the player dies or leaves the map the game restarts on the same
    map (flagged EPISODE_START). The same seed and map give the same frames and labels.

    ViZDoom keeps a cache folder `_vizdoom/` in the current working directory (and writes
    `vizdoom-crash.log` there if the engine crashes); `record()` runs its games in worker processes
    that work in a temporary directory.
    """

    def __init__(self, config: RecorderConfig | None = None) -> None:
        self.config = config or RecorderConfig()
        self._vizdoom = _import_vizdoom()
        self._wad = wad_path(self.config.wad)
        self._settings_dir = tempfile.TemporaryDirectory(prefix="matrixgame-vizdoom-")
        self._game: Any = None
        self._map: str | None = None
        self._walls: Walls | None = None
        self._rng: np.random.Generator | None = None
        self._policy: ExplorationPolicy | None = None
        self._restarted = False
        self._crop_box = (0.0, 0.0, 0.0, 0.0)

    def start_episode(self, seed: int, map_name: str) -> None:
        """Start `map_name` with everything random (game, policy, restarts) derived from `seed`."""
        if map_name not in self.config.maps:
            raise ValueError(f"map {map_name!r} is not one of {self.config.maps}")
        if map_name != self._map:
            # One engine per map: an engine that has loaded several maps often segfaults when it exits.
            self._close_game()
            self._game = self._create_game(map_name)
            self._walls = load_walls(self._wad, map_name)
            self._map = map_name
            width, height = self._game.get_screen_width(), self._game.get_screen_height()
            self._crop_box = _crop_box(width, height, self.config.size)
        self._rng = np.random.default_rng(seed)
        self._policy = ExplorationPolicy(int(self._rng.integers(2**63)), fps=self.config.fps, config=self.config.policy)
        self._new_game()

    def record(self, num_frames: int) -> Trajectory:
        """The next `num_frames` frames of the episode with their actions and variables."""
        if self._policy is None or self._walls is None:
            raise RuntimeError("call start_episode() before record()")
        height, width = self.config.size
        frames = np.empty((num_frames, height, width, 3), np.uint8)
        keyboard = np.empty((num_frames, len(KEYBOARD_KEYS)), np.int8)
        mouse = np.empty((num_frames, len(MOUSE_AXES)), np.float32)
        variables = np.zeros((num_frames, len(VARIABLE_NAMES)), np.float32)
        tics = self.config.tics_per_frame
        per_frame_unit = ANGLE_STEP * tics / self.config.degrees_per_unit
        game = self._game
        for t in range(num_frames):
            if game.is_episode_finished():
                self._policy.reset()
                self._new_game()
            state = game.get_state()
            frames[t] = self._resize(state.screen_buffer)
            values = state.game_variables
            variables[t, : len(GAME_VARIABLES)] = values
            variables[t, _EPISODE_START] = float(self._restarted)
            self._restarted = False

            # The engine's PITCH grows downwards and its ANGLE counter-clockwise; the policy uses up and right.
            x, y, angle = values[0], values[1], values[3]
            clearance = self._walls.distances(x, y, angle - np.array(RAY_ANGLES))
            door = float(self._walls.door_distances(x, y, np.array([angle]))[0])
            door_ahead = door if door < clearance[_STRAIGHT_RAY] else None
            action = self._policy.act((x, y), pitch=-values[4], clearance=clearance, door_ahead=door_ahead)
            pitch_steps = _steps_per_tic(action.pitch, tics)
            yaw_steps = _steps_per_tic(action.yaw, tics)
            game.make_action(
                [*action.keyboard.tolist(), int(action.use), _button(yaw_steps), _button(pitch_steps)], tics
            )
            keyboard[t] = action.keyboard
            mouse[t] = (pitch_steps * per_frame_unit, yaw_steps * per_frame_unit)
            if game.is_episode_finished() and game.is_player_dead():
                variables[t, _DEAD] = 1.0
        return Trajectory(frames, keyboard, mouse, variables)

    def close(self) -> None:
        """Shut the game down."""
        self._close_game()
        self._settings_dir.cleanup()

    def __enter__(self) -> DoomRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _close_game(self) -> None:
        if self._game is not None:
            self._game.close()
            self._game = None
            self._map = None

    def _create_game(self, map_name: str) -> Any:
        vzd = self._vizdoom
        config = self.config
        game = vzd.DoomGame()
        game.set_doom_game_path(self._wad)
        # Keep the engine's settings file out of the working directory.
        game.set_doom_config_path(os.path.join(self._settings_dir.name, "vizdoom.ini"))
        game.set_doom_map(map_name)
        if not config.monsters:
            game.add_game_args("-nomonsters")
        game.set_doom_skill(config.skill)
        try:
            game.set_screen_resolution(getattr(vzd.ScreenResolution, config.screen_resolution))
        except AttributeError:
            raise ValueError(f"unknown ViZDoom resolution {config.screen_resolution!r}") from None
        game.set_screen_format(vzd.ScreenFormat.RGB24)
        game.set_render_hud(False)
        game.set_render_crosshair(False)
        game.set_render_weapon(True)
        game.set_render_messages(False)
        game.set_window_visible(False)
        game.set_sound_enabled(False)
        game.set_mode(vzd.Mode.PLAYER)
        game.set_episode_timeout(0)
        buttons = ("MOVE_FORWARD", "MOVE_BACKWARD", "MOVE_LEFT", "MOVE_RIGHT", "USE")
        game.set_available_buttons(
            [getattr(vzd.Button, name) for name in buttons]
            + [vzd.Button.TURN_LEFT_RIGHT_DELTA, vzd.Button.LOOK_UP_DOWN_DELTA]
        )
        game.set_available_game_variables([getattr(vzd.GameVariable, name) for name in GAME_VARIABLES])
        game.init()
        return game

    def _new_game(self) -> None:
        assert self._rng is not None
        self._game.set_seed(int(self._rng.integers(2**31)))
        self._game.new_episode()
        self._game.make_action([0] * self._game.get_available_buttons_size(), self.config.warmup_tics)
        self._restarted = True

    def _resize(self, screen: np.ndarray) -> np.ndarray:
        height, width = self.config.size
        image = Image.fromarray(screen).resize((width, height), Image.Resampling.BICUBIC, box=self._crop_box)
        return np.asarray(image)


def _steps_per_tic(degrees_per_frame: float, tics: int) -> int:
    """Whole engine angle steps per tic closest to turning `degrees_per_frame` over the frame."""
    return round(degrees_per_frame / tics / ANGLE_STEP)


def _button(steps: int) -> float:
    # A quarter step of margin: the engine rounds down, so this lands exactly on `steps` for either sign.
    return (steps + 0.25) * ANGLE_STEP


def _crop_box(screen_width: int, screen_height: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred part of the screen with the aspect ratio of `size` (height, width)."""
    height, width = size
    if screen_width * height > width * screen_height:  # screen wider than the frame: trim the sides
        kept = screen_height * width / height
        return ((screen_width - kept) / 2, 0.0, (screen_width + kept) / 2, float(screen_height))
    kept = screen_width * height / width
    return (0.0, (screen_height - kept) / 2, float(screen_width), (screen_height + kept) / 2)


def wad_path(wad: str) -> str:
    """The path of a WAD file: a file name inside the vizdoom package (e.g. "freedoom2.wad") or a path."""
    if os.path.sep not in wad:
        wad = os.path.join(os.path.dirname(_import_vizdoom().__file__), wad)
    if not os.path.isfile(wad):
        raise FileNotFoundError(f"game data {wad} not found")
    return wad


def _import_vizdoom() -> Any:
    try:
        import vizdoom
    except ImportError as error:
        raise ImportError("recording needs ViZDoom: pip install 'matrixgame-env[data]' (vizdoom)") from error
    check_engine_executable(os.path.join(os.path.dirname(vizdoom.__file__), "vizdoom"))
    return vizdoom


def check_engine_executable(engine: str) -> None:
    """Raise a clear error when ViZDoom's engine program exists but may not run: the engine then dies
    without a Python error (a package unpacked by a tool that drops file modes, e.g. `zipfile`)."""
    if os.path.isfile(engine) and not os.access(engine, os.X_OK):
        raise PermissionError(
            f"ViZDoom's engine {engine} is not executable; reinstall vizdoom with pip, or run `chmod +x {engine}`"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value
