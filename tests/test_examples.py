"""The examples run end to end in their quick CPU modes on a tiny model, and docs/rl.md's snippets run."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import write_tiny_model

from matrixgame_env.learned_reward import REWARD_HEAD_KEY
from matrixgame_env.model_config import ModelConfig
from matrixgame_env.nn.reward_head import RewardHead
from matrixgame_env.weights import save_safetensors

pytest.importorskip("vizdoom")
pytest.importorskip("stable_baselines3")

REPO = Path(__file__).resolve().parents[1]


def load_example(name: str):
    """An example script as a module (its `main(argv)` runs it in this process)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_reward_head(folder: Path, seed: int = 0) -> Path:
    """Ship a random-weight reward head with a model folder, as `matrixgame-env train reward` does."""
    torch.manual_seed(seed)
    head = RewardHead(width=8, depth=2)
    save_safetensors({k: v.detach().clone() for k, v in head.state_dict().items()}, folder / "reward_head.safetensors")
    config = ModelConfig.load(folder)
    config.extra[REWARD_HEAD_KEY] = {"file": "reward_head.safetensors", "config": head.config,
                                     "progress_scale": 64.0, "stuck_distance": 16.0}  # fmt: skip
    config.save(folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return add_reward_head(write_tiny_model(tmp_path_factory.mktemp("tiny-examples") / "model"))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ViZDoom writes a _vizdoom/ folder into the working directory


def _quick(tiny: Path, out: Path, *more: str) -> list[str]:
    return ["--quick", "--model", str(tiny), "--device", "cpu", "--out", str(out), "--no-progress", *more]


def test_ppo_in_dream_trains_in_both_worlds_and_evaluates_in_the_real_game(tiny, tmp_path):
    summary = load_example("ppo_in_dream").main(_quick(tiny, tmp_path / "ppo"))
    written = json.loads((tmp_path / "ppo" / "results.json").read_text())
    assert written["verdict"] == summary["verdict"] and written["task"]["stuck_penalty"] == 0.5
    dream, real = written["training"]["dream"], written["training"]["real"]
    assert dream["env_steps"] >= 32 and real["env_steps"] >= dream["env_steps"]  # as many steps in each world
    assert dream["curve"] and all(np.isfinite(r) for _, r in dream["curve"])
    real, dreamed = written["evaluation"]["real"], written["evaluation"]["dream"]
    assert set(real) == set(dreamed) == {"random", "always_forward", "ppo_dream", "ppo_real"}
    episode_steps = written["settings"]["episode_steps"]
    for stats in real.values():
        assert len(stats["returns"]) == 2 and stats["mean_return"] == pytest.approx(np.mean(stats["returns"]))
        # The real reward is progress / 64 - 0.5 when stuck, per block: so is its mean over episodes.
        expected = stats["mean_progress_map_units"] / 64 - 0.5 * stats["stuck_fraction"] * episode_steps
        assert stats["mean_return"] == pytest.approx(expected, abs=1e-4)
    assert real["always_forward"]["mean_progress_map_units"] > 0
    assert all(len(stats["returns"]) == 2 and np.isfinite(stats["returns"]).all() for stats in dreamed.values())
    assert "in the real game" in written["verdict"] and "in the dream" in written["dream_verdict"]
    with Image.open(tmp_path / "ppo" / "returns.png") as plot:
        assert plot.size[0] > 500 and plot.size[1] > 200


def test_ppo_in_dream_without_a_reward_head_says_which_reward_to_use(tmp_path):
    plain = write_tiny_model(tmp_path / "plain")
    with pytest.raises(ValueError, match="clip_goal or pixel_goal"):
        load_example("ppo_in_dream").main(_quick(plain, tmp_path / "out"))


def test_plan_cem_plans_in_the_dream_and_acts_in_the_real_game(tiny, tmp_path):
    summary = load_example("plan_cem").main(_quick(tiny, tmp_path / "cem"))
    written = json.loads((tmp_path / "cem" / "results.json").read_text())
    assert written == json.loads(json.dumps(summary))
    for where in ("dream", "real"):
        assert set(written[where]) == {"cem", "random", "always_forward"}
        assert all(len(stats["returns"]) == 2 for stats in written[where].values())
    planning = written["planning"]
    assert planning["plans"] == 2 * 2 * 2  # episodes x steps, in the dream and in the real game
    assert planning["blocks_imagined_per_plan"] == 1 * 4 * 2  # iterations x candidates x horizon
    assert np.isfinite(planning["mean_best_imagined_return"])
    assert planning["frames_decoded"] is False  # the learned reward reads latents: no decoding while planning
    assert written["real"]["always_forward"]["mean_progress_map_units"] > 0
    assert "CEM" in written["dream_verdict"] and "real game" in written["real_verdict"]


class _Scored:
    """A stand-in for `env.imagine` with a known best plan: W pressed, S released, turning right."""

    reward_fn = None  # a plug-in that does not say it reads no frames: imagine is asked for frames

    def imagine(self, plans, frames):
        assert frames is True
        rewards = [[a["keyboard"][0] - a["keyboard"][1] + 10 * a["mouse"][1] for a in plan] for plan in plans]
        return {"rewards": np.array(rewards, np.float32)}


def test_cem_planner_finds_the_best_plan_of_a_known_objective():
    cem = load_example("plan_cem")
    from matrixgame_env.spaces import UNIVERSAL

    planner = cem.CEMPlanner(UNIVERSAL, candidates=64, horizon=2, iterations=4, elites=8,
                             rng=np.random.default_rng(0))  # fmt: skip
    action, imagined = planner.plan(_Scored())
    assert action["keyboard"][0] == 1 and action["keyboard"][1] == 0 and action["mouse"][1] > 0.1
    assert action["mouse"][0] == 0  # pitch is not planned by default
    assert imagined > 2 * (1 + 10 * 0.1)
    assert planner.key_probability[0, 0] > 0.9 and planner.key_probability[-1].tolist() == [0.5] * 4  # shifted


def test_what_if_rolls_plans_out_side_by_side(tiny, tmp_path):
    import imageio.v2 as imageio

    out = tmp_path / "what_if"
    plans = "forward*2, turn_left, go right: forward+turn_right"
    summary = load_example("what_if").main(
        [
            "--model",
            str(tiny),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--blocks",
            "2",
            "--plans",
            plans,
            "--reward",
            "learned",
        ]  # fmt: skip
    )
    assert summary["plans"] == {"forward*2": ["forward", "forward"], "turn_left": ["turn left", "turn left"],
                                "go right": ["forward", "turn right"]}  # fmt: skip
    assert set(summary["returns"]) == set(summary["plans"])
    assert all(len(r) == 2 for r in summary["rewards"].values())
    reader = imageio.get_reader(out / "what_if.mp4")
    frames = [frame for frame in reader]
    reader.close()
    assert len(frames) == 9 + 12 == summary["video_frames"]  # the first block's 9 frames, then 12
    tile = (16 * 15, 32 * 15)  # 16x32 frames scaled up to at least 240 rows
    assert frames[0].shape == (2 * tile[0], 2 * tile[1], 3)  # 3 plans in a 2x2 grid
    assert frames[-1][tile[0] :, tile[1] :].mean() < 2  # the unused fourth tile stays black
    with Image.open(out / "what_if.png") as sheet:
        assert sheet.size[1] == 3 * (96 + 4)  # one row per plan
    assert json.loads((out / "what_if.json").read_text())["video_frames"] == 21


@pytest.mark.parametrize(
    "plans, message",
    [("forward*3", "more than --blocks"), ("fly", "unknown action 'fly'"), ("forward*0", "positive whole")],
)
def test_what_if_rejects_bad_plans(plans, message, capsys):
    with pytest.raises(SystemExit):
        load_example("what_if").parse_args(["--blocks", "2", "--plans", plans])
    assert message in capsys.readouterr().err


def test_what_if_reads_plans_from_a_file(tmp_path):
    what_if = load_example("what_if")
    (tmp_path / "plans.txt").write_text("# hypotheses\nrun: forward*2\nturn_right+idle\n")
    plans = what_if.read_plans(f"@{tmp_path / 'plans.txt'}", blocks=3)
    assert list(plans) == ["run", "turn_right+idle"]
    assert [a.label for a in plans["run"]] == ["forward"] * 3 and plans["turn_right+idle"][-1].label == "idle"


def test_the_python_snippets_of_docs_rl_md_run(tiny):
    text = (REPO / "docs" / "rl.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(snippets) >= 8
    code = "\n".join(snippets)
    assert code.count('model = "doom-small"') == 1
    code = code.replace('model = "doom-small"', f"model = {str(tiny)!r}")
    namespace: dict = {"__name__": "docs_rl"}
    exec(compile(code, "docs/rl.md", "exec"), namespace)
    assert namespace["agent"].num_timesteps >= 16 and np.isfinite(namespace["loss"].item())
    assert namespace["futures"]["rewards"].shape == (3, 3) and namespace["frames"].shape[:2] == (4, 9)


def test_record_gym_game_writes_a_dataset_of_left_and_right_pushes(tmp_path) -> None:
    pytest.importorskip("pygame")  # CartPole draws its frames with pygame
    from matrixgame_env.data import VideoClipDataset, read_manifest

    out = tmp_path / "cartpole"
    load_example("record_gym_game").main(
        ["--out", str(out), "--episodes", "3", "--steps", "30", "--size", "16", "32", "--no-progress"]
    )
    manifest = read_manifest(out)
    assert manifest.episodes == [0, 1, 2] and sum(chunk.frames for chunk in manifest.chunks) == 90
    assert manifest.variable_names == ["EPISODE_START", "REWARD"]
    clips = VideoClipDataset(out, clip_frames=9, split="train", val_fraction=0.34)
    item = clips[0]
    assert item["video"].shape == (3, 9, 16, 32)
    assert (item["keyboard"][:, :2] == 0).all() and (item["keyboard"][:, 2:].sum(1) == 1).all()  # A or D
