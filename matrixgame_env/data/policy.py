"""A seeded exploration policy that drives a first-person game like a restless human player.

It holds key combinations for a while (mostly running forward, sometimes backing, strafing or standing
still), turns at a smoothly varying rate (an Ornstein-Uhlenbeck process), sometimes turns on the spot,
and lets the view pitch drift and come back towards level. Given the free distance along a few rays
(`RAY_ANGLES`) it steers away from walls ahead and sometimes turns towards the most open direction
before a run. It gets itself unstuck: when the position barely changes for about a second while a
movement key is held, it presses USE and keeps pushing (most blockages are doors); stuck again soon
after, it backs off and turns away. It knows nothing about the game engine.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEYS = "WSAD"  # forward, back, strafe left, strafe right: the universal keyboard layout
# Directions of the clearance rays, in degrees to the right of the view direction.
RAY_ANGLES = (-135.0, -90.0, -45.0, -20.0, 0.0, 20.0, 45.0, 90.0, 135.0, 180.0)
_AHEAD = [RAY_ANGLES.index(angle) for angle in (-20.0, 0.0, 20.0)]
_LEFT = [RAY_ANGLES.index(angle) for angle in (-90.0, -45.0)]
_RIGHT = [RAY_ANGLES.index(angle) for angle in (45.0, 90.0)]

# (keys held, weight): running forward dominates, as in human play.
DEFAULT_MOVES: tuple[tuple[str, float], ...] = (
    ("W", 0.50),
    ("WA", 0.07),
    ("WD", 0.07),
    ("S", 0.06),
    ("A", 0.06),
    ("D", 0.06),
    ("SA", 0.02),
    ("SD", 0.02),
)


@dataclass(frozen=True)
class PolicyConfig:
    """Behaviour of `ExplorationPolicy`. Distances in map units, angles in degrees, rates in degrees
    per second, times in seconds."""

    moves: tuple[tuple[str, float], ...] = DEFAULT_MOVES
    pause_weight: float = 0.10  # stand still: no keys, no turning
    spin_weight: float = 0.12  # turn on the spot: no keys, sustained turning
    move_seconds: tuple[float, float] = (0.6, 3.0)
    pause_seconds: tuple[float, float] = (0.4, 1.5)
    spin_seconds: tuple[float, float] = (0.5, 2.0)
    spin_rate: tuple[float, float] = (60.0, 140.0)
    yaw_rate_std: float = 30.0  # stationary spread of the random process that drives the turning rate
    yaw_rate_reversion: float = 1.0  # 1/s: how fast that process forgets its past
    yaw_smoothing: float = 0.3  # s: the turning rate follows the process through a low-pass filter
    max_yaw_rate: float = 170.0
    pitch_target_std: float = 10.0  # the view drifts around level by about this much
    pitch_target_reversion: float = 0.3  # 1/s
    pitch_gain: float = 2.0  # 1/s: how fast the view follows its drifting target
    max_pitch_rate: float = 60.0
    avoid_distance: float = 192.0  # a wall closer than this ahead makes a forward run steer away
    avoid_rate: tuple[float, float] = (30.0, 100.0)  # steering rate at avoid_distance and at the wall
    seek_probability: float = 0.3  # a forward run first turns towards the most open direction
    use_per_second: float = 0.25  # random USE presses (doors, switches) besides the ones when stuck ...
    use_when_close_per_second: float = 4.0  # ... and more often when a wall or door is ahead within reach
    use_reach: float = 64.0
    stuck_seconds: float = 1.0
    stuck_distance: float = 24.0  # moving less than this over stuck_seconds counts as stuck
    push_seconds: float = 1.0  # after USE, keep pushing forward so an opening door lets us through
    retry_seconds: float = 4.0  # stuck again within this time of the last time: back off and turn away
    back_off_seconds: tuple[float, float] = (0.3, 0.8)
    escape_turn: tuple[float, float] = (90.0, 180.0)


@dataclass(frozen=True)
class PolicyAction:
    """One frame's action: `keyboard` int8 [4] multi-hot in W, S, A, D order; `yaw` degrees turned
    right and `pitch` degrees looked up during the frame; `use` presses the game's USE button."""

    keyboard: np.ndarray
    yaw: float
    pitch: float
    use: bool


@dataclass
class _Segment:
    keys: str
    frames_left: int
    yaw_rate: float | None  # degrees per second, or None to follow the smooth turning process


class ExplorationPolicy:
    """Seeded, deterministic exploration policy: the same seed and observations give the same actions.

    `fps` is the video frame rate: the policy thinks in seconds and degrees per second and answers per
    frame, so its behaviour in game time does not depend on the frame rate.
    """

    def __init__(self, seed: int, fps: float = 17.5, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.fps = float(fps)
        self._rng = np.random.default_rng(seed)
        self._stuck_window = max(2, round(self.config.stuck_seconds * self.fps))
        self._frame = 0
        self.reset()

    def reset(self) -> None:
        """Forget the plan and the position history (call when the game restarts); the random stream
        goes on, so a restarted game is explored differently."""
        self._plan: deque[_Segment] = deque()
        self._positions: deque[tuple[float, float]] = deque()  # the last frames' positions ...
        self._moving: deque[bool] = deque()  # ... and whether a movement key was held after each
        self._last_stuck_frame: int | None = None
        self._avoid_side = 0.0  # +1 / -1 while steering right / left away from a wall
        self._yaw_drive = 0.0  # degrees per second: the random process ...
        self._yaw_rate = 0.0  # ... and the turning rate that follows it smoothly
        self._pitch_target = 0.0

    def act(
        self,
        position: tuple[float, float],
        pitch: float,
        clearance: Sequence[float] | None = None,
        door_ahead: float | None = None,
    ) -> PolicyAction:
        """Next action from the player's map position (x, y), view pitch (degrees, up positive) and,
        optionally, the free distance along each of `RAY_ANGLES` and the distance to a closed door
        straight ahead (map units)."""
        reach = self.config.use_reach
        close = (clearance is not None and min(clearance[i] for i in _AHEAD) < reach) or (
            door_ahead is not None and door_ahead < reach
        )
        use_rate = self.config.use_when_close_per_second if close else self.config.use_per_second
        use = self._rng.random() < use_rate / self.fps
        if self._is_stuck(position):
            use = True
            self._plan_recovery()
        while not self._plan or self._plan[0].frames_left <= 0:
            if self._plan and self._plan.popleft().yaw_rate is not None:
                # After a fixed turn (or none) the smooth turning starts from rest, not from its old rate.
                self._yaw_rate = self._yaw_drive = 0.0
            if not self._plan:
                self._plan_segment(clearance)
        segment = self._plan[0]
        segment.frames_left -= 1

        self._advance_processes()
        yaw_rate = self._yaw_rate if segment.yaw_rate is None else segment.yaw_rate
        if segment.yaw_rate is None and "W" in segment.keys and clearance is not None:
            yaw_rate = self._steer_clear(yaw_rate, np.asarray(clearance, dtype=np.float64))
        limit = self.config.max_pitch_rate
        pitch_rate = float(np.clip(self.config.pitch_gain * (self._pitch_target - pitch), -limit, limit))
        keyboard = np.array([key in segment.keys for key in KEYS], dtype=np.int8)
        self._remember(position, moving=bool(segment.keys))
        self._frame += 1
        return PolicyAction(keyboard=keyboard, yaw=yaw_rate / self.fps, pitch=pitch_rate / self.fps, use=bool(use))

    def _advance_processes(self) -> None:
        """One frame of the Ornstein-Uhlenbeck processes (exact discretisation) behind the turning rate and
        the pitch target. The rate follows its process through a low-pass filter: an Ornstein-Uhlenbeck
        path itself is continuous but rough, and would make the view shake."""
        c = self.config
        dt = 1.0 / self.fps
        decay = math.exp(-c.yaw_rate_reversion * dt)
        noise = self._rng.normal()
        self._yaw_drive = self._yaw_drive * decay + c.yaw_rate_std * math.sqrt(1 - decay**2) * noise
        self._yaw_rate += (1 - math.exp(-dt / c.yaw_smoothing)) * (self._yaw_drive - self._yaw_rate)
        self._yaw_rate = float(np.clip(self._yaw_rate, -c.max_yaw_rate, c.max_yaw_rate))
        decay = math.exp(-c.pitch_target_reversion * dt)
        noise = self._rng.normal()
        self._pitch_target = self._pitch_target * decay + c.pitch_target_std * math.sqrt(1 - decay**2) * noise

    def _steer_clear(self, yaw_rate: float, clearance: np.ndarray) -> float:
        """Turn away from a wall ahead, harder the closer it is, keeping the chosen side until the way
        ahead is clear by a margin (without it the turn flickers on and off at the threshold)."""
        c = self.config
        ahead = float(clearance[_AHEAD].min())
        if ahead >= c.avoid_distance * (1.5 if self._avoid_side else 1.0):
            self._avoid_side = 0.0
            return yaw_rate
        if self._avoid_side == 0.0:
            right, left = clearance[_RIGHT].sum(), clearance[_LEFT].sum()
            self._avoid_side = 1.0 if right > left or (right == left and self._rng.random() < 0.5) else -1.0
        urgency = max(0.0, 1.0 - ahead / c.avoid_distance)
        low, high = c.avoid_rate
        # The turning processes continue from the steering rate, so leaving the turn is smooth too.
        self._yaw_rate = self._yaw_drive = self._avoid_side * (low + urgency * (high - low))
        return self._yaw_rate

    def _frames(self, seconds: tuple[float, float] | float) -> int:
        if isinstance(seconds, tuple):
            seconds = self._rng.uniform(*seconds)
        return max(1, round(seconds * self.fps))

    def _spin_rate(self) -> float:
        return float(self._rng.uniform(*self.config.spin_rate))

    def _plan_segment(self, clearance: Sequence[float] | None) -> None:
        c = self.config
        names = [keys for keys, _ in c.moves] + ["pause", "spin"]
        weights = np.array([weight for _, weight in c.moves] + [c.pause_weight, c.spin_weight])
        choice = names[self._rng.choice(len(names), p=weights / weights.sum())]
        if choice == "pause":
            self._plan.append(_Segment("", self._frames(c.pause_seconds), 0.0))
        elif choice == "spin":
            rate = self._spin_rate() * self._rng.choice((-1.0, 1.0))
            self._plan.append(_Segment("", self._frames(c.spin_seconds), rate))
        else:
            if "W" in choice and clearance is not None and self._rng.random() < c.seek_probability:
                self._turn_towards_open_space(np.asarray(clearance, dtype=np.float64))
            self._plan.append(_Segment(choice, self._frames(c.move_seconds), None))

    def _turn_towards_open_space(self, clearance: np.ndarray) -> None:
        """Turn on the spot towards a ray chosen with probability growing with its free distance."""
        weights = clearance**2
        angle = RAY_ANGLES[self._rng.choice(len(RAY_ANGLES), p=weights / weights.sum())]
        if angle == 180.0:
            angle *= self._rng.choice((-1.0, 1.0))
        if angle != 0.0:
            rate = math.copysign(self._spin_rate(), angle)
            self._plan.append(_Segment("", self._frames(abs(angle / rate)), rate))

    def _is_stuck(self, position: tuple[float, float]) -> bool:
        """A movement key was held for the whole last `stuck_seconds` but we barely moved."""
        if len(self._positions) < self._stuck_window or not all(self._moving):
            return False
        start = self._positions[0]
        return math.hypot(position[0] - start[0], position[1] - start[1]) < self.config.stuck_distance

    def _plan_recovery(self) -> None:
        """First push on with USE (most blockages are doors); stuck again soon after: back off, turn away."""
        c = self.config
        last = self._last_stuck_frame
        self._plan.clear()
        if last is not None and self._frame - last < c.retry_seconds * self.fps:
            turn = self._rng.uniform(*c.escape_turn)
            rate = self._spin_rate() * self._rng.choice((-1.0, 1.0))
            self._plan.append(_Segment("S", self._frames(c.back_off_seconds), None))
            self._plan.append(_Segment("", self._frames(turn / abs(rate)), rate))
            self._last_stuck_frame = None
        else:
            self._plan.append(_Segment("W", self._frames(c.push_seconds), 0.0))
            self._last_stuck_frame = self._frame
        self._positions.clear()
        self._moving.clear()

    def _remember(self, position: tuple[float, float], moving: bool) -> None:
        self._positions.append((float(position[0]), float(position[1])))
        self._moving.append(moving)
        while len(self._positions) > self._stuck_window:
            self._positions.popleft()
            self._moving.popleft()
