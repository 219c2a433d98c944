"""DatasetWriter: any game's frames and actions in the format the training stages read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_training import tiny_training_config, train

from matrixgame_env.data import DatasetWriter, VideoClipDataset, open_chunk, read_manifest

SIZE = (16, 32)


def _frame(value: int) -> np.ndarray:
    return np.full((*SIZE, 3), value, np.uint8)


def test_a_gymnasium_game_recorded_with_the_writer_reads_as_clips_and_trains_the_vae(tmp_path) -> None:
    gym = pytest.importorskip("gymnasium")
    pytest.importorskip("pygame")  # CartPole draws its frames with pygame
    env = gym.make("CartPole-v1", render_mode="rgb_array")
    root = tmp_path / "cartpole"
    restarts = {}  # episode -> frame indices where the game restarted
    with DatasetWriter(root, fps=15, frame_size=SIZE, variables=["POLE_ANGLE"], chunk_frames=30) as writer:
        for episode in range(4):
            observation, _ = env.reset(seed=episode)
            restarted = False
            for t in range(40):
                picture = Image.fromarray(env.render()).resize(SIZE[::-1], Image.BILINEAR)
                push = (t // 3 + episode) % 2  # 0: left, 1: right, held for three frames
                writer.add(np.asarray(picture), [0, 0, 1 - push, push], [0.0, 0.1 * (2 * push - 1)],
                           [observation[2]], restarted=restarted)  # fmt: skip
                if restarted:
                    restarts.setdefault(episode, []).append(t)
                observation, _, terminated, truncated, _ = env.step(push)
                restarted = terminated or truncated
                if restarted:
                    observation, _ = env.reset()
            writer.end_episode()
    env.close()
    assert restarts, "the pole fell at least once, so restarts within an episode were recorded"

    manifest = read_manifest(root)
    assert manifest.episodes == [0, 1, 2, 3]
    assert [(c.episode, c.part, c.frames) for c in manifest.chunks][:2] == [(0, 0, 30), (0, 1, 10)]
    assert manifest.variable_names == ["EPISODE_START", "POLE_ANGLE"]
    for episode in range(4):
        chunks = [open_chunk(root / c.file) for c in manifest.chunks if c.episode == episode]
        flags = np.concatenate([chunk["variables"][:, 0] for chunk in chunks])
        assert np.flatnonzero(flags).tolist() == [0, *restarts.get(episode, [])]
        keyboard = np.concatenate([chunk["keyboard"] for chunk in chunks])
        assert keyboard[:, :2].sum() == 0 and (keyboard[:, 2] + keyboard[:, 3] == 1).all()

    clips = VideoClipDataset(root, clip_frames=9, split="train", val_fraction=0.5, stride=2)
    for index in range(len(clips)):
        item = clips[index]
        assert item["video"].shape == (3, 9, *SIZE)
        assert (item["variables"][1:, 0] == 0).all()  # no clip spans a restart
    out = tmp_path / "runs"
    train("vae", "--data", str(root), "--model-config", str(tiny_training_config(tmp_path / "config")),
          "--out", str(out), "--steps", "2", "--clip-frames", "9", "--val-fraction", "0.5", "--batch-size", "2",
          "--warmup-steps", "1", "--stats-clips", "4", "--val-clips", "2")  # fmt: skip
    assert (out / "vae" / "model" / "vae.safetensors").is_file()
    train("encode", "--data", str(root), "--init", str(out / "vae" / "model"), "--out", str(out),
          "--latent-frames", "3", "--stride", "8", "--val-fraction", "0.5", "--batch-size", "2")  # fmt: skip
    assert json.loads((out / "encode" / "index.json").read_text())["complete"]


def test_chunks_split_long_episodes_and_a_reopened_dataset_gets_new_episodes(tmp_path) -> None:
    root = tmp_path / "game"
    with DatasetWriter(root, fps=10, frame_size=SIZE, chunk_frames=7) as writer:
        for t in range(20):
            writer.add(_frame(t), [1, 0, 0, 0], [0.0, 0.0])
        writer.end_episode()
        writer.end_episode()  # nothing added since: no empty episode
        writer.add(_frame(99), [0, 1, 0, 0], [0.1, -0.2])
    manifest = read_manifest(root)
    assert [(c.index, c.episode, c.part, c.frames) for c in manifest.chunks] == [
        (0, 0, 0, 7), (1, 0, 1, 7), (2, 0, 2, 6), (3, 1, 0, 1)]  # fmt: skip
    frames = np.concatenate([open_chunk(root / c.file)["frames"][:, 0, 0, 0] for c in manifest.chunks[:3]])
    assert frames.tolist() == list(range(20))  # every frame once, in order
    last = open_chunk(root / manifest.chunks[3].file)
    assert last["keyboard"].tolist() == [[0, 1, 0, 0]] and np.allclose(last["mouse"], [[0.1, -0.2]])

    with DatasetWriter(root, fps=10, frame_size=SIZE, chunk_frames=7) as again:
        assert again.episode == 2
        again.add(_frame(5), [0, 0, 0, 1], [0.0, 0.1])
    assert read_manifest(root).episodes == [0, 1, 2]
    with pytest.raises(ValueError, match="already holds a dataset recorded with other settings"):
        DatasetWriter(root, fps=20, frame_size=SIZE)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no dataset manifest"):
        DatasetWriter(tmp_path / "other", fps=10, frame_size=SIZE)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"  # nothing touched


@pytest.mark.parametrize(
    ("frame", "keyboard", "mouse", "variables", "message"),
    [
        (np.zeros((16, 32, 3), np.float32), [1, 0, 0, 0], [0, 0], [1.0], r"frame must be uint8 \(16, 32, 3\)"),
        (np.zeros((32, 16, 3), np.uint8), [1, 0, 0, 0], [0, 0], [1.0], r"frame must be uint8 \(16, 32, 3\)"),
        (_frame(0), [0.5, 0, 0, 0], [0, 0], [1.0], "keyboard must be 4 values of 0 or 1"),
        (_frame(0), [1, 0, 0], [0, 0], [1.0], "keyboard must be 4 values of 0 or 1"),
        (_frame(0), [1, 0, 0, 0], [0, float("nan")], [1.0], "mouse must be 2 finite numbers"),
        (_frame(0), [1, 0, 0, 0], [0, 0], None, r"variables must be 1 finite numbers \(\['SCORE'\]\)"),
        (_frame(0), [1, 0, 0, 0], [0, 0], [float("inf")], "variables must be 1 finite numbers"),
    ],
)
def test_bad_frames_and_actions_are_refused_with_what_is_accepted(tmp_path, frame, keyboard, mouse, variables, message):
    with DatasetWriter(tmp_path / "game", fps=10, frame_size=SIZE, variables=["SCORE"]) as writer:
        with pytest.raises(ValueError, match=message):
            writer.add(frame, keyboard, mouse, variables)
        writer.add(_frame(1), [1, 0, 0, 0], [0.0, 0.0], [3.0])  # the writer still works
    assert [c.frames for c in read_manifest(tmp_path / "game").chunks] == [1]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fps": 0}, "fps must be a positive number"),
        ({"frame_size": (16,)}, "frame_size must be"),
        ({"variables": ["EPISODE_START"]}, "variables must be distinct names other than 'EPISODE_START'"),
        ({"variables": ["A", "A"]}, "variables must be distinct names"),
        ({"chunk_frames": 0}, "chunk_frames must be at least 1"),
    ],
)
def test_bad_settings_are_refused(tmp_path, settings, message) -> None:
    arguments = {"fps": 10, "frame_size": SIZE, **settings}
    with pytest.raises(ValueError, match=message):
        DatasetWriter(tmp_path / "game", **arguments)
