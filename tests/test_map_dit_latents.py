"""scripts/map_dit_latents.py: a DiT carried over to another VAE's latents, on the tiny model and recording."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from script_module import load_script
from tiny_training import tiny_dataset, tiny_model_folder

from matrixgame_env.checkpoints import load_model
from matrixgame_env.model_config import ModelConfig
from matrixgame_env.nn.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD
from matrixgame_env.weights import read_state_dict, save_safetensors

PERMUTATION = [(c + 5) % 16 for c in range(16)]  # new channel c holds old channel PERMUTATION[c]


def _permuted_vae(model: Path, folder: Path) -> Path:
    """The model's VAE with its 16 latent channels reordered: the same pictures, other latents."""
    folder.mkdir()
    config = ModelConfig.load(model)
    for key, default in (("latent_mean", WAN21_LATENT_MEAN), ("latent_std", WAN21_LATENT_STD)):
        values = list(config.vae.get(key, default))
        config.vae[key] = [values[p] for p in PERMUTATION]
    config.save(folder / "config.json")
    state = read_state_dict(model / "vae.safetensors")
    rows = torch.tensor(PERMUTATION + [16 + p for p in PERMUTATION])  # mean | log-variance rows
    state["conv1.weight"], state["conv1.bias"] = state["conv1.weight"][rows], state["conv1.bias"][rows]
    state["conv2.weight"] = state["conv2.weight"][:, PERMUTATION]
    save_safetensors(state, folder / "vae.safetensors")
    return folder


def test_a_dit_carried_over_to_reordered_latents_scores_as_on_its_own(tmp_path_factory, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_folder(tmp_path_factory), model)
    config = ModelConfig.load(model)
    config.extra.setdefault("training", {})["dit"] = {"steps": 3}
    config.save(model / "config.json")
    vae = _permuted_vae(model, tmp_path / "permuted")
    out = tmp_path / "mapped"
    script = load_script("map_dit_latents")
    argv = ["--data", str(tiny_dataset(tmp_path_factory)), "--model", str(model), "--vae", str(vae), "--out", str(out),
            "--fit-clips", "4", "--val-clips", "2", "--latent-frames", "3", "--val-fraction", "0.25",
            "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    assert script.main(argv) == 0
    report = json.loads((out / "latent_map.json").read_text())
    expected = torch.zeros(16, 16, dtype=torch.float64)  # z_old = A z_new: old channel PERMUTATION[c] is new c
    expected[PERMUTATION, range(16)] = 1
    for kind in ("least_squares", "rotation"):
        assert min(report["fit"][kind]["r_squared"]) > 0.999
        assert torch.allclose(torch.tensor(report["fit"][kind]["matrix"], dtype=torch.float64), expected, atol=1e-3)
    assert set(report["val_flow_mse"]) == {
        "old DiT, old latents",
        "old DiT unmapped, new latents",
        "mapped (least_squares), new latents",
        "mapped (rotation), new latents",
    }
    printed = capsys.readouterr().out
    assert "val flow MSE, mapped (rotation), new latents" in printed
    loaded = load_model(out, device="cpu")
    record = loaded.config.extra["training"]["dit"]
    assert record["steps"] == 3 and record["latent_map"]["kind"] == report["chosen"]
    assert loaded.config.vae["latent_mean"] == ModelConfig.load(vae).vae["latent_mean"]
    new_vae = read_state_dict(vae / "vae.safetensors")
    assert all(torch.equal(v, new_vae[k]) for k, v in loaded.vae.state_dict().items())


def test_the_mapped_dit_computes_the_old_flow_in_the_new_coordinates(tmp_path_factory):
    """mapped(x, image) = A^-1 old(A x, A image) for any invertible A, the mask and actions as they are."""
    script = load_script("map_dit_latents")
    old = load_model(tiny_model_folder(tmp_path_factory), device="cpu").dit.double()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64) / 4 + torch.eye(16, dtype=torch.float64)
    mapped = script.mapped_dit(old, a).double()
    c, f, (h, w) = 16, 3, (2, 4)
    x = torch.randn(2, c, f, h, w, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, old.config.in_dim - 2 * c, f, h, w, dtype=torch.float64)
    mask[:, :, 0] = 1
    image = torch.randn(2, c, f, h, w, generator=g, dtype=torch.float64)
    context = torch.randn(2, 5, old.config.clip_dim, generator=g, dtype=torch.float64)
    windows = old.config.action.window_video_frames
    kwargs = dict(
        timestep=torch.full((2, f), 500.0, dtype=torch.float64),
        context=context,
        keyboard_windows=torch.rand(2, f, windows, 4, generator=g, dtype=torch.float64),
        mouse_windows=torch.randn(2, f, windows, 2, generator=g, dtype=torch.float64) / 10,
    )

    def to_old(z):
        return torch.einsum("on,bnfhw->bofhw", a, z)

    with torch.no_grad():
        flow_old = old(to_old(x), torch.cat([mask, to_old(image)], 1), **kwargs)
        flow_new = mapped(x, torch.cat([mask, image], 1), **kwargs)
        unmapped = old(x, torch.cat([mask, image], 1), **kwargs).double()
    expected = torch.einsum("no,bofhw->bnfhw", torch.linalg.inv(a), flow_old.double())
    assert float((flow_new.double() - expected).norm() / expected.norm()) < 1e-5  # the DiT's float32 stream
    assert float((unmapped - expected).norm() / expected.norm()) > 1e-2


def test_a_used_output_folder_is_refused(tmp_path_factory, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    script = load_script("map_dit_latents")
    model = tiny_model_folder(tmp_path_factory)
    with pytest.raises(SystemExit, match="not empty"):
        script.main(["--data", str(tmp_path), "--model", str(model), "--vae", str(model), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "x"
