"""`matrixgame-env`: dispatch to each command, the headless demo video, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_training import run_cli, tiny_model_folder

from matrixgame_env import cli, train
from matrixgame_env.checkpoints import is_our_format
from matrixgame_env.demo import scripted_actions
from matrixgame_env.dtype_names import DTYPE_NAMES, dtype_from_name


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory)


def _frames(path: Path) -> list[np.ndarray]:
    import imageio.v2 as imageio

    with imageio.get_reader(path) as reader:
        return list(reader.iter_data())


def test_demo_writes_a_readable_mp4_with_every_generated_frame(model, tmp_path) -> None:
    out = tmp_path / "demo.mp4"
    status, errors = run_cli("demo", "--model", str(model), "--out", str(out), "--blocks", "3", "--device", "cpu",
                             "--no-progress")  # fmt: skip
    assert status == 0, errors
    frames = _frames(out)
    assert len(frames) == 9 + 12 + 12  # the first block brings the start frame and 8 more, later blocks 12
    assert frames[0].shape == (368, 736, 3)  # 16x32 scaled by 23, the first whole factor reaching 360 rows


def test_demo_without_overlay_keeps_the_model_size(model, tmp_path) -> None:
    out = tmp_path / "plain.mp4"
    assert run_cli("demo", "--model", str(model), "--out", str(out), "--blocks", "1", "--device", "cpu",
                   "--no-overlay", "--no-progress")[0] == 0  # fmt: skip
    frames = _frames(out)
    assert len(frames) == 9 and frames[0].shape == (16, 32, 3)


def test_demo_runs_the_fast_path_unless_eager_with_the_same_frames(model, tmp_path, monkeypatch) -> None:
    from matrixgame_env.world import model as world_model

    real, chosen = world_model.enable_fast_path, []
    monkeypatch.setattr(world_model, "enable_fast_path", lambda world, fast: chosen.append(fast) or real(world, fast))
    videos = {}
    for flags in ((), ("--eager",)):
        out = tmp_path / f"demo{len(flags)}.mp4"
        common = ("--out", str(out), "--blocks", "2", "--device", "cpu", "--no-overlay", "--no-progress")
        assert run_cli("demo", "--model", str(model), *common, *flags)[0] == 0
        videos[flags] = np.stack(_frames(out)).astype(int)
    assert chosen == [True, False]
    fast, eager = videos[()], videos[("--eager",)]
    assert fast.shape == eager.shape == (21, 16, 32, 3)
    assert np.abs(fast - eager).mean() < 1.0  # the same function in another layout, through the same encoder


def test_demo_runs_in_the_dtype_asked_for_with_frames_near_float32(model, tmp_path, monkeypatch) -> None:
    from matrixgame_env.world import model as world_model

    real, dtypes = world_model.enable_fast_path, []
    monkeypatch.setattr(
        world_model, "enable_fast_path", lambda world, fast: dtypes.append(world.dit.dtype) or real(world, fast)
    )
    videos = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.mp4"
        common = ("--out", str(out), "--blocks", "2", "--device", "cpu", "--no-overlay", "--no-progress")
        assert run_cli("demo", "--model", str(model), *common, "--dtype", dtype)[0] == 0
        videos[dtype] = np.stack(_frames(out)).astype(int)
    assert dtypes == [torch.float32, torch.bfloat16]
    assert videos["float32"].shape == videos["bfloat16"].shape == (21, 16, 32, 3)
    assert np.abs(videos["float32"] - videos["bfloat16"]).mean() < 8.0  # bf16 rounding, not another video


def test_an_unknown_dtype_is_a_clear_error(model, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--model", str(model), "--out", str(tmp_path / "x.mp4"), "--dtype", "float64"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_dtype_names_resolve_to_torch_dtypes() -> None:
    assert [dtype_from_name(name) for name in DTYPE_NAMES] == [torch.float32, torch.bfloat16, torch.float16]
    assert dtype_from_name(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'half': choose one of float32, bfloat16, float16"):
        dtype_from_name("half")


def test_demo_script_walks_turns_and_looks_around() -> None:
    labels = {action.label for action in scripted_actions(18)}
    assert {"walk forward", "turn left", "turn right", "look up", "look down"} <= labels


def test_demo_of_a_model_without_weights_is_a_clear_error(tmp_path) -> None:
    status, errors = run_cli("demo", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.mp4"))
    assert status == 2 and f"no model folder at {tmp_path / 'nowhere'}" in errors


def test_unknown_stage_is_a_clear_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "sing"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sing'" in capsys.readouterr().err


def test_unknown_command_is_a_clear_error(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["dance"])
    assert "invalid choice: 'dance'" in capsys.readouterr().err


def test_missing_data_folder_is_a_clear_error(tmp_path) -> None:
    missing = tmp_path / "no-such-dataset"
    status, errors = run_cli("train", "vae", "--data", str(missing), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert status == 2
    assert f"--data {missing} is not a folder" in errors and "matrixgame-env record" in errors
    assert "Traceback" not in errors


def test_a_stage_whose_module_is_missing_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(train.STAGES, "dit", "matrixgame_env.train.no_such_module")
    status, errors = run_cli("train", "dit", "--help")
    assert status == 2 and "`train dit` is not available" in errors


def test_convert_writes_our_format(model, tmp_path) -> None:
    status, errors = run_cli("convert", str(model), str(tmp_path / "converted"))
    assert status == 0, errors
    assert is_our_format(tmp_path / "converted")


def test_record_dispatches_to_the_recorder(tmp_path) -> None:
    pytest.importorskip("vizdoom")
    out = tmp_path / "recording"
    status, errors = run_cli("record", "--out", str(out), "--minutes", str(20 / 17.5 / 60), "--workers", "1",
                             "--size", "16", "32", "--chunk-frames", "20", "--no-progress")  # fmt: skip
    assert status == 0, errors
    assert (out / "manifest.json").is_file() and (out / "chunks" / "chunk_000000.npz").is_file()


def test_record_refuses_bad_settings_as_a_user_error(tmp_path) -> None:
    status, errors = run_cli("record", "--out", str(tmp_path / "recording"), "--minutes", "-1")
    assert status == 2 and "minutes must be positive" in errors


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "matrixgame_env.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("record", "train", "convert", "play", "demo", "eval"))


REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (REPOSITORY / ".venv").resolve(),
    reason="scripts/demo.sh runs the repository's .venv (installing one otherwise); these tests run elsewhere",
)
def test_the_readme_demo_script_runs_the_demo_with_its_arguments(model, tmp_path) -> None:
    out = tmp_path / "scripted.mp4"
    result = subprocess.run(
        ["bash", str(REPOSITORY / "scripts" / "demo.sh"), "--model", str(model), "--out", str(out), "--blocks", "2",
         "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {out}" in result.stdout
    assert len(_frames(out)) == 9 + 12  # the arguments reached `matrixgame-env demo`


def test_bench_measures_every_setting_and_writes_json(model, tmp_path, capsys) -> None:
    import json

    out = tmp_path / "speed" / "bench.json"
    status, errors = run_cli("bench", "--model", str(model), "--device", "cpu", "--worlds", "1", "2",
                             "--observations", "last", "latent", "last_only", "--steps", "2", "--warmup", "1",
                             "--json", str(out), "--no-progress")  # fmt: skip
    assert status == 0, errors
    report = json.loads(out.read_text())
    rows = report["rows"]
    settings = [(worlds, seen) for worlds in (1, 2) for seen in ("last", "latent", "last_only")]
    assert [(r["worlds"], r["observation"]) for r in rows] == settings
    for row in rows:
        assert row["steps_per_s"] > 0 and row["step_s"] > 0 and row["peak_gib"] is None  # CPU: no GPU memory
        assert row["frames_per_s"] == pytest.approx(12 * row["steps_per_s"])
        assert row["steps_per_s"] == pytest.approx(row["worlds"] / row["step_s"], rel=0.5)  # 2 steps: mean vs median
    assert report["machine"]["torch"] == torch.__version__ and report["settings"]["steps"] == 2
    assert report["path"] == "fast"
    printed = capsys.readouterr().out
    assert "steps/s" in printed and printed.count("latent") >= 2 and f"wrote {out}" in printed


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--worlds", "0"), "--worlds must all be at least 1"),
        (("--steps", "0"), "--steps must be at least 1"),
        (("--warmup", "0"), "--warmup must be at least 1"),
    ],
)
def test_bench_refuses_settings_it_cannot_measure(model, flags, message) -> None:
    status, errors = run_cli("bench", "--model", str(model), "--device", "cpu", *flags)
    assert status == 2 and message in errors


def test_bench_compile_measures_the_compiled_path_and_refuses_eager_beside_it(model, tmp_path, capsys) -> None:
    import json

    out = tmp_path / "bench.json"
    status, errors = run_cli("bench", "--model", str(model), "--device", "cpu", "--observations", "latent",
                             "--steps", "1", "--warmup", "3", "--compile", "--json", str(out),
                             "--no-progress")  # fmt: skip
    assert status == 0, errors
    report = json.loads(out.read_text())
    assert report["path"] == "compile" and report["rows"][0]["steps_per_s"] > 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", str(model), "--device", "cpu", "--eager", "--compile"])
    assert exit_info.value.code == 2
    assert "--compile: not allowed with argument --eager" in capsys.readouterr().err


def test_bench_of_a_missing_model_folder_is_a_clear_error(tmp_path) -> None:
    status, errors = run_cli("bench", "--model", str(tmp_path / "nowhere"), "--device", "cpu")
    assert status == 2 and "no model folder" in errors


def test_bench_draws_actions_inside_every_layouts_space() -> None:
    from matrixgame_env.spaces import layout_for
    from matrixgame_env.speed import random_actions

    rng = np.random.default_rng(0)
    for mode in ("universal", "gta_drive", "templerun"):
        space = layout_for(mode).action_space()
        single = random_actions(space, rng, None)
        assert space.contains(single), (mode, single)
        batch = random_actions(space, rng, 5)
        rows = [{k: v[i] for k, v in batch.items()} if isinstance(batch, dict) else int(batch[i]) for i in range(5)]
        assert all(space.contains(row) for row in rows), mode
