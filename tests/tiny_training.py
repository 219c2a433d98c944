"""A tiny real recording and a shrunk model config for fast training-stage tests."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from tiny_model import tiny_model_config, write_tiny_model

from matrixgame_env.cli import main
from matrixgame_env.model_config import ModelConfig

CHUNK_FRAMES = 40
EPISODES = 4  # val_fraction 0.5 holds out episodes 1 and 3
VAL_FRACTION = "0.5"
VIDEO_SIZE = (16, 32)
LATENT_FRAMES = 3  # encoded clips of 9 video frames
STRIDE = 8
_made: dict[str, Path] = {}  # what the session has made so far, shared by all test modules


def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 one-chunk episodes of 40 frames at 16x32, recorded once per test session with the real recorder."""
    pytest.importorskip("vizdoom")
    if "dataset" not in _made:
        from matrixgame_env.data import record

        root = tmp_path_factory.mktemp("tiny_recording") / "dataset"
        minutes = EPISODES * CHUNK_FRAMES / 17.5 / 60
        record(root, minutes, workers=1, seed=3, size=VIDEO_SIZE, chunk_frames=CHUNK_FRAMES, chunks_per_episode=1,
               progress=False)  # fmt: skip
        _made["dataset"] = root
    return _made["dataset"]


def tiny_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 16x32 model folder (tests/tiny_model.py), made once per session."""
    if "model" not in _made:
        _made["model"] = write_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")
    return _made["model"]


def encode(dataset: Path, model: Path, out: Path, *options: str) -> None:
    """`train encode` into OUT/encode: clips of 3 latent frames every 8 video frames, 4 clips per shard."""
    train("encode", "--data", str(dataset), "--init", str(model), "--out", str(out), "--latent-frames",
          str(LATENT_FRAMES), "--stride", str(STRIDE), "--val-fraction", VAL_FRACTION, "--shard-clips", "4",
          "--batch-size", "3", *options)  # fmt: skip


def tiny_latents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset encoded by the tiny model (OUT/encode), made once per session."""
    if "latents" not in _made:
        out = tmp_path_factory.mktemp("tiny_latents")
        encode(tiny_dataset(tmp_path_factory), tiny_model_folder(tmp_path_factory), out)
        _made["latents"] = out / "encode"
    return _made["latents"]


# `train vae` options for quick runs on the tiny dataset: clips of 9 frames, half the episodes held out.
VAE_CLIPS = ("--clip-frames", "9", "--val-fraction", VAL_FRACTION, "--batch-size", "2", "--warmup-steps", "2")


def tiny_trained_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder whose VAE (width 4) trained 4 steps on the tiny dataset, the start of decoder-only
    runs; made once per session."""
    if "vae" not in _made:
        out = tmp_path_factory.mktemp("tiny_vae")
        config = tiny_training_config(tmp_path_factory.mktemp("tiny_vae_config"))
        train("vae", "--data", str(tiny_dataset(tmp_path_factory)), "--model-config", str(config), "--out", str(out),
              "--steps", "4", "--stats-clips", "4", "--val-clips", "2", *VAE_CLIPS)  # fmt: skip
        _made["vae"] = out / "vae" / "model"
    return _made["vae"]


def tiny_training_config(folder: Path) -> Path:
    """config.json of a 16x32 model with a VAE of width 4 and a DiT of width 32; returns its path."""
    config: ModelConfig = tiny_model_config()
    config.name = "tiny-training"
    config.fps = 17.5
    config.vae = {"dim": 4, "z_dim": 16, "num_res_blocks": 1}
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder / "config.json")
    return folder / "config.json"


def run_cli(*argv: str) -> tuple[int, str]:
    """(exit status, stderr) of `matrixgame-env argv...` run in this process."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        status = main(list(argv))
    return status, errors.getvalue()


def train(stage: str, *options: str) -> None:
    """Run `matrixgame-env train STAGE` on the CPU without progress bars; fails the test on an error."""
    status, errors = run_cli("train", stage, "--device", "cpu", "--workers", "0", "--no-progress", *options)
    assert status == 0, errors
