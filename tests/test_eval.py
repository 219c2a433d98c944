"""Evaluation against the real game: metrics vs float64 references, the IDM on a real recording, drift
verdicts, and `matrixgame-env eval` end to end on a tiny model and a tiny real ViZDoom recording."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import write_tiny_model
from tiny_training import VAL_FRACTION, run_cli, tiny_dataset, tiny_model_folder

from matrixgame_env.data.dataset import VideoClipDataset
from matrixgame_env.eval.command import reads_above_real, summary_lines
from matrixgame_env.eval.drift import drift_report, frame_statistics, real_ranges
from matrixgame_env.eval.fidelity import (
    clip_frames,
    generate_clips,
    horizon_frames,
    reconstruct_clips,
    reconstruct_frames_alone,
    summary_points,
)
from matrixgame_env.eval.idm import (
    IDMConfig,
    InverseDynamicsModel,
    Labels,
    Predictions,
    TrainSettings,
    accuracy,
    accuracy_by_phase,
    batches_in_device_memory,
    clip_windows,
    evaluate_clips,
    evaluate_windows,
    judge_clips,
    load_idm,
    mirror_windows,
    save_idm,
    share_above_chance,
    train_idm,
    yaw_direction,
)
from matrixgame_env.eval.key_readability import best_threshold_accuracy, displacement_in_view, key_readability
from matrixgame_env.eval.metrics import PSNR_CAP, psnr, ssim
from matrixgame_env.eval.real_data import FrameWindows, resize_frames
from matrixgame_env.eval.reconstruction import frames_report, real_clips, reconstruction_report
from matrixgame_env.model_config import ModelConfig
from matrixgame_env.world.model import WorldModel

# ---------------------------------------------------------------------------------------------- references


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two HxWxC images in float64, written from Wang et al. (2004) independently of the package."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    radius = np.arange(11) - 5.0
    g = np.exp(-(radius**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def local_mean(image: np.ndarray) -> np.ndarray:
        patches = np.lib.stride_tricks.sliding_window_view(image, (11, 11))  # [H-10, W-10, 11, 11]
        return np.einsum("ijkl,kl->ij", patches, window)

    values = []
    for channel in range(x.shape[2]):
        p, q = x[..., channel], y[..., channel]
        mp, mq = local_mean(p), local_mean(q)
        sp = local_mean(p * p) - mp**2
        sq = local_mean(q * q) - mq**2
        spq = local_mean(p * q) - mp * mq
        index = ((2 * mp * mq + c1) * (2 * spq + c2)) / ((mp**2 + mq**2 + c1) * (sp + sq + c2))
        values.append(index.mean())
    return float(np.mean(values))


def _frame_pairs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of 24x40 RGB frames: structured pictures and distorted copies (noise, blur-like shifts, contrast)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:24, 0:40]
    base = np.stack([128 + 100 * np.sin(rows / 3.0 + c) * np.cos(cols / 5.0) for c in range(3)], -1)
    firsts, seconds = [], []
    for kind in range(4):
        first = np.clip(base + rng.normal(0, 10, base.shape), 0, 255)
        if kind == 0:
            second = first + rng.normal(0, 25, base.shape)
        elif kind == 1:
            second = np.roll(first, 2, axis=1)
        elif kind == 2:
            second = 0.5 * first + 60
        else:
            second = rng.uniform(0, 255, base.shape)
        firsts.append(first)
        seconds.append(np.clip(second, 0, 255))
    return np.round(firsts).astype(np.uint8), np.round(seconds).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- metrics


def test_ssim_matches_a_float64_reference() -> None:
    a, b = _frame_pairs()
    expected = [reference_ssim(x, y) for x, y in zip(a, b)]
    assert min(expected) < 0.1 and max(expected) > 0.75  # the pairs span dissimilar to similar
    in_float64 = ssim(torch.from_numpy(a), torch.from_numpy(b), dtype=torch.float64)
    np.testing.assert_allclose(in_float64.double().numpy(), expected, rtol=0, atol=1e-6)
    in_float32 = ssim(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(in_float32.double().numpy(), expected, rtol=0, atol=1e-4)


def test_ssim_of_identical_frames_is_one_and_symmetric() -> None:
    a, b = (torch.from_numpy(x) for x in _frame_pairs(seed=1))
    torch.testing.assert_close(ssim(a, a), torch.ones(len(a)), atol=1e-6, rtol=0)
    torch.testing.assert_close(ssim(a, b), ssim(b, a), atol=1e-6, rtol=0)
    assert ssim(a[None, None], b[None, None]).shape == (1, 1, len(a))  # leading dimensions are kept


def test_psnr_of_a_constant_offset_and_of_equal_frames() -> None:
    rng = np.random.default_rng(2)
    frame = rng.integers(20, 200, (2, 16, 32, 3), dtype=np.uint8)
    for offset in (1, 5, 40):
        shifted = torch.from_numpy(frame + np.uint8(offset))
        expected = 20 * math.log10(255 / offset)
        measured = psnr(torch.from_numpy(frame), shifted)
        torch.testing.assert_close(measured, torch.full((2,), expected), atol=1e-4, rtol=0)
    assert psnr(torch.from_numpy(frame), torch.from_numpy(frame)).tolist() == [PSNR_CAP, PSNR_CAP]


def test_psnr_matches_a_float64_reference() -> None:
    a, b = _frame_pairs(seed=3)
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    expected = 10 * np.log10(255.0**2 / mse)
    np.testing.assert_allclose(psnr(torch.from_numpy(a), torch.from_numpy(b)).numpy(), expected, atol=1e-4, rtol=0)


def test_frames_too_small_or_mismatched_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(8, 8, 3, dtype=torch.uint8), torch.zeros(8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(16, 16, 3), torch.zeros(16, 17, 3))


def test_horizons_cover_whole_blocks() -> None:
    assert horizon_frames(1.0, 17.5) == 18 and horizon_frames(0.5, 17.5) == 9  # 8.75 rounds up
    assert [label for label, _ in summary_points(70, 17.5)] == ["0.5s", "1s", "2s", "4s"]
    assert summary_points(21, 17.5)[-1] == ("1.2s", 21)


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny random model at the recording's frame rate (17.5 fps), so frames line up in time."""
    folder = write_tiny_model(tmp_path_factory.mktemp("eval_model") / "model")
    config = ModelConfig.load(folder)
    config.fps = 17.5
    config.save(folder / "config.json")
    return folder


def test_held_out_windows_come_from_the_episodes_training_holds_out(dataset) -> None:
    windows = FrameWindows(dataset, "val", 9, float(VAL_FRACTION), stride=8)
    training_view = VideoClipDataset(dataset, clip_frames=9, split="val", val_fraction=float(VAL_FRACTION), stride=8)
    assert windows.episodes == training_view.episodes == [1, 3]
    for index in (0, len(windows) - 1):
        item, clip = windows[index], training_view[index]
        assert torch.equal(item["frames"], ((clip["video"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0))
        assert torch.equal(item["keyboard"], clip["keyboard"]) and torch.equal(item["mouse"], clip["mouse"])


def test_clips_generated_in_a_batch_equal_clips_generated_alone(dataset, model) -> None:
    world = WorldModel.from_pretrained(model, device="cpu")
    items = FrameWindows(dataset, "val", clip_frames(world, 1), float(VAL_FRACTION), stride=40).stack([0, 1])
    assert items["frames"].shape[1] == 9
    together = generate_clips(world, items["frames"][:, 0], items["keyboard"], items["mouse"], 2, seed=5,
                              progress=False)  # fmt: skip
    second_alone = generate_clips(world, items["frames"][1:, 0], items["keyboard"][1:], items["mouse"][1:], 1,
                                  seed=6, progress=False)  # fmt: skip
    assert together.shape == (2, 9, 16, 32, 3) and together.dtype == torch.uint8
    assert (together[1].int() - second_alone[0].int()).abs().max() <= 1  # world k is seeded seed + k


# ---------------------------------------------------------------------------------------------- IDM


def test_yaw_direction_has_a_dead_zone() -> None:
    directions = yaw_direction(torch.tensor([-0.2, -0.03, -0.02, 0.0, 0.019, 0.021, 0.3]), 0.02)
    assert directions.tolist() == [0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("windows_on", ["loader", "device"])
def test_idm_learns_real_actions_well_above_chance(dataset, tmp_path, windows_on) -> None:
    config = IDMConfig(video_size=(16, 32), width=8)
    train = FrameWindows(dataset, "train", config.context, float(VAL_FRACTION))
    settings = TrainSettings(steps=300, batch_size=16, lr=3e-3, windows_on=windows_on)
    model, history = train_idm(train, config, settings, progress=False)
    items = train.stack(list(range(len(train))))
    result = evaluate_windows(model, items["frames"], items["keyboard"], items["mouse"])
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert result["keyboard"] >= result["chance"]["keyboard"] + 0.08, result
    assert result["yaw_direction"] >= result["chance"]["yaw_direction"] + 0.2, result
    assert result["keyboard_exact"] >= result["chance"]["keyboard_exact"] + 0.2, result

    save_idm(model, tmp_path / "idm", {"note": "test"})
    loaded = load_idm(tmp_path / "idm" / "idm.json")
    again = loaded.predict(items["frames"])
    first = model.predict(items["frames"])
    assert torch.equal(again.keys, first.keys) and torch.equal(again.yaw, first.yaw)


def test_windows_cut_in_device_memory_are_the_recordings_windows(dataset) -> None:
    train = FrameWindows(dataset, "train", 5, float(VAL_FRACTION))
    items = train.stack(list(range(len(train))))
    known = {(items["frames"][i].numpy().tobytes(), items["keyboard"][i].numpy().tobytes(),
              items["mouse"][i].numpy().tobytes()) for i in range(len(train))}  # fmt: skip
    batches = batches_in_device_memory(train, TrainSettings(batch_size=32, seed=3), "cpu")
    drawn = set()
    for _ in range(4):
        batch = next(batches)
        assert batch["frames"].shape == (32, 5, *train.frame_size, 3) and batch["frames"].dtype == torch.uint8
        for i in range(32):
            window = (batch["frames"][i].numpy().tobytes(), batch["keyboard"][i].numpy().tobytes(),
                      batch["mouse"][i].numpy().tobytes())  # fmt: skip
            assert window in known  # frames and actions of one recorded window, never across a chunk or restart
            drawn.add(window)
    assert len(drawn) > 64  # 128 draws with replacement from hundreds of windows: mostly distinct
    with pytest.raises(ValueError, match="windows_on must be"):
        train_idm(train, IDMConfig(video_size=(16, 32), context=5, before=1, width=4),
                  TrainSettings(steps=1, windows_on="gpu"), progress=False)  # fmt: skip


def test_idm_windows_of_clips_are_labelled_with_the_action_after_the_first_frame() -> None:
    frames = torch.arange(2 * 5).view(2, 5, 1, 1, 1).expand(2, 5, 16, 32, 3).to(torch.uint8)
    keyboard = torch.zeros(2, 5, 4)
    keyboard[1, 2, 3] = 1  # clip 1, frame 2: right held
    mouse = torch.zeros(2, 5, 2)
    mouse[0, 3, 1] = -0.1  # clip 0, frame 3: turning left
    windows, window_keys, window_mouse = clip_windows(frames, keyboard, mouse, 3)
    labels = Labels.of_windows(window_keys, window_mouse, IDMConfig(video_size=(16, 32)))
    assert windows.shape == (6, 3, 16, 32, 3)
    assert windows[4, :, 0, 0, 0].tolist() == [6, 7, 8]  # clip 1, labelled by frame 2
    assert labels.keys[4].tolist() == [False, False, False, True] and labels.keys.sum() == 1
    assert labels.yaw.tolist() == [1, 1, 0, 1, 1, 1]


def test_accuracy_and_its_chance_levels() -> None:
    keys = torch.tensor([[1, 0, 0, 0]] * 6 + [[1, 0, 1, 0]] * 2 + [[0, 1, 0, 0]] * 2).bool()  # 10 frames
    yaw = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    labels = Labels(keys, yaw)
    names = ("forward", "back", "left", "right")
    majority = accuracy(Predictions(torch.tensor([[True, False, False, False]] * 10), torch.zeros(10).long()), labels,
                        names)  # fmt: skip
    assert majority["keyboard_per_key"] == {"forward": 0.8, "back": 0.8, "left": 0.8, "right": 1.0}
    assert majority["keyboard"] == pytest.approx(0.85) == majority["chance"]["keyboard"]
    assert majority["keyboard_exact"] == pytest.approx(0.6) == majority["chance"]["keyboard_exact"]
    assert majority["yaw_direction"] == pytest.approx(0.5) == majority["chance"]["yaw_direction"]
    # Balanced: forward, back and left score 0.5 (one class right, one wrong), right 1 (one class, right).
    assert majority["keyboard_balanced"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.0) / 4)
    assert majority["yaw_direction_balanced"] == pytest.approx(1 / 3)
    assert majority["yaw_confusion"] == {"left": {"left": 5, "none": 0, "right": 0},
                                         "none": {"left": 3, "none": 0, "right": 0},
                                         "right": {"left": 2, "none": 0, "right": 0}}  # fmt: skip
    assert majority["keyboard_confusion"]["forward"] == {"held": {"held": 8, "released": 0},
                                                         "released": {"held": 2, "released": 0}}  # fmt: skip
    assert majority["keyboard_confusion"]["left"] == {"held": {"held": 0, "released": 2},
                                                      "released": {"held": 0, "released": 8}}  # fmt: skip
    mixed = accuracy(Predictions(keys, torch.tensor([2, 0, 0, 0, 0, 1, 1, 2, 2, 0])), labels, names)
    assert mixed["yaw_confusion"] == {"left": {"left": 4, "none": 0, "right": 1},
                                      "none": {"left": 0, "none": 2, "right": 1},
                                      "right": {"left": 1, "none": 0, "right": 1}}  # fmt: skip
    perfect = accuracy(Predictions(keys, yaw), labels, names)
    assert perfect["keyboard"] == perfect["keyboard_exact"] == perfect["keyboard_balanced"] == 1.0
    assert perfect["yaw_direction"] == perfect["yaw_direction_balanced"] == 1.0


def test_share_above_chance_of_what_a_reference_reads() -> None:
    chance = {"keyboard": 0.8, "yaw_direction": 0.4}
    round_trip = {"keyboard": 0.86, "yaw_direction": 0.8, "chance": chance}
    generated = {"keyboard": 0.83, "yaw_direction": 0.76, "chance": chance}
    shares = share_above_chance(generated, round_trip)
    assert shares["keyboard"] == pytest.approx(0.5) and shares["yaw_direction"] == pytest.approx(0.9)
    below = share_above_chance({**generated, "keyboard": 0.77}, round_trip)  # below chance: negative
    assert below["keyboard"] == pytest.approx(-0.5)
    at_chance = share_above_chance(generated, {**round_trip, "keyboard": 0.805})  # nothing to share
    assert at_chance["keyboard"] is None and at_chance["yaw_direction"] == pytest.approx(0.9)


def test_mirroring_swaps_left_and_right() -> None:
    frames = torch.zeros(2, 3, 16, 32, 3, dtype=torch.uint8)
    frames[:, :, :, 0] = 255  # a bright left edge
    # Both windows: forward and left held, turning left.
    labels = Labels(torch.tensor([[True, False, True, False]] * 2), torch.tensor([0, 0]))
    config = IDMConfig(video_size=(16, 32))
    mirrored, swapped = mirror_windows(frames, labels, config, torch.tensor([True, False]))
    assert mirrored[0, :, :, -1].eq(255).all() and mirrored[0, :, :, 0].eq(0).all()
    assert torch.equal(mirrored[1], frames[1])
    assert swapped.keys.tolist() == [[True, False, False, True], [True, False, True, False]]
    assert swapped.yaw.tolist() == [2, 0]
    assert labels.keys[0].tolist() == [True, False, True, False]  # the input labels are left alone


def test_loading_something_else_as_an_idm_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no inverse-dynamics model"):
        load_idm(tmp_path)
    (tmp_path / "idm.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "idm.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not an inverse-dynamics model"):
        load_idm(tmp_path)


# ---------------------------------------------------------------------------------------------- drift


def test_frame_statistics_of_known_frames() -> None:
    grey = torch.full((1, 2, 16, 32, 3), 90, dtype=torch.uint8)
    stats = frame_statistics(grey, previous=torch.full((1, 16, 32, 3), 80, dtype=torch.uint8))
    torch.testing.assert_close(stats["brightness"], torch.full((1, 2), 90.0))
    for name in ("contrast", "colourfulness", "sharpness"):
        torch.testing.assert_close(stats[name], torch.zeros(1, 2), atol=1e-4, rtol=0)
    assert stats["motion"].tolist() == [[10.0, 0.0]]
    red = torch.zeros(1, 1, 16, 32, 3, dtype=torch.uint8)
    red[..., 0] = 200  # opponent channels R - G = 200, (R + G) / 2 - B = 100, both constant
    torch.testing.assert_close(frame_statistics(red)["colourfulness"], torch.tensor([[0.3 * math.hypot(200, 100)]]))
    stripes = torch.zeros(1, 1, 16, 32, 3, dtype=torch.uint8)
    stripes[:, :, :, ::2] = 100  # columns alternate 0 / 100: the Laplacian is -+200 everywhere
    torch.testing.assert_close(frame_statistics(stripes)["sharpness"], torch.tensor([[200.0]]))


def test_drift_flags_grey_frames_and_accepts_real_ones(dataset) -> None:
    ranges = real_ranges(FrameWindows(dataset, "val", 2, float(VAL_FRACTION)), (16, 32))
    real = FrameWindows(dataset, "val", 40, float(VAL_FRACTION)).stack([0, 1])["frames"]  # two whole episodes
    verdict = drift_report({k: v.numpy() for k, v in frame_statistics(real).items()}, ranges, fps=17.5)
    assert not verdict["collapsed"], verdict["statistics"]
    assert all(values["in_range_share"] > 0.9 for values in verdict["statistics"].values())
    grey = torch.full((2, 40, 16, 32, 3), 128, dtype=torch.uint8)
    collapsed = drift_report({k: v.numpy() for k, v in frame_statistics(grey).items()}, ranges, fps=17.5)
    assert collapsed["collapsed"]
    assert {"contrast", "sharpness"} <= set(collapsed["collapsed_statistics"])
    assert collapsed["statistics"]["contrast"]["in_range_share"] == 0.0
    assert len(collapsed["seconds"]) == 2 and len(collapsed["statistics"]["motion"]["per_second_mean"]) == 2


def test_drift_tells_a_drift_from_frames_out_of_range_from_the_start(dataset) -> None:
    ranges = real_ranges(FrameWindows(dataset, "val", 2, float(VAL_FRACTION)), (16, 32))
    real = FrameWindows(dataset, "val", 40, float(VAL_FRACTION)).stack([0, 1])["frames"]
    fading = real.clone()
    fading[:, -10:] = 128  # the game's look, then grey at the end: a drift
    grey = torch.full_like(real, 128)  # grey from the first frame: a look, not a drift
    onsets = {}
    for name, frames in (("real", real), ("fading", fading), ("grey", grey)):
        report = drift_report({k: v.numpy() for k, v in frame_statistics(frames).items()}, ranges, fps=17.5)
        assert report["opening_frames"] == 4  # at most the final stretch: 10 % of 40 frames
        onsets[name] = {stat: values["onset"] for stat, values in report["statistics"].items()}
        for stat in report["collapsed_statistics"]:
            assert onsets[name][stat] is not None
    assert set(onsets["real"].values()) == {None}
    assert onsets["fading"]["contrast"] == "drifted" and onsets["fading"]["sharpness"] == "drifted"
    assert onsets["grey"]["contrast"] == "from the start" and onsets["grey"]["sharpness"] == "from the start"


# ---------------------------------------------------------------------------------------------- command


def test_eval_command_end_to_end(dataset, model, tmp_path) -> None:
    out = tmp_path / "eval"
    status, errors = run_cli("eval", "--model", str(model), "--data", str(dataset), "--out", str(out),
                             "--val-fraction", VAL_FRACTION, "--clips", "2", "--horizon-s", "1", "--drift-minutes",
                             "0.02", "--drift-worlds", "2", "--steps", "20", "--idm-batch-size", "8", "--idm-width",
                             "8", "--idm-context", "4", "--idm-before", "1", "--device", "cpu",
                             "--no-progress")  # fmt: skip
    assert status == 0, errors
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"settings", "fidelity", "idm", "drift", "targets", "timing_s"}

    fidelity = report["fidelity"]
    assert fidelity["clips"] == 2 and fidelity["horizon_frames"] == 18 and len(fidelity["time_s"]) == 19
    assert set(fidelity["methods"]) == {"model", "copy_last_frame", "vae_reconstruction"}
    for values in fidelity["methods"].values():
        assert len(values["psnr"]) == len(values["ssim"]) == 19
        assert all(0 < v <= PSNR_CAP for v in values["psnr"]) and all(-1 <= v <= 1 for v in values["ssim"])
    baseline = fidelity["methods"]["copy_last_frame"]
    assert baseline["psnr"][0] == PSNR_CAP and baseline["ssim"][0] == pytest.approx(1.0, abs=1e-6)
    assert max(baseline["psnr"][1:]) < PSNR_CAP  # the real frames change
    assert set(fidelity["at"]) == {"0.5s", "1s"} and fidelity["at"]["1s"]["frame"] == 18
    for entry in fidelity["at"].values():  # each clip's own score, kept for paired comparisons (4 decimals)
        for method in ("model", "copy_last_frame", "vae_reconstruction"):
            for name in ("psnr", "ssim"):
                clips = entry[method][f"{name}_clips"]
                assert len(clips) == 2 and sum(clips) / 2 == pytest.approx(entry[method][name], abs=1e-4)

    idm = report["idm"]
    for key in ("real_val", "real_clips", "vae_round_trip", "generated"):
        for name in ("keyboard", "keyboard_exact", "keyboard_balanced", "yaw_direction", "yaw_direction_balanced"):
            assert 0 <= idm[key][name] <= 1, (key, name)
    assert idm["real_clips"]["frames"] == idm["vae_round_trip"]["frames"] == idm["generated"]["frames"] == 2 * (21 - 3)
    assert idm["config"]["context"] == 4 and idm["config"]["before"] == 1  # windows of 4 frames, one before
    for key in ("real_clips", "vae_round_trip", "generated"):  # the splits cover the same windows
        assert sum(idm[key]["yaw_by_size"]["windows"]) == idm[key]["frames"]
        assert len(idm[key]["by_phase"]["yaw_direction"]) == 4
        for name in ("keyboard", "yaw_direction"):  # each clip's own accuracy: as many windows each
            per_clip = idm[key]["per_clip"][name]
            assert len(per_clip) == 2 and sum(per_clip) / 2 == pytest.approx(idm[key][name], abs=1e-4)
    assert (out / "idm" / "idm.safetensors").is_file()
    shares = idm["generated_share_of_round_trip"]
    assert set(shares) == {"keyboard", "yaw_direction"}
    expected = share_above_chance(idm["generated"], idm["vae_round_trip"])
    assert shares == expected  # (None where this tiny judge reads the round trip at chance)
    assert any(line.startswith("generated video reads, of what the VAE round trip") for line in summary_lines(report))
    readable = idm["readable_from_motion"]
    assert set(readable) == {"forward", "back", "left", "right", "mean"}
    assert readable["mean"]["chance"] <= readable["mean"]["readable"] <= 1

    drift = report["drift"]
    assert drift["frames"] == 21 and drift["worlds"] == 2
    for values in drift["statistics"].values():
        assert values["real_low"] <= values["real_high"] and 0 <= values["in_range_share"] <= 1
        assert (values["onset"] is None) == (values["final_in_range_share"] >= drift["in_range_needed"])
    line = next(text for text in summary_lines(report) if text.startswith("drift over"))
    assert ("no collapse" in line) == (not drift["collapsed"])
    for name in drift["collapsed_statistics"]:  # each named with how it left the real range
        assert f"{name}, {drift['statistics'][name]['onset']}" in line
    assert set(report["targets"]) == {"idm_keyboard_accuracy", "idm_yaw_direction_accuracy",
                                      "psnr_above_copy_last_frame_at_1s", "no_collapse"}  # fmt: skip
    assert all(target["passed"] in (True, False) for target in report["targets"].values())

    with Image.open(out / "eval.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 800

    # The trained IDM is reused with --idm; parts are skipped with --clips 0 and --drift-minutes 0.
    again = tmp_path / "again"
    status, errors = run_cli("eval", "--model", str(model), "--data", str(dataset), "--out", str(again), "--idm",
                             str(out / "idm"), "--val-fraction", VAL_FRACTION, "--clips", "0", "--drift-minutes", "0",
                             "--action-guidance", "2.5", "--device", "cpu", "--dtype", "bfloat16",
                             "--no-progress")  # fmt: skip
    assert status == 0, errors
    reused = json.loads((again / "eval.json").read_text())
    assert report["settings"]["dtype"] == "float32" and reused["settings"]["dtype"] == "bfloat16"
    assert set(reused) == {"settings", "idm", "targets", "timing_s"}
    assert reused["idm"]["real_val"] == idm["real_val"]
    assert report["settings"]["idm_steps"] == 20 and reused["settings"]["idm_steps"] is None  # trained elsewhere
    assert reused["targets"]["no_collapse"]["passed"] is None
    assert report["settings"]["action_guidance"] == 1.0 and reused["settings"]["action_guidance"] == 2.5


def test_eval_also_judge_reads_the_same_clips_beside_the_main_judge(dataset, model, tmp_path) -> None:
    config = IDMConfig(video_size=(16, 32), context=4, before=1, width=4)
    train = FrameWindows(dataset, "train", config.context, float(VAL_FRACTION))
    judge, _ = train_idm(train, config, TrainSettings(steps=5, batch_size=8), progress=False)
    save_idm(judge, tmp_path / "judge")
    out = tmp_path / "eval"
    status, errors = run_cli("eval", "--model", str(model), "--data", str(dataset), "--out", str(out), "--idm",
                             str(tmp_path / "judge"), "--also-judge", str(tmp_path / "judge"), "--val-fraction",
                             VAL_FRACTION, "--clips", "2", "--horizon-s", "1", "--drift-minutes", "0", "--device",
                             "cpu", "--no-progress")  # fmt: skip
    assert status == 0, errors
    report = json.loads((out / "eval.json").read_text())
    idm = report["idm"]
    assert report["settings"]["also_judge"] == [str(tmp_path / "judge")]
    [other] = idm["also"]
    generated = idm["generated"]
    assert other["source"] == idm["source"] and other["sha256"] == idm["sha256"]
    assert other["config"] == idm["config"] and other["config"]["context"] == 4
    assert other["real_val"] == idm["real_val"]
    for key in ("real_clips", "generated", "vae_round_trip"):  # the same judge on the same clips reads the same
        assert other[key] == {k: v for k, v in idm[key].items() if k not in ("by_phase", "yaw_by_size")}, key
    assert other["generated_share_of_round_trip"] == idm["generated_share_of_round_trip"]
    assert (
        other["generated_above_real"] == idm["generated_above_real"] == reads_above_real(generated, idm["real_clips"])
    )
    [summary] = [text for text in summary_lines({"idm": idm}) if text.startswith("also judged by")]
    assert f"generated keys {generated['keyboard']:.3f}, yaw {generated['yaw_direction']:.3f}" in summary

    out = tmp_path / "refused"
    status, errors = run_cli("eval", "--model", str(model), "--data", str(dataset), "--out", str(out), "--idm",
                             str(tmp_path / "judge"), "--also-judge", str(tmp_path), "--val-fraction", VAL_FRACTION,
                             "--clips", "0", "--drift-minutes", "0", "--device", "cpu", "--no-progress")  # fmt: skip
    assert status == 2 and f"cannot use the IDM at {tmp_path}: no inverse-dynamics model" in errors
    assert "Traceback" not in errors and not (out / "eval.json").exists()


def test_eval_action_guidance_below_one_is_a_clear_error(dataset, model, tmp_path) -> None:
    status, errors = run_cli("eval", "--model", str(model), "--data", str(dataset), "--out", str(tmp_path),
                             "--action-guidance", "0.5", "--device", "cpu", "--no-progress")  # fmt: skip
    assert status == 2 and "--action-guidance must be a finite number >= 1 (1: off), got 0.5" in errors
    assert "Traceback" not in errors


def test_eval_idm_windows_without_a_frame_after_the_labelled_one_are_a_clear_error(dataset, model, tmp_path) -> None:
    status, errors = run_cli("eval", "--model", str(model), "--data", str(dataset), "--out", str(tmp_path),
                             "--idm-context", "4", "--idm-before", "3", "--device", "cpu", "--no-progress")  # fmt: skip
    assert status == 2 and "--idm-before must be 0 to --idm-context - 2" in errors and "got 3" in errors
    assert "Traceback" not in errors


def test_eval_without_held_out_episodes_is_a_clear_error(dataset, model, tmp_path) -> None:
    status, errors = run_cli("eval", "--model", str(model), "--data", str(dataset), "--out", str(tmp_path),
                             "--val-fraction", "0.1", "--device", "cpu", "--no-progress")  # fmt: skip
    assert status == 2 and "no 'val' episodes" in errors and "record at least 10 episodes" in errors
    assert "Traceback" not in errors


def test_eval_of_a_model_at_another_frame_rate_is_a_clear_error(dataset, tmp_path_factory, tmp_path) -> None:
    other = tiny_model_folder(tmp_path_factory)  # 25 fps
    status, errors = run_cli("eval", "--model", str(other), "--data", str(dataset), "--out", str(tmp_path),
                             "--device", "cpu", "--no-progress")  # fmt: skip
    assert status == 2 and "17.5 fps but the model runs at 25 fps" in errors


def test_compare_returns_uses_two_standard_errors():
    from matrixgame_env.eval.returns import compare_returns, return_stats

    high, low = return_stats([10.0, 11.0, 9.0]), return_stats([0.0, 1.0, -1.0])
    assert high["mean_return"] == 10.0 and high["std_return"] == 1.0
    assert compare_returns(high, low, "CEM", "in the dream", "--episodes").startswith("CEM beats random in the dream")
    assert "does worse than random" in compare_returns(low, high, "CEM", "here", "--episodes")
    assert "within two standard errors" in compare_returns(high, return_stats([9.5, 10.5, 10.0]), "X", "here", "-n")
    assert "use -n 2 or more" in compare_returns(return_stats([1.0]), return_stats([0.0]), "X", "here", "-n")


def test_reconstruction_report_against_exact_values() -> None:
    real = torch.randint(20, 200, (2, 5, 16, 32, 3), dtype=torch.uint8)
    same = frames_report(real, real)
    assert same["psnr_db"] == math.inf and same["temporal_error"] == 0.0
    statistics = frame_statistics(real)
    assert same["sharpness"] == pytest.approx(float(statistics["sharpness"].double().mean()))
    brighter = frames_report(real + 10, real)  # the same changes over time, 10 grey levels off everywhere
    assert brighter["psnr_db"] == pytest.approx(10 * math.log10(255**2 / 100)) and brighter["temporal_error"] == 0.0
    frozen = frames_report(real[:, :1].expand_as(real).contiguous(), real)  # no motion at all
    changes = real[:, 1:].double() - real[:, :-1].double()
    assert frozen["temporal_error"] == pytest.approx(float(changes.abs().mean())) and frozen["motion"] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        frames_report(real[:, :4], real)


def test_reconstruction_report_of_a_model_on_a_recording(dataset, model) -> None:
    real = real_clips(str(dataset), clip_frames=9, count=3, split="val", val_fraction=float(VAL_FRACTION))
    assert real.dtype == torch.uint8 and real.shape[:2] == (3, 9) and real.shape[-1] == 3
    world = WorldModel.from_pretrained(model, device="cpu")
    report = reconstruction_report([("tiny", world)], real)
    assert set(report) == {"real", "tiny"} and report["real"]["temporal_error"] == 0.0
    assert 0 < report["tiny"]["psnr_db"] < 60 and report["tiny"]["temporal_error"] > 0
    with pytest.raises(ValueError, match="has no clips of 401 frames"):
        real_clips(str(dataset), clip_frames=401, count=3)


def test_reconstruction_report_judges_each_round_trip_with_an_idm(dataset, model) -> None:
    world = WorldModel.from_pretrained(model, device="cpu")
    windows = FrameWindows(dataset, "val", 9, float(VAL_FRACTION), stride=9)
    items = windows.stack(windows.evenly_spaced(2))
    real = resize_frames(items["frames"], world.video_size)
    torch.manual_seed(0)
    idm = InverseDynamicsModel(IDMConfig(video_size=world.video_size, width=8)).eval()
    report = reconstruction_report([("tiny", world)], real, (idm, items["keyboard"], items["mouse"]))
    with torch.no_grad():
        round_trip = reconstruct_clips(world, real)
    for name, frames in (("real", real), ("tiny", round_trip)):
        expected = evaluate_clips(idm, frames, items["keyboard"], items["mouse"])
        assert report[name]["idm_keys"] == expected["keyboard"]
        assert report[name]["idm_yaw"] == expected["yaw_direction"]
        assert report[name]["idm_by_phase"] == accuracy_by_phase(idm, frames, items["keyboard"], items["mouse"])
        assert report[name]["idm_yaw_by_size"] == judge_clips(idm, frames, items["keyboard"], items["mouse"])[2]
    assert "idm_keys" not in reconstruction_report([("tiny", world)], real)["tiny"]


def test_frames_alone_are_each_frames_own_round_trip_and_get_their_own_rows(dataset, model) -> None:
    world = WorldModel.from_pretrained(model, device="cpu")
    real = real_clips(str(dataset), clip_frames=9, count=2, split="val", val_fraction=float(VAL_FRACTION))
    real = resize_frames(real, world.video_size)
    with torch.no_grad():
        alone = reconstruct_frames_alone(world, real, batch_size=5)
        one_by_one = torch.stack(
            [
                torch.cat([reconstruct_clips(world, real[k : k + 1, t : t + 1]) for t in range(9)], dim=1)[0]
                for k in range(2)
            ]
        )
        whole = reconstruct_clips(world, real)
    assert alone.shape == real.shape and alone.dtype == torch.uint8
    assert (alone.int() - one_by_one.int()).abs().max() <= 1  # batching may round differently, nothing more
    assert torch.equal(alone[:, 0], whole[:, 0])  # a clip's first frame is encoded alone anyway
    assert not torch.equal(alone[:, 1:], whole[:, 1:])  # later frames lose the temporal packing
    report = reconstruction_report([("tiny", world)], real, frames_alone=True)
    assert list(report) == ["real", "tiny", "tiny (frames alone)"]
    assert report["tiny (frames alone)"] == frames_report(alone, real)


def _two_clips_and_an_untrained_idm(dataset, seed: int, **config):
    """Two 9-frame held-out clips (frames, keyboard, mouse) and a small untrained IDM seeded with `seed`."""
    windows = FrameWindows(dataset, "val", 9, float(VAL_FRACTION), stride=9)
    items = windows.stack(windows.evenly_spaced(2))
    torch.manual_seed(seed)
    idm = InverseDynamicsModel(IDMConfig(video_size=(16, 32), width=8, **config)).eval()
    return idm, items["frames"], items["keyboard"], items["mouse"]


def test_accuracy_by_phase_splits_the_clip_accuracy_by_the_labelled_frames_place_in_its_group(dataset) -> None:
    idm, frames, keyboard, mouse = _two_clips_and_an_untrained_idm(dataset, 1)
    phases = accuracy_by_phase(idm, frames, keyboard, mouse)
    whole = evaluate_clips(idm, frames, keyboard, mouse)
    # windows of 3 frames label frames 1..7 of each 9-frame clip: phases 1, 2, 3, 0, 1, 2, 3
    counts = [1, 2, 2, 2]
    for name in ("keyboard", "yaw_direction"):
        assert sum(c * v for c, v in zip(counts, phases[name])) / 7 == pytest.approx(whole[name], abs=1e-12)
    # phase 0 holds only the window labelling frame 4: its accuracy is that window's alone
    f, k, m = clip_windows(frames, keyboard, mouse, 3)
    only = [3, 10]  # the window labelling frame 4 in each of the two clips
    alone = evaluate_windows(idm, f[only], k[only], m[only])
    assert phases["yaw_direction"][0] == pytest.approx(alone["yaw_direction"], abs=1e-12)
    with pytest.raises(ValueError, match="fewer than 4 windows"):
        accuracy_by_phase(idm, frames[:, :5], keyboard[:, :5], mouse[:, :5])


def test_judged_clips_keep_each_clips_own_accuracy(dataset) -> None:
    idm, frames, keyboard, mouse = _two_clips_and_an_untrained_idm(dataset, 3)
    judged = judge_clips(idm, frames, keyboard, mouse)[0]
    for clip in range(2):
        alone = evaluate_clips(idm, frames[clip : clip + 1], keyboard[clip : clip + 1], mouse[clip : clip + 1])
        for name in ("keyboard", "yaw_direction"):
            assert judged["per_clip"][name][clip] == pytest.approx(alone[name], abs=5e-5)


def test_yaw_accuracy_by_size_splits_the_windows_by_the_labelled_yaw(dataset) -> None:
    idm, frames, keyboard, mouse = _two_clips_and_an_untrained_idm(dataset, 2, yaw_dead_zone=0.02)
    mouse = mouse.clone()
    sizes = torch.tensor([0.0, 0.004, -0.01, 0.011, -0.02, 0.05, 0.051, -0.3, 0.03])  # one per frame
    mouse[..., 1] = sizes
    judged, _, by_size = judge_clips(idm, frames, keyboard, mouse)
    assert by_size["bands"] == [[0.0, 0.01], [0.01, 0.05], [0.05, None]]
    # frames 1..7 are labelled: |yaw| 0.004, 0.01 -> band 0; 0.011, 0.02, 0.05 -> band 1; 0.051, 0.3 -> band 2
    assert by_size["windows"] == [4, 6, 4]
    f, k, m = clip_windows(frames, keyboard, mouse, 3)
    labelled = m[:, 1, 1].abs()
    for band, (low, high) in enumerate([(0.0, 0.01), (0.01, 0.05), (0.05, 1.0)]):
        chosen = torch.nonzero(((labelled > low) | (low == 0)) & (labelled <= high)).flatten().tolist()
        alone = evaluate_windows(idm, f[chosen], k[chosen], m[chosen])
        assert by_size["yaw_direction"][band] == pytest.approx(alone["yaw_direction"], abs=1e-12)
    total = sum(n * v for n, v in zip(by_size["windows"], by_size["yaw_direction"])) / 14
    assert total == pytest.approx(judged["yaw_direction"], abs=1e-12)
    mouse[..., 1] = 0.0  # every window still: the other bands are empty, not zero
    assert judge_clips(idm, frames, keyboard, mouse)[2]["yaw_direction"][1:] == [None, None]


# ------------------------------------------------------------------------------------- key readability


def test_displacement_in_view_follows_dooms_angles() -> None:
    names = ["POSITION_X", "POSITION_Y", "ANGLE"]
    # Facing north (90 degrees): +y is forward, +x is to the right; facing east: +x forward, -y right.
    north = np.array([[0.0, 0.0, 90.0], [0.0, 5.0, 90.0], [3.0, 5.0, 90.0]])
    np.testing.assert_allclose(displacement_in_view(north, names), [[5.0, 0.0], [0.0, 3.0]], atol=1e-12)
    east = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    np.testing.assert_allclose(displacement_in_view(east, names), [[0.0, 2.0], [-2.0, 0.0]], atol=1e-12)
    diagonal = np.array([[0.0, 0.0, 45.0], [1.0, 1.0, 45.0]])
    np.testing.assert_allclose(displacement_in_view(diagonal, names), [[math.sqrt(2), 0.0]], atol=1e-12)
    with pytest.raises(ValueError, match=r"missing \['ANGLE'\]"):
        displacement_in_view(north[:, :2], names[:2])


def test_best_threshold_accuracy_matches_brute_force() -> None:
    generator = np.random.default_rng(0)
    motion = generator.integers(-5, 6, 300).astype(float)  # many ties
    pressed = generator.random(300) < 1 / (1 + np.exp(-motion))
    accuracy, threshold = best_threshold_accuracy(motion, pressed)
    candidates = np.concatenate([[motion.min() - 1], np.unique(motion)])
    brute = max(np.mean((motion > t) == pressed) for t in candidates)
    assert accuracy == pytest.approx(brute) and np.mean((motion > threshold) == pressed) == pytest.approx(accuracy)
    assert best_threshold_accuracy(np.array([1.0, 2.0, 3.0]), np.array([False, True, True])) == (1.0, 1.5)
    assert best_threshold_accuracy(np.array([1.0, 2.0]), np.array([True, True]))[0] == 1.0  # always held
    with pytest.raises(ValueError, match="1-D and of one non-zero length"):
        best_threshold_accuracy(np.zeros(3), np.zeros(2, dtype=bool))


def test_key_readability_of_a_real_recording(dataset) -> None:
    with pytest.raises(ValueError, match="no chunks of the episodes"):
        key_readability(dataset, episodes={999})
    one_episode = key_readability(dataset, episodes={0})
    assert one_episode != key_readability(dataset, episodes={1})
    report = key_readability(dataset)
    assert set(report) == {"forward", "back", "left", "right", "mean"}
    for key in ("forward", "back", "left", "right"):
        row = report[key]
        assert row["chance"] == pytest.approx(max(row["held_share"], 1 - row["held_share"]))
        assert row["chance"] <= row["readable"] <= 1.0  # the rule can always answer the majority
    # The exploration policy walks forward most of the time, and walking moves the player forward.
    assert report["forward"]["held_share"] > 0.3 and report["forward"]["readable"] > report["forward"]["chance"]


def test_generated_video_that_reads_better_than_the_real_frames_is_named() -> None:
    """Above the real frames' reading by more than the margin, a measure is named, and the summary says
    that this is exaggeration or a judge's cues rather than fidelity; at or below it, nothing is said."""
    real = {"keyboard": 0.90, "yaw_direction": 0.897}
    assert reads_above_real({"keyboard": 0.974, "yaw_direction": 0.997}, real) == ["keyboard", "yaw_direction"]
    assert reads_above_real({"keyboard": 0.85, "yaw_direction": 0.903}, real) == []  # within 0.01 of the real
    assert reads_above_real({"keyboard": 0.92, "yaw_direction": 0.80}, real) == ["keyboard"]
    lines = summary_lines({"idm": {"generated_above_real": ["keyboard"]}})
    assert any(
        line.startswith("note: the generated video reads better than the real frames in keyboard") for line in lines
    )
    assert not any(
        "better than the real frames" in line for line in summary_lines({"idm": {"generated_above_real": []}})
    )
