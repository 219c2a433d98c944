"""`train vae --reference-weight`: the L1 (pixels and edges) to the starting VAE's frames (its decoding of the same
latents with --decoder-only, its round trip of the same clips otherwise), and its record."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_training import VAE_CLIPS, run_cli, tiny_dataset, tiny_trained_vae, train

from matrixgame_env.checkpoints import load_model
from matrixgame_env.train.vae import decoder_losses, vae_losses


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    """A trained tiny model folder (4 VAE steps) for decoder-only runs."""
    return tiny_trained_vae(tmp_path_factory)


def _clip(start: Path) -> torch.Tensor:
    torch.manual_seed(0)
    height, width = load_model(start, device="cpu").config.video_size
    return torch.rand(1, 3, 9, height, width) * 2 - 1


def _reference_term(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """L1 plus the L1 of horizontal and vertical differences, in float64."""
    mine, theirs = mine.double(), theirs.double()
    edges = sum((mine.diff(dim=d) - theirs.diff(dim=d)).abs().mean() for d in (-1, -2))
    return (mine - theirs).abs().mean() + edges


def test_the_reference_term_against_float64_and_zero_at_the_start(start) -> None:
    vae = load_model(start, device="cpu").vae.float()
    reference = copy.deepcopy(vae).requires_grad_(False)
    video = _clip(start)
    same = decoder_losses(vae, video, reference=reference, reference_weight=2.0)
    plain = decoder_losses(vae, video)
    assert same["reference"].item() == 0.0  # the starting decoder is where the term begins: nothing to pay
    assert torch.allclose(same["loss"], plain["loss"])
    with torch.no_grad():
        for parameter in vae.decoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    moved = decoder_losses(vae, video, reference=reference, reference_weight=2.0)
    plain = decoder_losses(vae, video)
    with torch.no_grad():
        mu, _ = vae.encode_distribution(video)
        expected = _reference_term(vae.decode_unnormalised(mu), reference.decode_unnormalised(mu))
    assert moved["reference"].item() > 0
    assert math.isclose(moved["reference"].item(), expected.item(), rel_tol=1e-5)
    assert math.isclose(moved["loss"].item(), plain["loss"].item() + 2.0 * expected.item(), rel_tol=1e-5)
    moved["loss"].backward()
    assert all(p.grad is None for p in reference.parameters())  # the reference stays as it was


def test_the_whole_vaes_reference_term_is_the_starting_round_trip(start) -> None:
    vae = load_model(start, device="cpu").vae.float()
    reference = copy.deepcopy(vae).requires_grad_(False)
    video = _clip(start)
    same = vae_losses(vae, video, 1e-5, sample=False, reference=reference, reference_weight=3.0)
    assert same["reference"].item() == 0.0
    assert torch.allclose(same["loss"], vae_losses(vae, video, 1e-5, sample=False)["loss"])
    with torch.no_grad():  # the encoder moves: the reference still decodes its own latents
        for parameter in vae.encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    moved = vae_losses(vae, video, 1e-5, sample=False, reference=reference, reference_weight=3.0)
    plain = vae_losses(vae, video, 1e-5, sample=False)
    with torch.no_grad():
        expected = _reference_term(
            vae.decode_unnormalised(vae.encode_distribution(video)[0]),
            reference.decode_unnormalised(reference.encode_distribution(video)[0]),
        )
    assert moved["reference"].item() > 0
    assert math.isclose(moved["reference"].item(), expected.item(), rel_tol=1e-5)
    assert math.isclose(moved["loss"].item(), plain["loss"].item() + 3.0 * expected.item(), rel_tol=1e-5)
    moved["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters())
    assert all(p.grad is None for p in reference.parameters())


def test_whole_vae_training_with_a_reference_is_logged_and_recorded(dataset, start, tmp_path) -> None:
    out = tmp_path / "run"
    train("vae", "--data", str(dataset), "--init", str(start), "--out", str(out), "--steps", "3",
          "--reference-weight", "2", "--val-clips", "2", "--stats-clips", "2", "--log-every", "1",
          *VAE_CLIPS)  # fmt: skip
    logged = [json.loads(line) for line in (out / "vae" / "log.jsonl").read_text().splitlines()]
    held = [line["reference"] for line in logged if "reference" in line]
    assert len(held) == 3 and all(math.isfinite(v) and v > 0 for v in held)  # sampled latents: never exactly 0
    record = load_model(out / "vae" / "model", device="cpu").config.extra["training"]["vae"]
    assert record["reference_weight"] == 2.0 and record["steps"] == 3 and "continued_from" in record


def test_decoder_training_with_a_reference_is_logged_and_recorded(dataset, start, tmp_path) -> None:
    out = tmp_path / "run"
    train("vae", "--data", str(dataset), "--init", str(start), "--out", str(out), "--steps", "3", "--decoder-only",
          "--reference-weight", "2", "--val-clips", "2", "--log-every", "1", *VAE_CLIPS)  # fmt: skip
    logged = [json.loads(line) for line in (out / "vae" / "log.jsonl").read_text().splitlines()]
    held = [line["reference"] for line in logged if "reference" in line]
    assert len(held) == 3 and held[0] == 0.0 and all(math.isfinite(v) and v >= 0 for v in held)
    assert held[-1] > 0  # the decoder moved away from its start, and the term saw it
    record = load_model(out / "vae" / "model", device="cpu").config.extra["training"]["vae"]["decoder_only"]
    assert record["reference_weight"] == 2.0


@pytest.mark.parametrize(
    "options, message",
    [
        (["--reference-weight", "1"], "--reference-weight needs --init"),
        (
            ["--init", "START", "--decoder-only", "--reference-weight", "nan"],
            "--reference-weight must be a number >= 0",
        ),
        (["--init", "START", "--reference-weight", "-1"], "--reference-weight must be a number >= 0, got -1"),
    ],
)
def test_bad_reference_options_are_refused(dataset, start, tmp_path, options, message) -> None:
    options = [str(start) if option == "START" else option for option in options]
    status, errors = run_cli("train", "vae", "--data", str(dataset), "--out", str(tmp_path), "--device", "cpu",
                             "--no-progress", *options, *VAE_CLIPS)  # fmt: skip
    assert status == 2 and message in errors
