"""Recording datasets with the real engine (chunks, manifest, resume) and reading clips back."""

from __future__ import annotations

import argparse
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from matrixgame_env.data.dataset import VideoClipDataset, validation_episodes
from matrixgame_env.data.recording import add_record_arguments, record, recording_settings, run_record
from matrixgame_env.data.storage import ChunkInfo, Manifest, chunk_file, open_chunk, read_manifest, write_chunk
from matrixgame_env.data.storage import write_manifest as store_manifest
from matrixgame_env.data.vizdoom_recorder import VARIABLE_NAMES, RecorderConfig

CHUNK_FRAMES = 100
# 4 chunks of 100 frames: 2 episodes of 2 chunks.
SMALL = {"minutes": 4 * CHUNK_FRAMES / 17.5 / 60, "chunk_frames": CHUNK_FRAMES, "chunks_per_episode": 2}
ANGLE = VARIABLE_NAMES.index("ANGLE")
RESTART = VARIABLE_NAMES.index("EPISODE_START")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    pytest.importorskip("vizdoom")
    root = tmp_path_factory.mktemp("recorded") / "dataset"
    record(root, workers=2, seed=5, progress=False, **SMALL)
    return root


def _copy(recorded, tmp_path):
    copy = tmp_path / "dataset"
    shutil.copytree(recorded, copy)
    return copy


def test_recording_writes_a_manifest_and_chunks_of_the_right_shapes(recorded):
    manifest = json.loads((recorded / "manifest.json").read_text())
    assert manifest["format"] == "matrixgame-env/vizdoom-chunks" and manifest["format_version"] == 1
    assert manifest["fps"] == 17.5 and manifest["tics_per_frame"] == 2 and manifest["frame_size"] == [96, 176]
    assert manifest["action_layout"] == "universal"
    assert manifest["keyboard"] == ["forward", "back", "left", "right"] and manifest["mouse"] == ["pitch", "yaw"]
    assert manifest["mouse_units"]["degrees_per_unit"] == 40.0
    assert manifest["variables"] == list(VARIABLE_NAMES)
    assert [(c["index"], c["episode"], c["part"], c["frames"]) for c in manifest["chunks"]] == [
        (0, 0, 0, 100),
        (1, 0, 1, 100),
        (2, 1, 0, 100),
        (3, 1, 1, 100),
    ]
    assert manifest["chunks"][0]["map"] != manifest["chunks"][2]["map"]  # episodes rotate through the maps
    for chunk in manifest["chunks"]:
        arrays = open_chunk(recorded / chunk["file"])
        assert arrays["frames"].shape == (100, 96, 176, 3) and arrays["frames"].dtype == np.uint8
        assert arrays["keyboard"].shape == (100, 4) and arrays["keyboard"].dtype == np.int8
        assert arrays["mouse"].shape == (100, 2) and arrays["mouse"].dtype == np.float32
        assert arrays["variables"].shape == (100, len(VARIABLE_NAMES)) and arrays["variables"].dtype == np.float32


def test_an_episode_continues_across_its_chunks(recorded):
    first, second = (open_chunk(recorded / chunk_file(index)) for index in (0, 1))
    assert first["variables"][0, RESTART] == 1 and second["variables"][0, RESTART] == 0
    # The last action of chunk 0 leads to the first frame of chunk 1: the yaw label matches that angle change.
    turned_right = -((second["variables"][0, ANGLE] - first["variables"][-1, ANGLE] + 180) % 360 - 180)
    assert abs(first["mouse"][-1, 1] * 40.0 - turned_right) < 1e-3


def test_recorded_yaw_labels_match_the_angle_changes(recorded):
    errors = []
    for index in range(4):
        arrays = open_chunk(recorded / chunk_file(index))
        angle = np.asarray(arrays["variables"][:, ANGLE], dtype=np.float64)
        turned_right = -((np.diff(angle) + 180) % 360 - 180)
        errors.append(np.abs(arrays["mouse"][:-1, 1] * 40.0 - turned_right))
    assert np.concatenate(errors).max() < 1e-3


def test_resume_rerecords_a_deleted_chunk_identically_and_leaves_the_others(recorded, tmp_path):
    root = _copy(recorded, tmp_path)
    deleted = root / chunk_file(3)  # the second chunk of episode 1: its episode is replayed from the start
    original = deleted.read_bytes()
    deleted.unlink()
    others = {index: (root / chunk_file(index)).stat() for index in range(3)}

    record(root, workers=2, seed=5, progress=False, **SMALL)

    assert deleted.read_bytes() == original
    for index, before in others.items():
        after = (root / chunk_file(index)).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [chunk.index for chunk in read_manifest(root).chunks] == [0, 1, 2, 3]


def test_resume_with_other_settings_is_refused(recorded, tmp_path):
    root = _copy(recorded, tmp_path)
    with pytest.raises(ValueError, match="frame_size"):
        record(root, workers=1, seed=5, size=(64, 112), progress=False, **SMALL)


def test_record_command_line_resumes_a_finished_recording(recorded, tmp_path, capsys):
    root = _copy(recorded, tmp_path)
    parser = argparse.ArgumentParser()
    add_record_arguments(parser)
    minutes = str(SMALL["minutes"])
    args = parser.parse_args(["--out", str(root), "--minutes", minutes, "--seed", "5", "--chunk-frames", "100"])
    run_record(args)  # nothing is missing: no progress bar, no workers
    assert "4 chunks, 2 episodes, 400 frames" in capsys.readouterr().out


def test_clips_have_the_documented_shapes_and_ranges(recorded):
    dataset = VideoClipDataset(recorded, clip_frames=17, split="train", val_fraction=0.5)
    assert len(dataset) == 2 * (100 - 17 + 1)  # the two chunks of episode 0, a clip starting at every frame
    item = dataset[len(dataset) - 1]
    assert item["video"].shape == (3, 17, 96, 176) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1 and item["video"].std() > 0.05
    assert item["keyboard"].shape == (17, 4) and item["keyboard"].dtype == torch.float32
    assert item["mouse"].shape == (17, 2) and item["mouse"].dtype == torch.float32
    assert item["variables"].shape == (17, len(VARIABLE_NAMES)) and item["variables"].dtype == torch.float32
    chunk = open_chunk(recorded / chunk_file(1))
    expected = torch.from_numpy(np.array(chunk["frames"][-17:])).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(item["video"], expected)
    torch.testing.assert_close(item["mouse"], torch.from_numpy(np.array(chunk["mouse"][-17:])))


def test_train_and_val_splits_hold_different_episodes(recorded):
    train = VideoClipDataset(recorded, clip_frames=5, split="train", val_fraction=0.5)
    val = VideoClipDataset(recorded, clip_frames=5, split="val", val_fraction=0.5)
    assert train.episodes == [0] and val.episodes == [1]
    assert {c.episode for c in train.chunks} == {0} and {c.episode for c in val.chunks} == {1}
    assert not torch.equal(train[0]["video"], val[0]["video"])


def test_validation_episodes_are_spread_and_stable_as_a_recording_grows():
    assert validation_episodes(range(20), 0.1) == {9, 19}
    assert validation_episodes(range(10), 0.25) == {3, 7}
    assert validation_episodes(range(10), 0.25) <= validation_episodes(range(100), 0.25)
    assert validation_episodes(range(10), 0.0) == set()


def test_size_resizes_clips(recorded):
    item = VideoClipDataset(recorded, clip_frames=1, val_fraction=0.5, size=(48, 88))[0]
    assert item["video"].shape == (3, 1, 48, 88)
    assert item["video"].min() >= -1 and item["video"].max() <= 1


def test_dataset_survives_pickling_for_dataloader_workers(recorded):
    dataset = VideoClipDataset(recorded, clip_frames=5, val_fraction=0.5)
    dataset[0]  # opens a memory map, which must not be pickled
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[3]["video"], dataset[3]["video"])


def _synthetic_dataset(root, restarts_at=()):
    """One episode of one 40-frame chunk, written through the storage API (no engine)."""
    frames = 40
    variables = np.zeros((frames, len(VARIABLE_NAMES)), np.float32)
    variables[[0, *restarts_at], RESTART] = 1
    arrays = {
        "frames": np.full((frames, 96, 176, 3), 128, np.uint8),
        "keyboard": np.zeros((frames, 4), np.int8),
        "mouse": np.zeros((frames, 2), np.float32),
        "variables": variables,
    }
    write_chunk(root / chunk_file(0), arrays)
    manifest = Manifest(recording_settings(RecorderConfig(), 0, frames, 1), [ChunkInfo(0, 0, 0, "MAP01", 1, frames)])
    store_manifest(root, manifest)
    return root


def test_clips_never_span_a_game_restart(tmp_path):
    root = _synthetic_dataset(tmp_path, restarts_at=(20,))
    dataset = VideoClipDataset(root, clip_frames=9, val_fraction=0.0)
    starts = sorted(int(start) for _, start in dataset._clips)
    # Clips may start at frame 20 (the restart) but must not contain it later: starts 12..19 are excluded.
    assert starts == list(range(0, 12)) + list(range(20, 32))


def test_bad_arguments_raise_clear_errors(tmp_path):
    root = _synthetic_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        VideoClipDataset(root, clip_frames=8)
    with pytest.raises(ValueError, match="split"):
        VideoClipDataset(root, split="test")
    with pytest.raises(ValueError, match="val_fraction"):
        VideoClipDataset(root, val_fraction=1.5)
    with pytest.raises(ValueError, match="no clips"):
        VideoClipDataset(root, split="val", val_fraction=0.5)  # one episode: nothing held out
    with pytest.raises(FileNotFoundError, match="manifest"):
        VideoClipDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="minutes"):
        record(tmp_path / "other", minutes=0)
    with pytest.raises(ValueError, match="MAP99"):
        record(tmp_path / "other", minutes=1, maps=("MAP01", "MAP99"))
