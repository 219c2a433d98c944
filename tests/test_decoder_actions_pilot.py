"""scripts/decoder_actions_pilot.py on a tiny recording and model: a decoder fine-tuned with and without the
actions, eval's held-out clips generated once, and both decoders' readings of them and of the round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from script_module import load_script
from tiny_training import VAL_FRACTION, VIDEO_SIZE, tiny_dataset, tiny_model_folder

from matrixgame_env.eval.fidelity import generate_clips
from matrixgame_env.eval.idm import IDMConfig, InverseDynamicsModel, save_idm
from matrixgame_env.world.model import WorldModel


def test_the_pilot_trains_both_decoders_and_reads_what_each_draws(tmp_path_factory, tmp_path, capsys):
    pilot = load_script("decoder_actions_pilot")
    data, model = tiny_dataset(tmp_path_factory), tiny_model_folder(tmp_path_factory)
    common = ["--model", str(model), "--data", str(data), "--steps", "3", "--batch-size", "2", "--size",
              *map(str, VIDEO_SIZE), "--val-fraction", VAL_FRACTION, "--new-lr-mult", "100"]  # fmt: skip
    assert pilot.main(["train", *common, "--out", str(tmp_path / "actions"), "--lags", "2"]) == 0
    assert pilot.main(["train", *common, "--out", str(tmp_path / "control")]) == 0
    shown, plain = (load_file(tmp_path / name / "decoder.safetensors") for name in ("actions", "control"))
    modulations = [key for key in shown if ".frame_modulations." in key]
    assert modulations and not any(".frame_modulations." in key for key in plain)
    assert set(shown) - set(modulations) == set(plain)
    assert any(shown[key].abs().sum() > 0 for key in modulations if key.endswith("mlp.2.weight"))  # trained off zero
    record = json.loads((tmp_path / "actions" / "decoder.json").read_text())
    assert record["vae"]["decoder_frame_actions"] == 2 * 6 and len(record["log"]) == 3

    generated = tmp_path / "generated.pt"
    assert pilot.main(["latents", "--model", str(model), "--data", str(data), "--out", str(generated), "--clips",
                       "2", "--horizon-s", "1", "--val-fraction", VAL_FRACTION]) == 0  # fmt: skip
    saved = torch.load(generated, weights_only=True)
    latent_frames, frames = saved["latents"].shape[2], saved["real"].shape[1]
    assert saved["latents"].shape[:2] == (2, 16) and frames == 1 + 4 * (latent_frames - 1) > 9

    # The model's own decoder draws the generated latents as eval's generation does.
    world = WorldModel.from_pretrained(model, device="cpu", dtype=torch.float32)
    eval_frames = generate_clips(world, saved["real"][:, 0], saved["keyboard"], saved["mouse"], progress=False)
    own = pilot.decode(world.vae, 0, saved["latents"], saved["keyboard"], saved["mouse"])
    assert (own.int() - eval_frames.int()).abs().max() <= 1

    torch.manual_seed(0)
    idm = save_idm(InverseDynamicsModel(IDMConfig(video_size=VIDEO_SIZE, width=8)), tmp_path / "idm")
    out = tmp_path / "report.json"
    decoders = [str(tmp_path / "control"), str(tmp_path / "actions")]
    argv = ["judge", "--model", str(model), "--generated", str(generated), "--idm", str(idm), "--out", str(out),
            "--decoders", *decoders]  # fmt: skip
    assert pilot.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["clips"] == 2 and 0 <= report["real"]["judged"]["keyboard"] <= 1
    for name in ["model's own", *decoders]:
        for kind in ("generated", "round_trip"):
            scores = report[name][kind]
            assert list(scores["psnr"]) == ["0.5s", "1s"] and len(scores["psnr_clips"]["1s"]) == 2
            assert 0 <= scores["keys"] <= 1 and len(scores["by_phase"]["keyboard"]) == 4
    pairs = report["against_first"][decoders[1]]
    for kind in ("generated", "round_trip"):
        keys = pairs[kind]["keys"]
        actions, control = report[decoders[1]][kind]["per_clip"], report[decoders[0]][kind]["per_clip"]
        difference = sum(a - c for a, c in zip(actions["keyboard"], control["keyboard"])) / 2
        assert keys["mean"] == pytest.approx(difference) and keys["low"] <= keys["mean"] <= keys["high"]
        assert set(pairs[kind]) == {"psnr_0.5s", "psnr_1s", "keys", "yaw_direction"}
    assert torch.is_grad_enabled()  # the script's no-grad parts leave the caller's mode alone
    printed = capsys.readouterr().out
    assert all(f"{name}: generated keys" in printed for name in decoders)
