"""`scripts/device_next_model.sh adapt` with MG_ADAPT_FROM: what it takes in before any training starts."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_next_model.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _adapt(work: Path, carried: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MG_WORK": str(work), "MG_ADAPT_FROM": str(carried), "OUT": str(work / "out")}
    return subprocess.run(["bash", str(SCRIPT), "adapt"], env=env, capture_output=True, text=True, timeout=60)


def test_a_carried_folder_without_a_decoder_is_named_before_anything_runs(tmp_path):
    (tmp_path / "work" / "next").mkdir(parents=True)
    (tmp_path / "work" / "next" / "config.json").write_text("{}")
    carried = tmp_path / "model"
    carried.mkdir()
    (carried / "config.json").write_text("{}")
    (carried / "dit.safetensors").write_bytes(b"weights")
    done = _adapt(tmp_path / "work", carried)
    assert done.returncode == 2
    assert f"{carried}/vae.safetensors is missing" in done.stderr
    assert not (tmp_path / "work" / "runs").exists(), "nothing may be copied from an incomplete folder"


def test_adapt_without_the_next_model_asks_for_setup_first(tmp_path):
    done = _adapt(tmp_path / "work", ROOT / "models" / "doom-small")
    assert done.returncode == 2
    assert "setup next record" in done.stderr
