"""scripts/compare_decoders.py end to end on a tiny recording: rows, judge splits and the JSON it writes."""

from __future__ import annotations

import json

import pytest
import torch
from script_module import load_script
from tiny_training import VAL_FRACTION, VIDEO_SIZE, tiny_dataset, tiny_model_folder

from matrixgame_env.eval.idm import IDMConfig, InverseDynamicsModel, save_idm


@pytest.fixture(scope="module")
def compare_script():
    return load_script("compare_decoders")


def test_compare_with_a_judge_and_frames_alone_writes_every_row(compare_script, tmp_path_factory, tmp_path, capsys):
    dataset, model = tiny_dataset(tmp_path_factory), tiny_model_folder(tmp_path_factory)
    torch.manual_seed(0)
    idm = save_idm(InverseDynamicsModel(IDMConfig(video_size=VIDEO_SIZE, width=8)), tmp_path / "idm")
    out = tmp_path / "compare.json"
    argv = [str(model), "--data", str(dataset), "--clips", "2", "--frames", "9", "--val-fraction", VAL_FRACTION,
            "--idm", str(idm), "--frames-alone", "--out", str(out)]  # fmt: skip
    assert compare_script.main(argv) == 0
    report = json.loads(out.read_text())["report"]
    assert list(report) == ["real", str(model), f"{model} (frames alone)"]
    assert report["real"]["psnr_db"] is None  # infinite against itself: null in JSON
    for row in report.values():
        assert 0 <= row["idm_keys"] <= 1 and 0 <= row["idm_yaw"] <= 1
        assert sum(row["idm_yaw_by_size"]["windows"]) == 2 * (9 - 2)
        assert len(row["idm_by_phase"]["yaw_direction"]) == 4
    printed = capsys.readouterr().out
    assert f"{model} (frames alone)" in printed and "yaw by size: |yaw| 0-0.01:" in printed
