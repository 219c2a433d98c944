"""Encoding a dataset into latent clips: what is stored, that it decodes as the VAE does, resumption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_training import LATENT_FRAMES, STRIDE, encode, run_cli, tiny_dataset, tiny_latents, tiny_model_folder

from matrixgame_env.checkpoints import load_model
from matrixgame_env.cli import main
from matrixgame_env.data.dataset import VideoClipDataset
from matrixgame_env.train.encode import LatentClipDataset, read_latent_index
from matrixgame_env.weights import read_state_dict


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    return tiny_latents(tmp_path_factory)


def test_stored_clips_are_the_dataset_clips_encoded_by_the_vae(encoded, dataset, model) -> None:
    vae = load_model(model, device="cpu").vae
    clips = VideoClipDataset(dataset, clip_frames=9, val_fraction=0.5, stride=STRIDE)
    stored = LatentClipDataset(encoded, "train")
    assert len(stored) == len(clips)
    for index in (0, len(clips) - 1):
        clip, item = clips[index], stored[index]
        with torch.no_grad():
            latents = vae.encode(clip["video"][None])[0]
            image = vae.encode_image_condition(clip["video"][None, :, 0], LATENT_FRAMES).latents(LATENT_FRAMES)[0]
        assert item["latents"].shape == (16, LATENT_FRAMES, 2, 4)
        torch.testing.assert_close(item["latents"], latents, atol=2e-3, rtol=2e-3)  # stored as float16
        torch.testing.assert_close(item["image_latents"], image, atol=2e-3, rtol=2e-3)
        expected_first = ((clip["video"][:, 0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
        assert torch.equal(item["first_frame"], expected_first)
        for key in ("keyboard", "mouse", "variables"):
            assert torch.equal(item[key], clip[key]), key


def test_stored_latents_decode_to_what_the_vae_reconstructs(encoded, dataset, model) -> None:
    vae = load_model(model, device="cpu").vae
    clip = VideoClipDataset(dataset, clip_frames=9, val_fraction=0.5, stride=STRIDE)[1]["video"][None]
    with torch.no_grad():
        reconstructed = vae.decode(vae.encode(clip))
        from_stored = vae.decode(LatentClipDataset(encoded, "train")[1]["latents"][None])
    assert (from_stored - reconstructed).abs().max() < 0.02


def test_index_describes_splits_shards_and_variables(encoded) -> None:
    index = read_latent_index(encoded)
    assert index["complete"] and index["latent_frames"] == LATENT_FRAMES and index["video_frames"] == 9
    assert set(index["splits"]) == {"train", "val"}
    for split, entry in index["splits"].items():
        assert len(entry["shards"]) == -(-entry["clips"] // 4)
        assert all((encoded / split / name).is_file() for name in entry["shards"])
    assert "POSITION_X" in index["variables"] and index["keyboard"] == ["forward", "back", "left", "right"]


def test_a_clip_prefix_is_a_shorter_clip(encoded) -> None:
    full, prefix = LatentClipDataset(encoded, "val")[0], LatentClipDataset(encoded, "val", num_frames=2)[0]
    assert torch.equal(prefix["latents"], full["latents"][:, :2])
    assert prefix["keyboard"].shape[0] == 5 and torch.equal(prefix["mouse"], full["mouse"][:5])


def test_resume_writes_only_the_missing_shards(encoded, dataset, model, tmp_path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(encoded, out / "encode")
    index_path = out / "encode" / "index.json"
    index = json.loads(index_path.read_text())
    index["complete"] = False  # as a session that ran out of time leaves it
    index_path.write_text(json.dumps(index))
    last = out / "encode" / "train" / index["splits"]["train"]["shards"][-1]
    first = out / "encode" / "train" / index["splits"]["train"]["shards"][0]
    last.unlink()
    first_written = first.stat().st_mtime_ns
    encode(dataset, model, out, "--resume")
    assert first.stat().st_mtime_ns == first_written
    original = read_state_dict(encoded / "train" / last.name)
    rewritten = read_state_dict(last)
    assert set(rewritten) == set(original)
    # the encoder's float32 sums may differ by rounding, stored in bfloat16: one step apart at most
    for key in original:
        if key in ("latents", "image_latents"):
            torch.testing.assert_close(rewritten[key].float(), original[key].float(), rtol=2**-7, atol=1e-6)
        else:  # copied from the recording
            assert torch.equal(original[key], rewritten[key]), key
    assert read_latent_index(out / "encode")["complete"]


def test_encoding_again_without_resume_is_refused(encoded, dataset, model) -> None:
    status, errors = run_cli("train", "encode", "--data", str(dataset), "--init", str(model),
                             "--out", str(encoded.parent), "--device", "cpu", "--no-progress",
                             "--latent-frames", str(LATENT_FRAMES), "--stride", str(STRIDE))  # fmt: skip
    assert status == 2 and "--resume" in errors


def test_encode_needs_a_model(dataset, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "encode", "--data", str(dataset), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "the following arguments are required: --init" in capsys.readouterr().err
