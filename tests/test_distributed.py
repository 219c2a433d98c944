"""torch.distributed with gloo on the CPU, two real processes: the distributed vector env streams the
frames of the single-process one, a data-parallel training step equals one process's step on the
same global batch, and a torchrun launch of a training stage writes one model folder."""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_clips import random_clips, write_latent_dataset
from tiny_model import tiny_model_config, tiny_modules
from tiny_training import encode, tiny_dataset, tiny_latents, tiny_model_folder, tiny_training_config, train
from torch.utils.data import Dataset

from matrixgame_env import distributed
from matrixgame_env.distributed_vector import DistributedVectorEnv, world_shares
from matrixgame_env.nn.scheduler import FlowMatchScheduler
from matrixgame_env.train import reward
from matrixgame_env.train.common import StageError, TrainRun
from matrixgame_env.train.conditions import ClipBatch, build_conditions
from matrixgame_env.train.distill import Distillation
from matrixgame_env.train.dmd import DistributionMatching
from matrixgame_env.train.forcing import DiffusionForcing, NoiseMix
from matrixgame_env.train.self_forcing import SelfForcingRollout
from matrixgame_env.vector import MatrixGameVectorEnv
from matrixgame_env.weights import read_state_dict, save_safetensors
from matrixgame_env.world.sampler import SamplerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
CONFIG = tiny_model_config()
WORLDS = 3  # uneven on purpose: worlds 0, 1 in process 0, world 2 in process 1
SEED = 10


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _process(rank: int, port: int, function, args: tuple) -> None:
    """One process of a gloo group, set up the way torchrun sets it up (environment variables)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(PROCESSES), LOCAL_WORLD_SIZE=str(PROCESSES))  # fmt: skip
    torch.set_num_threads(1)
    try:
        function(*args)
    finally:
        distributed.shutdown()


def _in_two_processes(function, *args) -> None:
    """Run `function(*args)` in two fresh processes joined by gloo; fails when either fails."""
    torch.multiprocessing.start_processes(
        _process, args=(_free_port(), function, args), nprocs=PROCESSES, start_method="spawn"
    )


# The vector env


def _actions(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    keys = rng.integers(0, 2, (WORLDS, 4)).astype(np.int8)
    return {"keyboard": keys, "mouse": rng.uniform(-0.2, 0.2, (WORLDS, 2)).astype(np.float32)}


def _plans() -> list[list[dict[str, np.ndarray]]]:
    one = {"keyboard": np.array([1, 0, 0, 0], np.int8), "mouse": np.array([0.0, 0.1], np.float32)}
    other = {"keyboard": np.array([0, 0, 1, 0], np.int8), "mouse": np.array([0.1, 0.0], np.float32)}
    return [[one, one], [other, one]]


def _episode(venv) -> dict[str, np.ndarray]:
    """Reset, four steps (episodes of 2 steps: one autoreset), then reset_worlds and imagine."""
    obs, info = venv.reset(seed=SEED)
    record = {"obs_reset": obs, "frame_index_reset": info["frame_index"]}
    for step in range(4):
        obs, rewards, terminated, truncated, info = venv.step(_actions(step))
        record.update({f"obs_{step}": obs, f"rewards_{step}": rewards, f"terminated_{step}": terminated,
                       f"truncated_{step}": truncated, f"frames_{step}": info["frames"],
                       f"frame_index_{step}": info["frame_index"],
                       f"new_frames_{step}": info["new_frames"]})  # fmt: skip
    record["render"] = venv.render()
    record["cohorts"] = np.array(venv.num_cohorts)
    record["reset_worlds"] = venv.reset_worlds([2, 0])
    record["cohorts_after_reset_worlds"] = np.array(venv.num_cohorts)
    record["imagined"] = venv.imagine(2, _plans())["frames"]
    return record


def _drive_distributed_env(model: Path, out: Path) -> None:
    venv = DistributedVectorEnv(model, WORLDS, device="cpu", max_episode_steps=2, render_mode="rgb_array")
    if not venv.is_main:
        venv.serve()
        return
    record = _episode(venv)
    try:
        venv.step({"keyboard": np.full((WORLDS, 4), 2, np.int8), "mouse": np.zeros((WORLDS, 2), np.float32)})
    except ValueError as error:
        record["invalid_action"] = np.array(str(error))
    try:  # plans of unequal lengths: found out by process 1, which holds world 2
        venv.imagine(2, [[_plans()[0][0]], _plans()[0]])
    except RuntimeError as error:
        record["remote_error"] = np.array(str(error))
    record["new_frames_after_errors"] = venv.step(_actions(0))[4]["new_frames"]
    venv.close()
    np.savez(out, **record)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def distributed_run(model, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("distributed_env") / "record.npz"
    _in_two_processes(_drive_distributed_env, model, out)
    return dict(np.load(out))


@pytest.fixture(scope="module")
def one_process_run(model) -> dict[str, np.ndarray]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes
    try:
        return _episode(MatrixGameVectorEnv(model, WORLDS, device="cpu", max_episode_steps=2, render_mode="rgb_array"))
    finally:
        torch.set_num_threads(threads)


def test_worlds_are_shared_out_in_consecutive_ranges() -> None:
    assert world_shares(3, 2) == [(0, 2), (2, 3)]
    assert world_shares(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="at least the number of processes"):
        world_shares(1, 2)


def test_distributed_env_returns_what_the_single_process_env_returns(distributed_run, one_process_run) -> None:
    """Same observations, rewards, episode ends (an autoreset included) and info, frame for frame: a
    world's pixels may differ by 1 where a batch of another size rounds differently (as in test_env)."""
    for key, expected in one_process_run.items():
        got = distributed_run[key]
        assert got.shape == expected.shape and got.dtype == expected.dtype, key
        if expected.dtype == np.uint8:
            difference = np.abs(got.astype(int) - expected.astype(int))
            assert difference.max() <= 1 and difference.mean() < 1e-3, key
        else:
            assert np.array_equal(got, expected), key
    assert distributed_run["truncated_1"].all() and distributed_run["frame_index_2"].tolist() == [0] * WORLDS


def test_the_other_process_streams_exactly_what_one_process_streams_for_its_world(model, distributed_run) -> None:
    """World 2 runs alone in process 1: the frames that reach rank 0 are bit for bit those of a
    one-world env seeded as world 2 (the transport adds nothing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env = MatrixGameVectorEnv(model, 1, device="cpu", max_episode_steps=2)
        env.reset(seed=SEED + 2)
        for step in range(4):
            frames = env.step({key: value[2:] for key, value in _actions(step).items()})[4]["frames"]
            assert np.array_equal(frames[0], distributed_run[f"frames_{step}"][2]), step
    finally:
        torch.set_num_threads(threads)


def test_all_worlds_stay_in_one_cohort_per_process(distributed_run) -> None:
    assert int(distributed_run["cohorts"]) == 1 and int(distributed_run["cohorts_after_reset_worlds"]) == 2


def test_errors_of_any_process_are_raised_on_rank_0_and_the_env_goes_on(distributed_run) -> None:
    assert "keyboard entries must be 0 or 1" in str(distributed_run["invalid_action"])
    message = str(distributed_run["remote_error"])
    assert message.startswith("process 1 of the distributed env failed: ValueError: plans must be")
    assert distributed_run["new_frames_after_errors"].tolist() == [9, 12, 9]  # worlds 2 and 0 were reset last


# Data-parallel training


class _NoisedClips(Dataset):
    """Training clips with their noise and noise levels stored per clip, so that a clip is noised the
    same way whichever process trains on it."""

    def __init__(self, count: int = 8) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        (h, w), (height, width) = CONFIG.latent_size, CONFIG.video_size
        return {
            "latents": torch.randn(16, 6, h, w, generator=g),
            "image_latents": torch.randn(16, 6, h, w, generator=g),
            "keyboard": (torch.rand(21, 4, generator=g) > 0.5).float(),
            "mouse": 0.1 * torch.randn(21, 2, generator=g),
            "first_frame": torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8),
            "noise": torch.randn(16, 6, h, w, generator=g),
            "level": torch.randint(0, 1000, (6,), generator=g),
        }


def _diffusion_steps(folder: Path, steps: int = 2, batch_size: int = 4) -> None:
    """`steps` diffusion-forcing steps of the tiny DiT and image encoder (SGD) on global batches of 4."""
    dit, _, clip = tiny_modules(CONFIG)
    training = TrainRun(folder, steps, device="cpu", progress=False, log_every=1)
    dit.train()
    clip.train()
    forcing = DiffusionForcing(FlowMatchScheduler(5.0), frames_per_block=3, window_frames=6)
    training.add_module("dit", dit)
    training.add_module("clip", clip)
    training.add_optimizer("main", torch.optim.SGD([*dit.parameters(), *clip.parameters()], lr=0.5))
    training.resume()

    def losses_of(item: dict[str, torch.Tensor]):
        batch = ClipBatch.from_item(item)
        noisy = forcing.noise(batch.latents, item["noise"], item["level"])
        return forcing.loss(dit, batch.latents, build_conditions(batch, dit.config, clip), noisy=noisy)

    step = training.data_parallel(losses_of, dit, clip)
    batches = training.batches(_NoisedClips(), batch_size)
    while training.keep_going():
        losses = step(next(batches))
        grad_norm = training.optimize(losses.loss)
        training.end_step(loss=losses.loss.detach(), grad_norm=grad_norm)
    training.save()


def _logged(folder: Path, key: str) -> list[float]:
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


def _checkpoint(folder: Path) -> Path:
    return folder / "checkpoints" / json.loads((folder / "checkpoints" / "latest").read_text())["dir"]


def _distill_step(folder: Path) -> None:
    """One self-forcing step (two critic updates, one student update, SGD) on clips of this process's own,
    with the same random numbers in every process; rank 0 saves what every process ends with."""
    teacher, _, clip = tiny_modules(CONFIG)
    student, critic = copy.deepcopy(teacher).train(), copy.deepcopy(teacher).train()
    teacher.requires_grad_(False)
    training = TrainRun(folder, 1, device="cpu", progress=False)
    training.add_module("student", student)
    training.add_module("critic", critic)
    training.add_optimizer("student", torch.optim.SGD(student.parameters(), lr=100.0))  # DMD gradients are tiny
    training.add_optimizer("critic", torch.optim.SGD(critic.parameters(), lr=0.5))
    forcing = DiffusionForcing(FlowMatchScheduler(5.0), mix=NoiseMix(0.0, 1.0, 0.0))
    rollout = SelfForcingRollout(student, SamplerConfig(), CONFIG.latent_size)
    step = Distillation(training, teacher, student, critic, clip, rollout, DistributionMatching(forcing.scheduler),
                        forcing, critic_steps=2)  # fmt: skip
    torch.manual_seed(1)
    step.step(random_clips(CONFIG, batch=3, frames=6, seed=distributed.rank(), image_latents=True))
    states = distributed.gather_objects({"student": student.state_dict(), "critic": critic.state_dict()})
    if distributed.is_main():
        for rank, state in enumerate(states):
            for name, weights in state.items():
                save_safetensors(weights, folder / f"{name}_{rank}.safetensors")


def _reward_data(root: Path) -> Path:
    """Encoded clips (random latents) with player positions and angles, as `train encode` writes them."""
    write_latent_dataset(root, CONFIG, {"train": 6, "val": 2}, frames=6)
    index = json.loads((root / "index.json").read_text())
    index["variables"] = ["POSITION_X", "POSITION_Y", "ANGLE"]
    (root / "index.json").write_text(json.dumps(index))
    for number, split in enumerate(("train", "val")):
        shard = load_file(root / split / "shard_00000.safetensors")
        g = torch.Generator().manual_seed(number)
        moves = torch.randn(len(shard["latents"]), shard["keyboard"].shape[1], 3, generator=g) * torch.tensor([8, 8, 5])
        shard["variables"] = moves.cumsum(dim=1)
        save_safetensors(shard, root / split / "shard_00000.safetensors")
    return root


def _reward_options(root: Path, model: Path) -> list[str]:
    return ["--data", str(root / "reward_data"), "--init", str(model), "--device", "cpu", "--no-progress",
            "--steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--log-every", "1",
            "--width", "16"]  # fmt: skip


def _reward_stage(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    reward.add_arguments(parser)
    reward.run(parser.parse_args(argv))


def _adversarial_vae_stage(dataset: Path, out: Path) -> None:
    """`train vae` with the patch discriminator from step 1 (the second step): 2 steps on global batches
    of 2 clips, so one discriminator update."""
    config = tiny_training_config(out / "config")
    train("vae", "--data", str(dataset), "--model-config", str(config), "--out", str(out), "--steps", "2",
          "--batch-size", "2", "--clip-frames", "9", "--val-fraction", "0.5", "--warmup-steps", "1", "--no-sample",
          "--gan-weight", "0.5", "--gan-start", "1", "--disc-width", "8", "--log-every", "1", "--stats-clips", "2",
          "--val-clips", "2")  # fmt: skip


def _two_process_training(root: Path, dataset: Path, model: Path) -> None:
    """Everything the tests below check, in the same two processes (starting processes is the slow part)."""
    _diffusion_steps(root / "two")
    _adversarial_vae_stage(dataset, root / "vae_two")
    try:
        _diffusion_steps(root / "uneven", batch_size=3)
    except StageError as error:
        (root / f"uneven_{distributed.rank()}.txt").write_text(str(error))
    _distill_step(root / "distill_two")
    encode(dataset, model, root)
    options = [*_reward_options(root, model), "--out", str(root / "reward_two")]
    _reward_stage(*options, "--stop-after-steps", "1")
    _reward_stage(*options, "--resume")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """OUT/<name>_one: runs in this process; OUT/<name>_two: the same in two processes."""
    root = tmp_path_factory.mktemp("training")
    dataset, model = tiny_dataset(tmp_path_factory), tiny_model_folder(tmp_path_factory)
    _diffusion_steps(root / "one")
    _adversarial_vae_stage(dataset, root / "vae_one")
    _distill_step(root / "distill_one")
    _reward_data(root / "reward_data")
    _reward_stage(*_reward_options(root, model), "--out", str(root / "reward_one"))
    _in_two_processes(_two_process_training, root, dataset, model)
    return root


def test_a_data_parallel_diffusion_step_equals_one_process_on_the_global_batch(runs) -> None:
    one, two = runs / "one", runs / "two"
    assert _logged(two, "loss") == pytest.approx(_logged(one, "loss"), rel=1e-5)
    assert _logged(two, "grad_norm") == pytest.approx(_logged(one, "grad_norm"), rel=1e-5)
    dit, _, clip = tiny_modules(CONFIG)
    initial = {"dit": dit.state_dict(), "clip": clip.state_dict()}
    for part in ("dit", "clip"):
        a = read_state_dict(_checkpoint(one) / f"{part}.safetensors")
        b = read_state_dict(_checkpoint(two) / f"{part}.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")
        assert any(not torch.equal(a[key], initial[part][key]) for key in a), part  # it did train
    state = torch.load(_checkpoint(two) / "train_state.pt", weights_only=True)
    assert len(state["rank_rngs"]) == PROCESSES  # every process's random state, for an exact resume


def test_a_data_parallel_adversarial_vae_stage_equals_one_process(runs) -> None:
    """Losses and gradient norms agree to float rounding. The weights agree but for a few elements:
    Adam divides each gradient by its own magnitude, so in directions where the true gradient is
    about zero (a bias-free convolution before a group norm is scale-invariant) rounding noise moves
    an element as far as a real gradient; without averaging the discriminator's gradients over the
    processes, most of its elements would differ by about twice its learning rate."""
    one, two = runs / "vae_one" / "vae", runs / "vae_two" / "vae"
    assert len(_logged(one, "gan")) == len(_logged(one, "disc_loss")) == 1
    for key in ("l1", "gan", "disc_loss", "grad_norm"):
        assert _logged(two, key) == pytest.approx(_logged(one, key), rel=1e-4), key
    for name in ("vae", "discriminator"):
        a = read_state_dict(_checkpoint(one) / f"{name}.safetensors")
        b = read_state_dict(_checkpoint(two) / f"{name}.safetensors")
        difference = torch.cat([(a[key] - b[key]).abs().flatten() for key in a])
        assert float(difference.mean()) < 1e-6, name
        assert float((difference > 1e-6).float().mean()) < 0.01, name


def test_student_and_critic_learn_from_the_clips_of_both_processes(runs) -> None:
    """Both processes end with the same student and critic, and those differ from what the clips of
    process 0 alone give (its one-process step on them): the gradients were averaged."""
    for name in ("student", "critic"):
        rank_0, rank_1 = (read_state_dict(runs / "distill_two" / f"{name}_{r}.safetensors") for r in (0, 1))
        alone = read_state_dict(runs / "distill_one" / f"{name}_0.safetensors")
        assert all(torch.equal(rank_0[key], rank_1[key]) for key in rank_0), name
        assert any(not torch.allclose(rank_0[key], alone[key], rtol=1e-4, atol=1e-6) for key in rank_0), name


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(runs) -> None:
    for rank in range(PROCESSES):
        error = (runs / f"uneven_{rank}.txt").read_text()
        assert "--batch-size 3 is the global batch, split over 2 processes" in error


def test_encode_in_two_processes_writes_the_shards_and_index_of_one_process(runs, tmp_path_factory) -> None:
    """Each process encodes every other shard; rank 0 writes index.json, complete once all are there."""
    one, two = tiny_latents(tmp_path_factory), runs / "encode"  # `train encode` of the tiny recording here
    index = json.loads((one / "index.json").read_text())
    assert json.loads((two / "index.json").read_text()) == index and index["complete"]
    for split, entry in index["splits"].items():
        assert sorted(p.name for p in (two / split).iterdir()) == entry["shards"]
        for name in entry["shards"]:
            expected, got = load_file(one / split / name), load_file(two / split / name)
            assert got.keys() == expected.keys()
            for key, value in expected.items():  # latents: float16 rounding of another thread count's sums
                torch.testing.assert_close(got[key], value, rtol=4e-3, atol=4e-3, msg=f"{split}/{name}/{key}")


def test_a_resumed_two_process_stage_logs_the_losses_of_one_uninterrupted_process(runs) -> None:
    one, two = runs / "reward_one" / "reward", runs / "reward_two" / "reward"
    # One line per step and one evaluation per stop (the first session stopped after step 1), from rank 0 alone.
    assert _logged(two, "step") == [1, 1, 2, 3, 3]
    for key in ("progress_mse", "stuck_bce"):  # averaged over both processes: the global batch's means
        assert _logged(two, key) == pytest.approx(_logged(one, key), rel=1e-5), key
    a, b = (read_state_dict(folder / "model" / "reward_head.safetensors") for folder in (one, two))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    assert [session["processes"] for session in json.loads((two / "run.json").read_text())] == [2, 2]


# A torchrun launch of the command line


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
               "-m", "matrixgame_env.cli", *argv]  # fmt: skip
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)


def test_torchrun_train_reward_writes_one_model_folder_from_rank_0(runs, model, tmp_path) -> None:
    options = _reward_options(runs, model)
    launch = _torchrun("train", "reward", *options, "--out", str(tmp_path))
    assert launch.returncode == 0, launch.stderr[-3000:]
    folder = tmp_path / "reward"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "log.jsonl", "model", "result.json", "run.json"]
    assert [p.name for p in (folder / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_00000003"]
    assert _logged(folder, "step") == [1, 2, 3, 3]
    one = runs / "reward_one" / "reward"
    assert _logged(folder, "progress_mse") == pytest.approx(_logged(one, "progress_mse"), rel=1e-5)
    assert launch.stdout.count("model written to") == 1
