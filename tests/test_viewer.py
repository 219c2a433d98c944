"""The play window: real pygame (SDL dummy driver, or a real X window under Xvfb) driving a real env.

Events are posted to pygame's queue as a player's keyboard and mouse would produce them; a recording
wrapper around the env shows which actions reached `step`.

Set MATRIXGAME_DOCS_SCREENSHOT=1 to also write the documentation screenshot docs/img/play.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium
import numpy as np
import pygame
import pytest
from tiny_model import tiny_model_config, tiny_modules, write_tiny_model

from matrixgame_env.env import MatrixGameEnv
from matrixgame_env.spaces import CAMERA_KEY_SPEED, KEY_MAPS, layout_for
from matrixgame_env.viewer import (
    MOUSE_SENSITIVITY,
    WINDOW_CLASS,
    Controls,
    Viewer,
    add_play_arguments,
    play_main,
)
from matrixgame_env.world.model import WorldModel

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALE = 8
FAST_FPS = 500.0  # display rate of the scripted runs: frames go by quickly, generation sets the pace


def gradient_picture(height: int = 48, width: int = 80, seed: int = 0) -> np.ndarray:
    """A start picture (not the model's size: the env crops and resizes it)."""
    rows, cols = np.meshgrid(np.linspace(0, 255, height), np.linspace(0, 255, width), indexing="ij")
    noise = np.random.default_rng(seed).integers(0, 40, (height, width))
    return np.stack([rows, cols, (rows + cols + noise) / 2], axis=-1).clip(0, 255).astype(np.uint8)


def tiny_world() -> WorldModel:
    config = tiny_model_config()
    return WorldModel(*tiny_modules(config), config)


class RecordingEnv(gymnasium.Wrapper):
    """The real env, remembering every action passed to `step` and every `reset`'s options."""

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        self.actions: list = []
        self.resets: list = []

    def reset(self, **kwargs):
        self.resets.append(kwargs.get("options"))
        return super().reset(**kwargs)

    def step(self, action):
        self.actions.append(action)
        return super().step(action)


def post_key(key: int, down: bool = True, mod: int = 0) -> None:
    pygame.event.post(pygame.event.Event(pygame.KEYDOWN if down else pygame.KEYUP, key=key, mod=mod))


def press(key: int) -> None:
    post_key(key, True)
    post_key(key, False)


def post_motion(dx: int, dy: int) -> None:
    pygame.event.post(pygame.event.Event(pygame.MOUSEMOTION, rel=(dx, dy), pos=(10, 10), buttons=(0, 0, 0)))


def block_frames(env: gymnasium.Env) -> int:
    return env.unwrapped.block_frames


@pytest.fixture(scope="module")
def world() -> WorldModel:
    return tiny_world()


@pytest.fixture
def sdl_dummy(monkeypatch):
    """Headless pygame: the SDL dummy video and audio drivers."""
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    pygame.init()
    yield
    pygame.quit()


@pytest.fixture
def play(world, sdl_dummy, tmp_path):
    """(viewer, recording env) around the tiny model, started from a gradient picture."""
    env = RecordingEnv(MatrixGameEnv(model=world))
    viewer = Viewer(env, scale=SCALE, record_dir=tmp_path / "recordings", images=[gradient_picture()], fps=FAST_FPS)
    yield viewer, env
    viewer.close()
    env.close()


def video_pixels(viewer: Viewer) -> np.ndarray:
    return pygame.surfarray.array3d(viewer.window.subsurface(viewer.video_rect)).copy()


# ---------------------------------------------------------------------- Controls alone


def test_held_keys_make_a_multi_hot_keyboard_and_release_clears_them(sdl_dummy):
    controls = Controls(layout_for("universal"), "universal")
    post_key(pygame.K_w)
    post_key(pygame.K_d)
    for event in pygame.event.get((pygame.KEYDOWN, pygame.KEYUP)):
        controls.handle(event)
    assert controls.action(12)["keyboard"].tolist() == [1, 0, 0, 1]
    assert controls.action(12)["keyboard"].tolist() == [1, 0, 0, 1]  # still held: same action again
    controls.handle(pygame.event.Event(pygame.KEYUP, key=pygame.K_w, mod=0))
    assert controls.action(12)["keyboard"].tolist() == [0, 0, 0, 1]


def test_a_key_tapped_between_two_blocks_counts_for_one_block(sdl_dummy):
    controls = Controls(layout_for("universal"), "universal")
    controls.handle(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_s, mod=0))
    controls.handle(pygame.event.Event(pygame.KEYUP, key=pygame.K_s, mod=0))
    assert controls.action(12)["keyboard"].tolist() == [0, 1, 0, 0]
    assert controls.action(12)["keyboard"].tolist() == [0, 0, 0, 0]


def test_mouse_motion_is_summed_over_the_block_and_spread_over_its_frames(sdl_dummy):
    controls = Controls(layout_for("universal"), "universal")
    for _ in range(3):  # 300 px right and 60 px up in all, during a 12-frame block
        controls.handle(pygame.event.Event(pygame.MOUSEMOTION, rel=(100, -20), pos=(0, 0), buttons=(0, 0, 0)))
    pitch, yaw = controls.action(12)["mouse"]
    assert yaw == pytest.approx(300 * MOUSE_SENSITIVITY / 12)  # 0.1: a normal turn
    assert pitch == pytest.approx(60 * MOUSE_SENSITIVITY / 12)  # moving up looks up
    assert controls.action(12)["mouse"].tolist() == [0.0, 0.0]  # the sum starts again


def test_mouse_values_are_clipped_to_the_layout_limit(sdl_dummy):
    layout = layout_for("universal")
    controls = Controls(layout, "universal")
    controls.handle(pygame.event.Event(pygame.MOUSEMOTION, rel=(-50_000, 0), pos=(0, 0), buttons=(0, 0, 0)))
    assert controls.action(12)["mouse"][1] == pytest.approx(-layout.mouse_limit)


def test_motion_is_ignored_while_the_pointer_is_free(sdl_dummy):
    controls = Controls(layout_for("universal"), "universal")
    controls.captured = False
    controls.handle(pygame.event.Event(pygame.MOUSEMOTION, rel=(300, 0), pos=(0, 0), buttons=(0, 0, 0)))
    assert controls.action(12)["mouse"].tolist() == [0.0, 0.0]


def test_camera_keys_turn_like_the_mouse(sdl_dummy):
    controls = Controls(layout_for("universal"), "universal")
    controls.handle(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_i, mod=0))  # look up
    controls.handle(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_j, mod=0))  # turn left
    action = controls.action(12)
    assert action["mouse"].tolist() == pytest.approx([CAMERA_KEY_SPEED, -CAMERA_KEY_SPEED])
    assert action["keyboard"].tolist() == [0, 0, 0, 0]


def test_gta_drive_steers_with_a_and_d(sdl_dummy):
    controls = Controls(layout_for("gta_drive"), "gta_drive")
    controls.handle(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_w, mod=0))
    controls.handle(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_d, mod=0))
    action = controls.action(12)
    assert action["keyboard"].tolist() == [1, 0]
    assert action["mouse"].tolist() == pytest.approx([0.0, CAMERA_KEY_SPEED])


def test_templerun_takes_the_latest_key_and_leaves_ctrl_q_to_the_window(sdl_dummy):
    controls = Controls(layout_for("templerun"), "templerun")
    controls.handle(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_w, mod=0))
    controls.handle(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_c, mod=0))
    assert controls.action(12) == KEY_MAPS["templerun"]["c"]  # turn right, pressed last
    assert controls.handle(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_q, mod=0))  # Q is a move here
    assert not controls.handle(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_q, mod=pygame.KMOD_LCTRL))


def test_a_custom_layout_falls_back_to_the_universal_keys_that_fit(sdl_dummy):
    layout = layout_for("custom", {"name": "walker", "keyboard": ["forward", "back"]})
    controls = Controls(layout, layout.name)
    assert sorted(controls.key_map.values()) == [0, 1]
    assert controls.is_game_key(pygame.K_s) and not controls.is_game_key(pygame.K_a)


# ---------------------------------------------------------------------- the window driving the env


def test_keys_and_mouse_posted_to_the_window_reach_the_env(play):
    viewer, env = play
    post_key(pygame.K_w)
    viewer.run(max_blocks=1)
    post_key(pygame.K_w, down=False)
    post_key(pygame.K_d)
    viewer.run(max_blocks=1)
    post_key(pygame.K_d, down=False)
    for _ in range(5):
        post_motion(60, 0)  # 300 px to the right
    viewer.run(max_blocks=1)
    keyboards = [action["keyboard"].tolist() for action in env.actions]
    assert keyboards == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert env.actions[0]["mouse"].tolist() == [0.0, 0.0]
    assert env.actions[2]["mouse"][1] == pytest.approx(300 * MOUSE_SENSITIVITY / block_frames(env))
    assert env.actions[2]["mouse"][0] == 0.0


def test_escape_frees_the_pointer_and_a_click_captures_it_again(play):
    viewer, env = play
    viewer.run(max_blocks=0)
    assert viewer.controls.captured and pygame.event.get_grab() and not pygame.mouse.get_visible()
    post_key(pygame.K_ESCAPE)
    post_motion(300, 0)  # the pointer is free: this motion must not turn the camera
    viewer.run(max_blocks=1)
    assert not viewer.controls.captured and not pygame.event.get_grab() and pygame.mouse.get_visible()
    assert env.actions[-1]["mouse"].tolist() == [0.0, 0.0]
    pygame.event.post(pygame.event.Event(pygame.MOUSEBUTTONDOWN, button=1, pos=(10, 10)))
    viewer.run(max_blocks=0)
    assert viewer.controls.captured and pygame.event.get_grab()


def test_p_pauses_generation_until_pressed_again(play):
    viewer, env = play
    viewer.run(max_blocks=1)
    press(pygame.K_p)
    viewer.run(max_seconds=0.6)
    assert viewer.paused and len(env.actions) == 1
    press(pygame.K_p)
    viewer.run(max_blocks=1)
    assert not viewer.paused and len(env.actions) == 2


def test_r_resets_the_env_and_play_goes_on(play):
    viewer, env = play
    viewer.run(max_blocks=1)
    press(pygame.K_r)
    viewer.run(max_blocks=1)
    assert len(env.resets) == 2
    assert env.resets[1]["image"] is viewer.images[0]
    assert len(env.actions) == 2


def test_o_cycles_through_the_start_pictures(world, sdl_dummy, tmp_path):
    first, second = gradient_picture(seed=1), gradient_picture(seed=2)
    env = RecordingEnv(MatrixGameEnv(model=world))
    with Viewer(env, scale=SCALE, record_dir=tmp_path, images=[first, second], fps=FAST_FPS) as viewer:
        viewer.run(max_blocks=0)
        press(pygame.K_o)
        viewer.run(max_blocks=0)
        press(pygame.K_o)
        viewer.run(max_blocks=0)
    started_from = [options["image"] for options in env.resets]
    assert len(started_from) == 3
    assert started_from[0] is first and started_from[1] is second and started_from[2] is first


def test_a_dropped_image_file_starts_a_new_world_from_it(play, tmp_path):
    viewer, env = play
    from PIL import Image

    path = tmp_path / "dropped.png"
    Image.fromarray(gradient_picture(seed=3)).save(path)
    viewer.run(max_blocks=1)
    pygame.event.post(pygame.event.Event(pygame.DROPFILE, file=str(path)))
    viewer.run(max_blocks=1)
    assert env.resets[-1]["image"] == str(path)
    assert len(env.actions) == 2


def test_v_records_an_mp4_of_the_shown_frames(play):
    imageio = pytest.importorskip("imageio.v2")
    viewer, env = play
    viewer.run(max_blocks=0)
    post_key(pygame.K_w)
    press(pygame.K_v)
    viewer.run(max_blocks=2)
    press(pygame.K_v)
    viewer.run(max_blocks=0)
    assert not viewer.recording and viewer.last_recording is not None
    assert viewer.last_recording.parent == viewer.record_dir and viewer.last_recording.suffix == ".mp4"
    with imageio.get_reader(viewer.last_recording) as reader:
        frames = [frame for frame in reader]
    height, width = env.observation_space.shape[:2]
    first_block = block_frames(env) - 3  # 9 frames, then 12
    assert len(frames) == first_block + block_frames(env)
    assert frames[0].shape == (height * SCALE, width * SCALE, 3)


def test_h_toggles_the_help_over_the_video(play):
    viewer, env = play
    viewer.run(max_blocks=1)
    press(pygame.K_p)  # hold the picture still so that only the help can change it
    viewer.run(max_blocks=0)
    plain = video_pixels(viewer)
    press(pygame.K_h)
    viewer.run(max_blocks=0)
    with_help = video_pixels(viewer)
    press(pygame.K_h)
    viewer.run(max_blocks=0)
    assert viewer.help_visible is False
    assert (with_help != plain).any(axis=-1).mean() > 0.2
    assert np.array_equal(video_pixels(viewer), plain)


def test_g_steps_the_action_guidance_between_blocks(sdl_dummy, tmp_path):
    world = tiny_world()  # its own model: the setting lives on the world model
    env = RecordingEnv(MatrixGameEnv(model=world))
    with Viewer(env, scale=SCALE, record_dir=tmp_path, images=[gradient_picture()], fps=FAST_FPS) as viewer:
        viewer.run(max_blocks=1)
        assert viewer.action_guidance == world.sampler.config.action_guidance == 1.0
        seen = []
        for _ in range(3):
            press(pygame.K_g)
            viewer.run(max_blocks=1)
            seen.append((viewer.action_guidance, world.sampler.config.action_guidance))
    assert seen == [(2.0, 2.0), (3.0, 3.0), (1.0, 1.0)]
    assert len(env.actions) == 4  # play went on through every change


def test_q_and_closing_the_window_quit(play):
    viewer, env = play
    press(pygame.K_q)
    viewer.run(max_seconds=5)
    assert viewer.quit_requested
    viewer.quit_requested = False
    pygame.event.post(pygame.event.Event(pygame.QUIT))
    viewer.run(max_seconds=5)
    assert viewer.quit_requested


def test_templerun_window_sends_moves_and_ctrl_q_quits(sdl_dummy, tmp_path):
    config = tiny_model_config("templerun")
    env = RecordingEnv(MatrixGameEnv(model=WorldModel(*tiny_modules(config), config)))
    with Viewer(env, scale=SCALE, record_dir=tmp_path, images=[gradient_picture()], fps=FAST_FPS) as viewer:
        post_key(pygame.K_w)  # jump
        viewer.run(max_blocks=1)
        post_key(pygame.K_w, down=False)
        press(pygame.K_q)  # the "none" move, not quit
        viewer.run(max_blocks=1)
        assert not viewer.quit_requested
        post_key(pygame.K_q, mod=pygame.KMOD_LCTRL)
        viewer.run(max_seconds=5)
        assert viewer.quit_requested
    assert [int(action) for action in env.actions] == [KEY_MAPS["templerun"]["w"], KEY_MAPS["templerun"]["q"]]


def test_screenshot_shows_video_and_hud(world, sdl_dummy, tmp_path):
    env = MatrixGameEnv(model=world)
    with Viewer(env, scale=24, record_dir=tmp_path, images=[gradient_picture()]) as viewer:  # the docs' size
        post_key(pygame.K_w)
        post_key(pygame.K_l)
        viewer.run(max_blocks=2)
        path = viewer.screenshot(tmp_path / "play.png")
        window_size, video_height = viewer.window.get_size(), viewer.video_rect.height
        if os.environ.get("MATRIXGAME_DOCS_SCREENSHOT"):
            viewer.screenshot(REPO_ROOT / "docs" / "img" / "play.png")
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == window_size[::-1]
    hud = pixels[video_height:]
    assert hud.shape[0] > 20 and len(np.unique(hud.reshape(-1, 3), axis=0)) > 2  # text on the HUD


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny model folder that ships two start pictures."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-play"))


def test_o_cycles_the_model_s_shipped_pictures_by_default(model_folder, sdl_dummy, tmp_path):
    env = MatrixGameEnv(model=WorldModel.from_pretrained(model_folder, device="cpu"))
    with Viewer(env, scale=SCALE, record_dir=tmp_path) as viewer:
        assert viewer.images == env.world.start_image_paths()
        assert len(viewer.images) == 2


def test_play_main_plays_a_model_folder_until_the_window_closes(model_folder, sdl_dummy, tmp_path):
    argv = ["--model", str(model_folder), "--device", "cpu", "--dtype", "bfloat16", "--scale", "4",
            "--record-dir", str(tmp_path)]  # fmt: skip
    args = add_play_arguments(argparse.ArgumentParser()).parse_args(argv)
    # SDL's event queue takes events from any thread: close the window after a moment of play, and
    # again until play_main returns (a slow start may miss the first close).
    done = threading.Event()

    def close_window() -> None:
        while not done.wait(1.5):
            try:
                pygame.event.post(pygame.event.Event(pygame.QUIT))
            except pygame.error:  # between two windows: no event queue to post to
                pass

    closer = threading.Thread(target=close_window, daemon=True)
    closer.start()
    try:
        assert play_main(args) == 0
    finally:
        done.set()
        closer.join()


def test_play_arguments():
    parser = add_play_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "universal", "--image", "a.png", "b.png", "--scale", "3"])
    assert (args.model, args.image, args.scale, args.record_dir) == ("universal", ["a.png", "b.png"], 3, "recordings")
    assert parser.parse_args([]).model is None
    assert parser.parse_args([]).action_guidance is None
    assert parser.parse_args(["--action-guidance", "2"]).action_guidance == 2.0
    assert parser.parse_args([]).dtype is None and parser.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"


# ---------------------------------------------------------------------- a real X11 window


def _real_window_child(out_path: str) -> None:
    """Subprocess under Xvfb: play until a forward key and a turn to the right reached the env."""
    env = RecordingEnv(MatrixGameEnv(model=tiny_world()))
    with Viewer(env, scale=SCALE, images=[gradient_picture()]) as viewer:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not viewer.quit_requested:
            viewer.run(max_blocks=1)
            if any(a["keyboard"][0] and a["mouse"][1] > 0 for a in env.actions):
                break
    actions = [{"keyboard": a["keyboard"].tolist(), "mouse": a["mouse"].tolist()} for a in env.actions]
    Path(out_path).write_text(json.dumps(actions))


def test_real_window_under_xvfb_takes_xdotool_keys_and_mouse(tmp_path):
    # Needs `apt-get install -y xvfb xdotool x11-utils`; no network is used.
    missing = [tool for tool in ("Xvfb", "xdotool") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install -y xvfb xdotool x11-utils)")
    read_fd, write_fd = os.pipe()
    xvfb = subprocess.Popen(  # -displayfd: Xvfb picks a free display and writes its number
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    child = None
    try:
        with os.fdopen(read_fd) as display_number:
            display = ":" + display_number.readline().strip()
        x_env = {key: value for key, value in os.environ.items() if not key.startswith("SDL_")}
        x_env.update(DISPLAY=display, SDL_AUDIODRIVER="dummy", OMP_NUM_THREADS="1")
        x_env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(REPO_ROOT)])
        out = tmp_path / "actions.json"
        code = f"import test_viewer; test_viewer._real_window_child({str(out)!r})"
        child = subprocess.Popen(
            [sys.executable, "-c", code], env=x_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

        def xdotool(*args: str, timeout: float = 10) -> str:
            return subprocess.run(
                ["xdotool", *args], env=x_env, capture_output=True, text=True, timeout=timeout, check=True
            ).stdout

        window = xdotool("search", "--sync", "--classname", WINDOW_CLASS, timeout=60).split()[0]
        xdotool("windowfocus", "--sync", window)
        xdotool("keydown", "w")
        deadline = time.monotonic() + 50
        while child.poll() is None and time.monotonic() < deadline:
            try:
                xdotool("mousemove_relative", "--", "20", "0")  # with the pointer grabbed: relative motion
            except subprocess.CalledProcessError:
                time.sleep(1)
                if child.poll() is None:  # the window is still open: a real failure
                    raise
                break  # the window closed between the poll and the move
            time.sleep(0.05)
        xdotool("keyup", "w")
        output = child.communicate(timeout=20)[0].decode(errors="replace")
        assert child.returncode == 0, output
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        xvfb.terminate()
        xvfb.wait(timeout=10)
    actions = json.loads(out.read_text())
    assert any(action["keyboard"][0] == 1 for action in actions), actions
    assert any(action["mouse"][1] > 0 for action in actions), actions
