"""`scripts/device_pending_checks.sh`: its check names and inputs refused before anything is installed or run."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_pending_checks.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _checks(tmp_path: Path, *names: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MG_BASE_TREE"}
    environment.update(OUT=str(tmp_path / "out"), PATH=os.environ["PATH"], **env)
    return subprocess.run(["bash", str(SCRIPT), *names], env=environment, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip


@pytest.mark.parametrize("base", [None, "empty"])
def test_sides_without_an_older_tree_is_refused_first(tmp_path, base):
    env = {}
    if base is not None:
        (tmp_path / base).mkdir()
        env["MG_BASE_TREE"] = str(tmp_path / base)
    done = _checks(tmp_path, "tests", "sides", **env)
    assert done.returncode == 2
    refusal = done.stderr.strip().splitlines()
    assert len(refusal) == 1, f"nothing may run before the refusal: {done.stderr}"
    assert refusal[0].startswith("sides: MG_BASE_TREE must name a folder that holds an older matrixgame_env/")
    assert done.stdout == ""


def test_an_unknown_check_is_named_with_the_known_ones(tmp_path):
    done = _checks(tmp_path, "tests", "speed")
    assert done.returncode == 2
    known = "tests, interp, stream, batch1, env, latent, small, desync, sides, warmup or cold"
    assert done.stderr.strip() == f"unknown check speed ({known})", "nothing may run before the refusal"
    assert done.stdout == ""
