"""scripts/judge_transfer_pilot.py on a tiny model: what a judge's gradient does to generated clips, read by
another judge, and `device_judged_student.sh`'s refusals before any work and what its calls bring back."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from script_module import load_script
from tiny_clips import write_latent_dataset
from tiny_model import tiny_model_config, write_tiny_model

from matrixgame_env.eval.idm import IDMConfig, InverseDynamicsModel, save_idm

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tiny_model_config()


def _idm(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_idm(InverseDynamicsModel(IDMConfig(video_size=CONFIG.video_size, width=8)), folder)


@pytest.mark.parametrize("floor", [False, True])
def test_the_pilot_reports_both_judges_and_the_frames_distance_at_half_and_all_steps(tmp_path, monkeypatch, floor):
    model = write_tiny_model(tmp_path / "model")
    data = write_latent_dataset(tmp_path / "encode", CONFIG, {"train": 6, "val": 1}, frames=6)
    out = tmp_path / "report.json"
    judges = ["--judge", str(_idm(tmp_path / "judge", 1)), "--idm", str(_idm(tmp_path / "idm", 2))]
    steps = ["--clips", "3", "--steps", "4", "--lr", "0.1", "--threads", "1", *(["--floor"] if floor else [])]
    argv = ["judge_transfer_pilot.py", "--data", str(data), "--out", str(out), "--model", str(model), *judges, *steps]
    monkeypatch.setattr(sys, "argv", argv)
    load_script("judge_transfer_pilot").main()
    report = json.loads(out.read_text())
    assert report["settings"]["clips_picked"] == [0, 2, 5] and report["settings"]["floor"] is floor
    assert sorted(report["optimised"]) == ["2", "4"] and len(report["judge_loss"]) == 4
    for reading in (report["round_trip"], report["generated"], *report["optimised"].values()):
        for judge in ("scoring_idm", "training_judge"):
            assert 0 <= reading[judge]["keys"] <= 1 and len(reading[judge]["keys_by_phase"]) == 4
    last = report["optimised"]["4"]
    assert last["latent_change_rms"] > report["optimised"]["2"]["latent_change_rms"] > 0
    assert last["psnr_to_start_db"] < report["optimised"]["2"]["psnr_to_start_db"]
    if not floor:  # the optimised loss itself goes down
        assert report["judge_loss"][-1] < report["judge_loss"][0]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "call, env, message",
    [
        ("train", {}, "run the prepare call first"),
        ("eval", {}, "no variant has a model: run the train call first"),
        ("both", {"MG_VARIANTS": "other"}, "run the prepare call first"),
        ("nothing", {}, "unknown call nothing (prepare, train, eval or both)"),
    ],
)
def test_the_device_script_says_what_is_missing_before_any_work(tmp_path, call, env, message):
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_judged_student.sh"), call],
        env={**os.environ, "MG_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"), **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "work" / "teacher").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("variant", ["judge", "floorx", "judge1 other"])
def test_the_device_script_names_an_unknown_variant_before_anything_starts(tmp_path, variant):
    (tmp_path / "work" / "runs" / "encode").mkdir(parents=True)
    (tmp_path / "work" / "teacher").mkdir()  # as if an earlier call had built it
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_judged_student.sh"), "train"],
        env={**os.environ, "MG_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"), "MG_VARIANTS": variant},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and f"unknown variant {variant.split()[-1]} (control, judgeW or floorW)" in done.stderr
    assert not (tmp_path / "work" / "report").exists(), "nothing may start before every name is checked"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_device_script_brings_back_the_logs_of_a_call_with_no_time_left_to_evaluate(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    for variant in ("control", "judge1"):
        (work / f"cont_{variant}" / "distill" / "model").mkdir(parents=True)
    (work / "report").mkdir()
    (work / "report" / "train_judge1.txt").write_text("distill model at step 40 written\n")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_judged_student.sh"), "eval"],
        env={**os.environ, "MG_WORK": str(work), "OUT": str(out), "MG_VARIANTS": "control judge1",
             "MG_CALL_SECONDS": "20", "MG_PACK_SECONDS": "30"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "no time left in this call to evaluate: call eval again" in done.stderr
    with tarfile.open(out / "logs.tar") as shipped:
        assert shipped.extractfile("report/train_judge1.txt").read() == b"distill model at step 40 written\n"
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar"], "only the finished archive, no partial one"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_device_script_packs_the_models_a_train_call_leaves_even_when_this_call_trained_nothing(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "runs" / "encode").mkdir(parents=True)
    (work / "teacher").mkdir()
    weights = {"control": torch.linspace(-1, 1, 12).reshape(3, 4), "judge1": torch.arange(6.0).reshape(2, 3) / 7}
    for variant, weight in weights.items():  # models an earlier call trained
        model = work / f"cont_{variant}" / "distill" / "model"
        model.mkdir(parents=True)
        save_file({"blocks.0.weight": weight, "step": torch.tensor([3])}, model / "dit.safetensors")
    (work / "report").mkdir()
    (work / "report" / "control_eval.json").write_text('{"scored": "the model before this call"}')
    done = subprocess.run(  # this call's distillations fail at once: no shipped model, and no time
        ["bash", str(ROOT / "scripts" / "device_judged_student.sh"), "train"],
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
             "MG_WORK": str(work), "OUT": str(out), "MG_VARIANTS": "control judge1", "MG_CALL_SECONDS": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "a variant failed" in done.stdout, done.stdout + done.stderr
    assert "packing the variants that finished" in done.stdout
    with tarfile.open(out / "logs.tar") as shipped:
        assert {"report/train_control.txt", "report/train_judge1.txt"} <= set(shipped.getnames())
        assert "report/control_eval.json" not in shipped.getnames(), "a report of the model before this call"
        assert b"before this call" in shipped.extractfile("report/earlier/control_eval.json").read()
    pieces = sorted(out.glob("judged.tar.part*"))
    assert pieces and sorted(p.name for p in out.iterdir()) == sorted(["logs.tar", *(p.name for p in pieces)])
    (tmp_path / "joined.tar").write_bytes(b"".join(p.read_bytes() for p in pieces))
    with tarfile.open(tmp_path / "joined.tar") as packed:
        packed.extractall(tmp_path / "back", filter="data")
    for variant, weight in weights.items():  # the judged variant first, the control's too (its report was set aside)
        back = load_file(tmp_path / "back" / "judged" / f"{variant}_dit.safetensors")
        assert back["blocks.0.weight"].dtype == torch.bfloat16 and torch.equal(back["step"], torch.tensor([3]))
        assert torch.equal(back["blocks.0.weight"], weight.bfloat16())
