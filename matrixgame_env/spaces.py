"""Action layouts per mode: Gymnasium spaces, conversion to the model's keyboard/mouse tensors,
and the keyboard maps of the play window.

Layouts follow the official checkpoints: universal keyboard [W, S, A, D] multi-hot + mouse
[pitch, yaw] (up and right positive, 0.1 per video frame is a normal turn); gta_drive keyboard
[W, S] + mouse (steering on yaw); templerun one-hot of 7 moves, no mouse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces

TEMPLERUN_MOVES = ("none", "jump", "slide", "turn_left", "turn_right", "left_side", "right_side")


@dataclass(frozen=True)
class ActionLayout:
    """How one model reads actions: key names in order, one-hot or multi-hot, mouse or not."""

    name: str
    keys: tuple[str, ...]
    one_hot: bool = False
    mouse: bool = True
    mouse_limit: float = 0.3  # bound of each mouse axis, model units per video frame

    @property
    def keyboard_dim(self) -> int:
        return len(self.keys)

    def action_space(self) -> spaces.Space:
        if self.one_hot:
            return spaces.Discrete(self.keyboard_dim)
        parts: dict[str, spaces.Space] = {"keyboard": spaces.MultiBinary(self.keyboard_dim)}
        if self.mouse:
            parts["mouse"] = spaces.Box(-self.mouse_limit, self.mouse_limit, (2,), np.float32)
        return spaces.Dict(parts)

    def noop(self) -> Any:
        if self.one_hot:
            return 0
        action: dict[str, np.ndarray] = {"keyboard": np.zeros(self.keyboard_dim, np.int8)}
        if self.mouse:
            action["mouse"] = np.zeros(2, np.float32)
        return action

    def to_arrays(self, action: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Validate one action -> (keyboard [K] float32, mouse [2] float32 or None).

        Raises ValueError saying what is accepted when the action is outside the space.
        """
        if self.one_hot:
            index = _as_index(action, self.keyboard_dim, self.name)
            keyboard = np.zeros(self.keyboard_dim, np.float32)
            keyboard[index] = 1.0
            return keyboard, None
        if not isinstance(action, dict):
            raise ValueError(f"{self.name} actions are dicts {self._describe()}, got {type(action).__name__}")
        extra = set(action) - {"keyboard", "mouse"}
        if extra:
            raise ValueError(f"unknown action entries {sorted(extra)}; accepted: {self._describe()}")
        keyboard = np.asarray(action.get("keyboard", np.zeros(self.keyboard_dim)))
        if keyboard.shape != (self.keyboard_dim,):
            raise ValueError(f"keyboard must have shape ({self.keyboard_dim},) for {self.keys}, got {keyboard.shape}")
        if not np.isin(keyboard, (0, 1)).all():
            raise ValueError(f"keyboard entries must be 0 or 1, got {keyboard.tolist()}")
        mouse = None
        if self.mouse:
            mouse = np.asarray(action.get("mouse", np.zeros(2)), dtype=np.float32)
            if mouse.shape != (2,):
                raise ValueError(f"mouse must have shape (2,) = [pitch, yaw], got {mouse.shape}")
            if not np.isfinite(mouse).all():
                raise ValueError(f"mouse contains NaN or infinite values: {mouse.tolist()}")
            if np.abs(mouse).max() > self.mouse_limit + 1e-6:
                raise ValueError(
                    f"mouse values must lie in [-{self.mouse_limit}, {self.mouse_limit}], got {mouse.tolist()}"
                )
        elif "mouse" in action:
            raise ValueError(f"the {self.name} layout has no mouse; accepted: {self._describe()}")
        return keyboard.astype(np.float32), mouse

    def batch_to_arrays(self, actions: Any, count: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """`count` worlds' actions validated at once (one-hot: integers [count]; else a dict of arrays with
        `count` rows) -> (keyboard [count, K] float32, mouse [count, 2] float32 or None), the rows
        `to_arrays` gives world by world; None where any check fails (then `to_arrays` world by world
        says what is wrong)."""
        if self.one_hot:
            index = np.asarray(actions)
            if index.shape != (count,) or not np.issubdtype(index.dtype, np.integer):
                return None
            if count and (index.min() < 0 or index.max() >= self.keyboard_dim):
                return None
            return np.eye(self.keyboard_dim, dtype=np.float32)[index], None
        if not isinstance(actions, dict) or set(actions) - {"keyboard", "mouse"}:
            return None
        if not self.mouse and "mouse" in actions:
            return None
        keyboard = np.asarray(actions.get("keyboard", np.zeros((count, self.keyboard_dim))))
        if keyboard.shape != (count, self.keyboard_dim) or not ((keyboard == 0) | (keyboard == 1)).all():
            return None
        mouse = None
        if self.mouse:
            mouse = np.array(actions.get("mouse", np.zeros((count, 2))), dtype=np.float32)
            if mouse.shape != (count, 2) or not np.isfinite(mouse).all():
                return None
            if count and np.abs(mouse).max() > self.mouse_limit + 1e-6:
                return None
        return keyboard.astype(np.float32), mouse

    def _describe(self) -> str:
        mouse = f", 'mouse': float32 (2,) in [-{self.mouse_limit}, {self.mouse_limit}]" if self.mouse else ""
        return "{'keyboard': 0/1 array of " + f"{self.keyboard_dim} {list(self.keys)}" + mouse + "}"


def _as_index(action: Any, n: int, name: str) -> int:
    array = np.asarray(action)
    if array.shape not in ((), (1,)) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} actions are one integer in 0..{n - 1} ({list(TEMPLERUN_MOVES)}), got {action!r}")
    index = int(array.reshape(()))
    if not 0 <= index < n:
        raise ValueError(f"{name} action {index} outside 0..{n - 1}")
    return index


UNIVERSAL = ActionLayout("universal", ("forward", "back", "left", "right"))
GTA_DRIVE = ActionLayout("gta_drive", ("forward", "back"))
TEMPLERUN = ActionLayout("templerun", TEMPLERUN_MOVES, one_hot=True, mouse=False)
LAYOUTS = {"universal": UNIVERSAL, "gta_drive": GTA_DRIVE, "templerun": TEMPLERUN}


def layout_for(mode: str, actions: dict[str, Any] | None = None) -> ActionLayout:
    """The layout of a model: a preset mode, or `custom` described by the config's `actions`."""
    actions = actions or {}
    if mode in LAYOUTS:
        base = LAYOUTS[mode]
        limit = float(actions.get("mouse_limit", base.mouse_limit))
        return ActionLayout(base.name, base.keys, base.one_hot, base.mouse, limit)
    if mode != "custom":
        raise ValueError(f"unknown mode {mode!r}; accepted: {sorted(LAYOUTS)} or 'custom'")
    keys = tuple(actions.get("keyboard", ()))
    if not keys:
        raise ValueError("a custom layout needs actions.keyboard: the key names in model order")
    return ActionLayout(
        name=str(actions.get("name", "custom")),
        keys=keys,
        one_hot=bool(actions.get("one_hot", False)),
        mouse=bool(actions.get("mouse", True)),
        mouse_limit=float(actions.get("mouse_limit", 0.3)),
    )


# Play-window key maps: pygame key names -> keyboard index (and, for gta_drive, steering on yaw).
KEY_MAPS: dict[str, dict[str, int]] = {
    "universal": {"w": 0, "s": 1, "a": 2, "d": 3},
    "gta_drive": {"w": 0, "s": 1},
    "templerun": {"q": 0, "w": 1, "s": 2, "z": 3, "c": 4, "a": 5, "d": 6},
}
# Keys that move the camera like the mouse (the official terminal controls): (axis, direction).
CAMERA_KEYS: dict[str, dict[str, tuple[int, float]]] = {
    "universal": {"i": (0, 1.0), "k": (0, -1.0), "j": (1, -1.0), "l": (1, 1.0)},
    "gta_drive": {"a": (1, -1.0), "d": (1, 1.0)},
    "templerun": {},
}
CAMERA_KEY_SPEED = 0.1  # model units per video frame while a camera key is held
