"""scripts/pack_model.py: model folders into bfloat16 pieces that fit the device's $OUT, and back."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file
from script_module import SCRIPTS, load_script

from matrixgame_env.weights import save_safetensors


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "blocks.0.weight": torch.randn(64, 32, generator=generator),  # 4 KiB in bfloat16: several pieces
        "blocks.0.bias": torch.randn(64, generator=generator).double(),
        "steps": torch.arange(5),  # not floating point: kept as it is
    }


def test_a_packed_folder_unpacks_to_its_bfloat16_weights_and_its_other_files(tmp_path):
    script = load_script("pack_model")
    folder = tmp_path / "model"
    folder.mkdir()
    weights = _weights()
    save_safetensors(weights, folder / "dit.safetensors")
    (folder / "config.json").write_text('{"name": "tiny"}')
    script.pack(folder, tmp_path / "pieces", piece_bytes=1000)
    assert len(list((tmp_path / "pieces").glob("dit.safetensors.part*"))) > 2
    script.unpack(tmp_path / "pieces", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "dit.safetensors"))
    assert back.keys() == weights.keys()
    for name, value in weights.items():
        expected = value.bfloat16() if value.is_floating_point() else value
        assert back[name].dtype == expected.dtype and torch.equal(back[name], expected)
    assert (tmp_path / "back" / "config.json").read_text() == '{"name": "tiny"}'


def test_cast_writes_one_bfloat16_file_equal_to_the_packed_one(tmp_path):
    save_safetensors(_weights(), tmp_path / "dit.safetensors")
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "pack_model.py"), "--cast", str(tmp_path / "dit.safetensors"),
         str(tmp_path / "cast.safetensors")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    script = load_script("pack_model")
    script.pack(tmp_path, tmp_path / "pieces", piece_bytes=1 << 20)
    script.unpack(tmp_path / "pieces", tmp_path / "back")
    assert (tmp_path / "cast.safetensors").read_bytes() == (tmp_path / "back" / "dit.safetensors").read_bytes()
