"""`scripts/device_pending_checks.sh`: its check names and inputs refused before anything is installed or run."""

import json
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
    environment.update({"OUT": str(tmp_path / "out"), "PATH": os.environ["PATH"], **env})
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


FAKE_BENCH = """import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
json.dump({"argv": sys.argv[1:], "tree": os.getcwd()}, open(os.path.join(out, "env.json"), "w"))
print("WARN: noise the logs drop")
print("gpu vector (stand-in)", " ".join(sys.argv[1:]))
"""


def _stand_ins(tree: Path) -> None:
    """A tree whose bench_env.py and profile_vector_host.py record how they were called, and a GPU query."""
    (tree / "benchmarks").mkdir(parents=True)
    (tree / "benchmarks" / "bench_env.py").write_text(FAKE_BENCH)
    (tree / "benchmarks" / "profile_vector_host.py").write_text("print('host phases')\n")
    (tree / "bin").mkdir()
    (tree / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'stand-in GPU'\n")
    (tree / "bin" / "nvidia-smi").chmod(0o755)


def test_warmup_alternates_4_and_8_steps_and_gathers_one_log(tmp_path):
    _stand_ins(tmp_path)
    path = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    (tmp_path / "out").mkdir()
    done = _checks(tmp_path, "warmup", PATH=path)
    assert done.returncode == 0, done.stderr
    runs = {p.name: json.loads(p.read_text())["argv"] for p in (tmp_path / "out").glob("warmup_*_env.json")}
    warmups = {name: argv[argv.index("--warmup") + 1] for name, argv in runs.items()}
    assert warmups == {"warmup_w4_a_env.json": "4", "warmup_w8_a_env.json": "8", "warmup_w8_b_env.json": "8",
                       "warmup_w4_b_env.json": "4"}  # fmt: skip
    assert all(argv[:6] == ["--cpu-steps", "0", "--gpu-worlds", "64", "--paths", "graphs"] for argv in runs.values())
    log = (tmp_path / "out" / "warmup.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("==")] == ["== w4_a", "== w8_a", "== w8_b", "== w4_b"]
    assert "WARN" not in log and log.count("gpu vector (stand-in)") == 4
    assert [line.split(":")[0] for line in done.stdout.splitlines() if ": rc " in line] == [
        "w4_a",
        "w8_a",
        "w8_b",
        "w4_b",
    ]


def test_sides_runs_the_older_tree_and_this_one_alternating(tmp_path):
    _stand_ins(tmp_path)
    (tmp_path / "base" / "matrixgame_env").mkdir(parents=True)
    path = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    (tmp_path / "out").mkdir()
    done = _checks(tmp_path, "sides", PATH=path, MG_BASE_TREE=str(tmp_path / "base"))
    assert done.returncode == 0, done.stderr
    runs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("sides_*_env.json")}
    trees = {name: run["tree"] for name, run in runs.items()}
    # every tree warmed 8 steps at least (with 4, a CUDA graph capture fell inside the timed steps)
    assert {run["argv"][run["argv"].index("--warmup") + 1] for run in runs.values()} == {"8"}
    base, this = "/tmp/base_tree", str(tmp_path)
    assert trees == {"sides_base_a_env.json": base, "sides_this_a_env.json": this, "sides_this_b_env.json": this,
                     "sides_base_b_env.json": base}  # fmt: skip
    log = (tmp_path / "out" / "sides.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("==")] == [
        "== base_a",
        "== this_a",
        "== this_b",
        "== base_b",
    ]
    assert "host phases" in (tmp_path / "out" / "host_phases.log").read_text()
