"""The ViZDoom recorder and its exploration policy: labels against the real engine, behaviour of the policy."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from matrixgame_env.data.doom_map import Walls, load_walls
from matrixgame_env.data.policy import RAY_ANGLES, ExplorationPolicy
from matrixgame_env.data.vizdoom_recorder import VARIABLE_NAMES, DoomRecorder, RecorderConfig, check_engine_executable

FPS = 17.5
ANGLE = VARIABLE_NAMES.index("ANGLE")
PITCH = VARIABLE_NAMES.index("PITCH")
RESTART = VARIABLE_NAMES.index("EPISODE_START")


def _square_room(half: float) -> Walls:
    corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
    segments = np.array([(*corners[i], *corners[(i + 1) % 4]) for i in range(4)], dtype=np.float64)
    return Walls(segments, np.ones(4, dtype=bool), np.ones(4, dtype=bool))


def _drive_in_room(seed: int, steps: int, half: float = 600.0) -> dict[str, np.ndarray]:
    """Run the policy in a walled square with simple kinematics (8 units per frame per key)."""
    policy = ExplorationPolicy(seed, fps=FPS)
    walls = _square_room(half)
    x = y = heading = pitch = 0.0  # heading: map degrees, counter-clockwise
    keys, yaws, pitches, uses = [], [], [], []
    for _ in range(steps):
        clearance = walls.distances(x, y, heading - np.array(RAY_ANGLES))
        action = policy.act((x, y), pitch, clearance)
        heading -= action.yaw  # turning right lowers the map angle
        pitch = float(np.clip(pitch + action.pitch, -56, 32))
        forward = float(action.keyboard[0]) - float(action.keyboard[1])
        right = float(action.keyboard[3]) - float(action.keyboard[2])
        rad = math.radians(heading)
        x = float(np.clip(x + 8 * (forward * math.cos(rad) + right * math.sin(rad)), -half + 16, half - 16))
        y = float(np.clip(y + 8 * (forward * math.sin(rad) - right * math.cos(rad)), -half + 16, half - 16))
        keys.append(action.keyboard)
        yaws.append(action.yaw)
        pitches.append(pitch)
        uses.append(action.use)
    return {"keys": np.array(keys), "yaw": np.array(yaws), "pitch": np.array(pitches), "use": np.array(uses)}


def _runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in `mask`."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(np.nonzero(edges == -1)[0] - np.nonzero(edges == 1)[0])


@pytest.fixture(scope="module")
def drive() -> dict[str, np.ndarray]:
    return _drive_in_room(seed=1, steps=4000)


def test_policy_presses_every_key_and_runs_forward_most(drive):
    pressed = drive["keys"].mean(axis=0)
    assert all(pressed >= 0.03), pressed
    assert pressed[0] == pressed.max() and pressed[0] > 0.4


def test_policy_holds_keys_for_several_frames(drive):
    changes = np.any(drive["keys"][1:] != drive["keys"][:-1], axis=1).sum()
    assert len(drive["keys"]) / (changes + 1) >= 8  # about half a second per key combination


def test_policy_pauses_and_turns_on_the_spot(drive):
    no_keys = ~drive["keys"].any(axis=1)
    pauses = no_keys & (drive["yaw"] == 0)
    spins = no_keys & (np.abs(drive["yaw"]) >= 60 / FPS)
    assert pauses.mean() > 0.02
    assert max(_runs(spins)) >= 8  # sustained turning, not single frames
    assert spins.mean() > 0.02


def test_policy_turns_smoothly_within_bounds(drive):
    yaw = drive["yaw"]
    assert np.abs(yaw).max() <= 170 / FPS + 1e-9
    assert np.mean(np.abs(np.diff(yaw)) < 1.0) > 0.9  # the rate (degrees per frame) changes slowly, mostly
    assert np.abs(yaw).mean() > 0.5  # but it does turn


def test_policy_pitch_drifts_and_returns_towards_level(drive):
    pitch = drive["pitch"]
    assert np.abs(pitch).max() < 30  # never pinned at the engine's limits
    assert pitch.std() > 2
    assert abs(pitch.mean()) < 5
    assert np.any(drive["use"])


def test_policy_is_deterministic_for_a_seed():
    first, again, other = (_drive_in_room(seed, 300) for seed in (7, 7, 8))
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert not np.array_equal(first["yaw"], other["yaw"])


def test_policy_presses_use_then_backs_off_and_turns_when_stuck():
    policy = ExplorationPolicy(3, fps=FPS)
    actions = [policy.act((0.0, 0.0), 0.0) for _ in range(400)]  # it never moves
    keys = np.array([a.keyboard for a in actions], dtype=bool)
    yaw = np.array([a.yaw for a in actions])
    use = np.array([a.use for a in actions])
    first_use = int(np.argmax(use))
    assert first_use <= 5 * FPS
    backing = np.nonzero(keys[:, 1] & ~keys[:, 0])[0]
    backing = backing[backing > first_use]
    assert len(backing) > 0, "never backed off"
    after_back_off = backing[-1] + 1
    spin = ~keys[after_back_off:].any(axis=1) & (np.abs(yaw[after_back_off:]) > 0)
    assert spin[:5].all(), "no turn on the spot after backing off"


def test_walls_give_distances_to_the_room_sides():
    walls = _square_room(100.0)
    distances = walls.distances(20.0, 0.0, np.array([0.0, 90.0, 180.0, 45.0]))
    np.testing.assert_allclose(distances, [80.0, 100.0, 120.0, 80.0 * math.sqrt(2)])


def test_freedoom_map_walls_surround_the_start():
    wad = Path(pytest.importorskip("vizdoom").__file__).parent / "freedoom2.wad"
    walls = load_walls(wad, "MAP01")
    distances = walls.distances(-192.0, -192.0, np.arange(0.0, 360.0, 45.0))  # MAP01's player start
    assert len(walls.segments) > 100
    assert np.all(distances < 2048) and np.all(distances > 16)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """300 frames of MAP01 and 300 of MAP02 (ViZDoom keeps files in the working directory: use a temporary one)."""
    pytest.importorskip("vizdoom")
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("vizdoom_cwd"))
    try:
        config = RecorderConfig()
        with DoomRecorder(config) as recorder:
            pieces = []
            for seed, map_name in ((11, "MAP01"), (12, "MAP02")):
                recorder.start_episode(seed, map_name)
                pieces.append(recorder.record(300))
        return config, pieces
    finally:
        os.chdir(previous)


def test_recording_has_the_universal_layout(recording):
    config, pieces = recording
    for trajectory in pieces:
        assert trajectory.frames.shape == (300, 96, 176, 3) and trajectory.frames.dtype == np.uint8
        assert trajectory.keyboard.shape == (300, 4) and trajectory.keyboard.dtype == np.int8
        assert trajectory.mouse.shape == (300, 2) and trajectory.mouse.dtype == np.float32
        assert trajectory.variables.shape == (300, len(VARIABLE_NAMES)) and trajectory.variables.dtype == np.float32
        assert set(np.unique(trajectory.keyboard)) <= {0, 1}
        assert trajectory.variables[0, RESTART] == 1 and trajectory.variables[1:, RESTART].sum() == 0
        assert trajectory.frames.std(axis=0).mean() > 5  # the view changes


def test_yaw_labels_match_the_angle_change(recording):
    config, pieces = recording
    for trajectory in pieces:
        angle = trajectory.variables[:, ANGLE].astype(np.float64)
        turned_right = -((np.diff(angle) + 180) % 360 - 180)  # ANGLE decreases when turning right
        label_degrees = trajectory.mouse[:-1, 1] * config.degrees_per_unit
        assert np.abs(label_degrees).max() > 2  # it did turn
        assert np.abs(label_degrees - turned_right).max() < 1e-3


def test_pitch_labels_match_the_pitch_change_where_not_clamped(recording):
    config, pieces = recording
    for trajectory in pieces:
        pitch = trajectory.variables[:, PITCH].astype(np.float64)
        looked_up = -np.diff(pitch)  # PITCH decreases when looking up
        free = (pitch[:-1] > -31) & (pitch[:-1] < 55) & (pitch[1:] > -31) & (pitch[1:] < 55)
        label_degrees = trajectory.mouse[:-1, 0] * config.degrees_per_unit
        assert free.mean() > 0.9 and np.abs(label_degrees).max() > 0.1
        assert np.abs(label_degrees - looked_up)[free].max() < 1e-3


def test_same_seed_and_map_give_identical_frames_and_labels(recording, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, pieces = recording
    with DoomRecorder(RecorderConfig()) as recorder:
        recorder.start_episode(12, "MAP02")
        again = recorder.record(100)
    assert np.array_equal(again.frames, pieces[1].frames[:100])
    assert np.array_equal(again.mouse, pieces[1].mouse[:100])
    assert np.array_equal(again.variables, pieces[1].variables[:100])


def test_bad_recorder_arguments_are_refused():
    with pytest.raises(ValueError, match="tics_per_frame"):
        RecorderConfig(tics_per_frame=0)
    with pytest.raises(ValueError, match="frame size"):
        RecorderConfig(size=(0, 176))


def test_an_engine_program_without_execute_permission_is_named(tmp_path):
    engine = tmp_path / "vizdoom"
    engine.write_bytes(b"\x7fELF")
    engine.chmod(0o644)
    with pytest.raises(PermissionError, match=r"vizdoom is not executable.*chmod \+x"):
        check_engine_executable(str(engine))
    engine.chmod(0o755)
    check_engine_executable(str(engine))  # runnable: no error
    check_engine_executable(str(tmp_path / "absent"))  # a layout without the program is left to ViZDoom


def test_a_worker_process_that_died_is_reported_as_an_engine_crash():
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from matrixgame_env.data.recording import _raise_failures

    running, died = Future(), Future()
    died.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
    with pytest.raises(RuntimeError, match="died without a Python error: the ViZDoom engine crashed") as caught:
        _raise_failures([running, died])
    assert isinstance(caught.value.__cause__, BrokenProcessPool)
    failed = Future()
    failed.set_exception(ValueError("bad map"))
    with pytest.raises(RuntimeError, match="a recording worker failed$"):
        _raise_failures([failed])
    _raise_failures([running])  # nothing finished with an error: nothing raised
