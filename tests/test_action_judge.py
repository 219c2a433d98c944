"""`train vae --action-judge`: a frozen IDM's loss on the decoded clips, its record, and eval's note."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_training import VAE_CLIPS, VAL_FRACTION, VIDEO_SIZE, run_cli, tiny_dataset, tiny_trained_vae, train

from matrixgame_env.checkpoints import load_model
from matrixgame_env.eval.command import _action_judges
from matrixgame_env.eval.idm import IDMConfig, InverseDynamicsModel, idm_weights_sha256, save_idm, yaw_direction
from matrixgame_env.train.action_judge import ActionJudge


def _idm(folder: Path, seed: int, size: tuple[int, int] = VIDEO_SIZE) -> Path:
    torch.manual_seed(seed)
    return save_idm(InverseDynamicsModel(IDMConfig(video_size=size, width=8)), folder)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    """A trained tiny model folder (4 VAE steps) for decoder-only runs."""
    return tiny_trained_vae(tmp_path_factory)


def test_the_pixel_path_reads_as_the_uint8_path() -> None:
    torch.manual_seed(0)
    model = InverseDynamicsModel(IDMConfig(video_size=VIDEO_SIZE, width=8)).eval()
    frames = torch.randint(0, 256, (5, 3, *VIDEO_SIZE, 3), dtype=torch.uint8)
    pixels = frames.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
    with torch.no_grad():
        for a, b in zip(model(frames), model.read_pixels(pixels)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"windows must be \[B, 3, 3, H, W\]"):
        model.read_pixels(pixels[:, :2])
    with pytest.raises(ValueError, match=r"windows must be \(16, 32\) pixels"):
        model.read_pixels(pixels[..., :8])


def test_the_judge_loss_against_a_float64_reference_and_its_gradient(tmp_path) -> None:
    judge = ActionJudge.load(_idm(tmp_path / "judge", seed=1))
    generator = torch.Generator().manual_seed(2)
    video = (torch.rand(2, 3, 9, *VIDEO_SIZE, generator=generator) * 2 - 1).requires_grad_(True)
    keyboard = (torch.rand(2, 9, 4, generator=generator) > 0.6).float()
    mouse = torch.randn(2, 9, 2, generator=generator) * 0.05

    loss = judge.loss(video, keyboard, mouse)
    loss.backward()
    assert video.grad is not None and torch.isfinite(video.grad).all() and video.grad.abs().sum() > 0
    assert all(p.grad is None for p in judge.model.parameters())  # frozen

    # By hand: every window of 3 frames, labelled with the action of its middle frame.
    terms = []
    with torch.no_grad():
        for clip in range(2):
            for first in range(9 - 2):
                window = video[clip, :, first : first + 3].transpose(0, 1)[None]  # [1, 3, 3, H, W]
                key_logits, yaw_logits = (t.double()[0] for t in judge.model.read_pixels(window))
                held = keyboard[clip, first + 1].double()
                log_held, log_released = torch.log(torch.sigmoid(key_logits)), torch.log(torch.sigmoid(-key_logits))
                keys = -(held * log_held + (1 - held) * log_released)
                target = int(yaw_direction(mouse[clip, first + 1, 1], judge.model.config.yaw_dead_zone))
                terms.append((float(keys.mean()), float(-torch.log_softmax(yaw_logits, 0)[target])))
    reference = sum(k for k, _ in terms) / len(terms) + sum(y for _, y in terms) / len(terms)
    assert float(loss.detach()) == pytest.approx(reference, rel=1e-5)


def test_a_judge_that_cannot_read_the_clips_is_named(tmp_path) -> None:
    judge = ActionJudge.load(_idm(tmp_path / "judge", seed=0))
    assert judge.check(VIDEO_SIZE, 4, 9) is None
    assert judge.check((32, 64), 4, 9) == "reads (16, 32) frames, the model makes (32, 64)"
    assert judge.check(VIDEO_SIZE, 7, 9) == "reads 4 keys, the recording has 7"
    assert judge.check(VIDEO_SIZE, 4, 1) == "reads windows of 3 frames, longer than --clip-frames 1"


def test_decoder_training_against_a_judge_is_recorded_and_eval_names_that_judge(
    dataset, start, tmp_path, capsys
) -> None:
    judge = _idm(tmp_path / "judge", seed=3)
    other = _idm(tmp_path / "other", seed=4)
    judge_hash = idm_weights_sha256(judge)
    out = tmp_path / "run"
    train("vae", "--data", str(dataset), "--init", str(start), "--out", str(out), "--steps", "3", "--decoder-only",
          "--action-judge", str(judge), "--action-weight", "0.5", "--val-clips", "2", *VAE_CLIPS)  # fmt: skip
    assert idm_weights_sha256(judge) == judge_hash  # the judge is read, never trained
    logged = [json.loads(line) for line in (out / "vae" / "log.jsonl").read_text().splitlines()]
    actions = [line["action"] for line in logged if "action" in line]
    assert actions and all(math.isfinite(v) and v > 0 for v in actions)
    model = out / "vae" / "model"
    record = load_model(model, device="cpu").config.extra["training"]["vae"]["decoder_only"]
    assert record["action_weight"] == 0.5 and record["action_judge_sha256"] == judge_hash
    assert record["action_judge"] == str(judge.resolve())

    for idm, expected in ((judge, True), (other, None)):
        report_dir = tmp_path / f"eval_{idm.name}"
        status, errors = run_cli("eval", "--model", str(model), "--data", str(dataset), "--out", str(report_dir),
                                 "--idm", str(idm), "--val-fraction", VAL_FRACTION, "--clips", "0",
                                 "--drift-minutes", "0", "--device", "cpu", "--no-progress")  # fmt: skip
        assert status == 0, errors
        section = json.loads((report_dir / "eval.json").read_text())["idm"]
        assert section["sha256"] == idm_weights_sha256(idm)
        assert section.get("trained_against") is expected
    reports = [str(tmp_path / f"eval_{idm.name}") for idm in (judge, other)]
    capsys.readouterr()
    status, errors = run_cli("compare", *reports, "--names", "same", "another")
    assert status == 0, errors
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: judged by")]
    assert notes == ["note: judged by the IDM their VAE or DiT was trained against (same): their IDM rows are not an "
                     "independent measure"]  # fmt: skip


@pytest.mark.parametrize(
    "options, message",
    [
        (["--action-weight", "1"], "--action-judge and --action-weight > 0 go together"),
        (["--action-judge", "somewhere"], "--action-judge and --action-weight > 0 go together"),
        (["--action-weight", "-1", "--action-judge", "x"], "--action-weight must be a number >= 0, got -1.0"),
        (["--action-weight", "1", "--action-judge", "/no/idm"], "--action-judge /no/idm: no inverse-dynamics model"),
    ],
)
def test_bad_judge_options_are_refused(dataset, start, tmp_path, options, message) -> None:
    status, errors = run_cli("train", "vae", "--data", str(dataset), "--init", str(start), "--decoder-only",
                             "--out", str(tmp_path), "--device", "cpu", "--no-progress", *options,
                             *VAE_CLIPS)  # fmt: skip
    assert status == 2 and message in errors


def test_a_judge_of_other_frames_is_refused(dataset, start, tmp_path) -> None:
    judge = _idm(tmp_path / "big", seed=0, size=(32, 64))
    status, errors = run_cli("train", "vae", "--data", str(dataset), "--init", str(start), "--decoder-only",
                             "--action-judge", str(judge), "--action-weight", "1", "--out", str(tmp_path / "run"),
                             "--device", "cpu", "--no-progress", *VAE_CLIPS)  # fmt: skip
    assert status == 2 and "reads (32, 64) frames, the model makes (16, 32)" in errors


def test_the_judges_of_a_record_are_found_in_nested_stages_and_lists() -> None:
    record = {
        "steps": 10,
        "decoder_stages": [{"stage": "adversarial"}, {"stage": "judged", "action_judge_sha256": "a"}],
        "decoder_only": {"action_judge_sha256": "b", "continued_from": {"action_judge_sha256": "c"}},
    }
    assert _action_judges(record) == {"a", "b", "c"}
    assert _action_judges({"decoder_stages": [{"stage": "adversarial"}]}) == set()
