"""Shared test setup: where the reference data lives; fixture reading comes from the package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from matrixgame_env import reference
from matrixgame_env.nn import fusion, triton_dit
from matrixgame_env.reference import Fixture, max_relative_error, subsample_strides  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("MATRIXGAME_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))
FIXTURE_DIR = Path(os.environ.get("MATRIXGAME_FIXTURES", REFERENCE_DIR / "fixtures"))
MANIFEST_DIR = REFERENCE_DIR / "manifests"
CONFIG_DIR = REFERENCE_DIR / "configs"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _restore_process_wide_kernel_switches():
    """Tests that switch the DiT's Triton chains on for the whole process (`triton_dit.set_enabled`),
    or envs with "compile" the compiled chains, leave the switches as they found them."""
    dit_kernels, compiled = triton_dit.enabled(), fusion.fusion_enabled()
    yield
    triton_dit.set_enabled(dit_kernels)
    fusion.enable_fusion(compiled)


def load_fixture(name: str) -> Fixture:
    """A fixture of the set under test; fails (never skips) when the set is missing."""
    try:
        return reference.load_fixture(name, FIXTURE_DIR)
    except FileNotFoundError as error:
        pytest.fail(str(error))
