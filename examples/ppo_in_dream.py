"""PPO trained only inside the dream, then played in the real game.

    python examples/ppo_in_dream.py --device cuda --steps 100000 --num-envs 32 --out runs/ppo_in_dream
    python examples/ppo_in_dream.py --quick --model path/to/model --out /tmp/ppo    # a short CPU run

1. stable-baselines3 PPO learns in `MatrixGame/Doom-v0`: N dreamed worlds stepped in one forward
   (`DreamVecEnv`), rewarded by the model itself (`--reward learned`: its reward head's forward
   progress minus a penalty for being stuck). The dreamed worlds start from real game frames.
2. PPO learns the same task in the real ViZDoom game (`RealDoomEnv`: same spaces, same step length,
   the reward from the game variables by the head's training definition) for as many env steps.
3. Both, a random policy and an always-forward policy play the same real-game episodes (same seeds,
   maps and start views) through the same observation and action pipeline, and the same episodes in
   the dream, started from their first real frames: did the policy learn in the dream, and did what it
   learned carry over to the real game?

Writes OUT/results.json (returns, progress, training statistics, verdicts) and OUT/returns.png.
Without a reward head in the model, use a goal task: `--reward clip_goal --goal IMAGE`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecEnvWrapper, VecMonitor
from tqdm import tqdm

from matrixgame_env.data.doom_env import TASKS, DoomTask, RealDoomEnv
from matrixgame_env.eval.returns import compare_returns, return_stats
from matrixgame_env.sb3 import DreamVecEnv
from matrixgame_env.world.model import WorldModel
from matrixgame_env.wrappers import FlattenActions

EVAL_SEED = 10_000  # real-game episodes for evaluation use seeds from here on
DREAM_START_SEED = 20_000  # and the real frames the dreamed worlds start from, seeds from here


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="doom-small", help="preset name or model folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100_000, help="env steps (blocks) of PPO in each world")
    parser.add_argument("--num-envs", type=int, default=32, help="dreamed worlds stepped together")
    parser.add_argument("--real-envs", type=int, default=min(8, os.cpu_count() or 1), help="real games in parallel")
    parser.add_argument("--episode-steps", type=int, default=16, help="blocks per episode (12 video frames each)")
    parser.add_argument("--reward", choices=TASKS, default="learned", help="the task (see DoomTask)")
    parser.add_argument("--goal", help="goal picture of clip_goal / pixel_goal (default: the model's last start one)")
    parser.add_argument("--stuck-penalty", type=float, default=0.5, help="reward lost on a block spent stuck")
    parser.add_argument("--maps", nargs="+", default=["MAP01"], help="freedoom2 maps of the real game")
    parser.add_argument("--obs-size", default="64x64", help="HxW the policy sees (both worlds are resized to it)")
    parser.add_argument("--rollout", type=int, default=2048, help="env steps per PPO update (all envs together)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--time-limit", type=float, default=0.0, help="seconds: stop dream training early (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ppo_in_dream")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if parser.parse_known_args(argv)[0].quick:  # smaller defaults; options given explicitly still count
        parser.set_defaults(steps=32, num_envs=2, real_envs=1, episode_steps=8, rollout=16, eval_episodes=2,
                            obs_size="36x36")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.obs_size = tuple(int(v) for v in args.obs_size.lower().split("x"))
        assert len(args.obs_size) == 2 and min(args.obs_size) >= 36
    except (ValueError, AssertionError):
        parser.error(f"--obs-size must be HxW with both at least 36 (the CNN's minimum), got {args.obs_size!r}")
    for name in ("steps", "num_envs", "real_envs", "episode_steps", "rollout", "eval_episodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------------------- one observation pipeline
def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, *size, 3] uint8 (bilinear, antialiased): what the policy sees."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    resized = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class VecResizeFrames(VecEnvWrapper):
    """Resizes the frames of any VecEnv (dreamed or real) to the policy's input size."""

    def __init__(self, venv: VecEnv, size: tuple[int, int]) -> None:
        super().__init__(venv, observation_space=spaces.Box(0, 255, (*size, 3), np.uint8))
        self.size = size

    def reset(self) -> np.ndarray:
        return resize_frames(self.venv.reset(), self.size)

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        for info in infos:
            if "terminal_observation" in info:
                info["terminal_observation"] = resize_frames(info["terminal_observation"][None], self.size)[0]
        return resize_frames(obs, self.size), rewards, dones, infos


# ---------------------------------------------------------------------------- training
class TrainingLog(BaseCallback):
    """Progress bar, mean episode return after each rollout, and an optional time limit."""

    def __init__(self, total: int, label: str, time_limit: float = 0.0, progress: bool = True) -> None:
        super().__init__()
        self.bar = tqdm(total=total, desc=label, unit="step", disable=not progress)
        self.time_limit = time_limit
        self.curve: list[tuple[int, float]] = []
        self.started = time.perf_counter()

    def _on_step(self) -> bool:
        self.bar.update(self.model.num_timesteps - self.bar.n)
        return not (self.time_limit and time.perf_counter() - self.started > self.time_limit)

    def _on_rollout_end(self) -> None:
        episodes = [e["r"] for e in self.model.ep_info_buffer]
        if episodes:
            self.curve.append((int(self.model.num_timesteps), float(np.mean(episodes))))
            self.bar.set_postfix(episode_return=f"{self.curve[-1][1]:.3f}")

    def _on_training_end(self) -> None:
        self.bar.close()


def make_ppo(venv: VecEnv, args: argparse.Namespace) -> PPO:
    n_steps = max(4, args.rollout // venv.num_envs)
    batch = n_steps * venv.num_envs
    return PPO(
        "CnnPolicy",
        venv,
        n_steps=n_steps,
        batch_size=min(256, batch),
        n_epochs=1 if args.quick else 4,
        learning_rate=3e-4,
        gamma=0.95,
        gae_lambda=0.95,
        ent_coef=0.01,
        seed=args.seed,
        device=args.device,
        verbose=0,
    )


def train(venv: VecEnv, steps: int, label: str, args: argparse.Namespace, time_limit: float = 0.0):
    """(trained PPO, statistics) after `steps` env steps in `venv` (or fewer, at the time limit)."""
    model = make_ppo(venv, args)
    log = TrainingLog(steps, label, time_limit, progress=not args.no_progress)
    started = time.perf_counter()
    model.learn(total_timesteps=steps, callback=log)
    seconds = time.perf_counter() - started
    final = [e["r"] for e in model.ep_info_buffer]
    stats = {
        "env_steps": int(model.num_timesteps),
        "seconds": round(seconds, 2),
        "env_steps_per_s": round(model.num_timesteps / seconds, 2),
        "final_mean_episode_return": float(np.mean(final)) if final else None,
        "curve": log.curve,
    }
    return model, stats


def real_game(**kwargs: Any) -> RealDoomEnv:
    """One real game for a worker process: one torch thread (goal rewards run the image encoder there)."""
    torch.set_num_threads(1)
    return RealDoomEnv(**kwargs)


def real_env_kwargs(world: WorldModel, task: DoomTask, args: argparse.Namespace, in_process: bool) -> dict:
    """Arguments of `RealDoomEnv`; games in worker processes get the model's folder, not its weights."""
    model = world if in_process or world.folder is None else str(world.folder)
    kwargs = dict(model=model, maps=args.maps, max_episode_steps=args.episode_steps)
    return kwargs | task.real_env_kwargs()


def dream_starts(world: WorldModel, task: DoomTask, args: argparse.Namespace) -> list[np.ndarray]:
    """First frames of real episodes (other seeds than the evaluation's): where the dreamed worlds start."""
    env = RealDoomEnv(**real_env_kwargs(world, task, args, in_process=True))
    starts = [env.reset(seed=DREAM_START_SEED + args.seed + i)[0] for i in range(args.num_envs)]
    env.close()
    return starts


# ---------------------------------------------------------------------------- evaluation
Policy = Callable[[np.ndarray], np.ndarray]  # frames [N, h, w, 3] at the policy's size -> flat actions [N, 6]


def evaluate_real(policy: Policy, env: FlattenActions, args: argparse.Namespace) -> dict:
    """Returns, forward progress (map units) and time stuck of `policy` over the real evaluation episodes."""
    returns, progress, stuck = [], [], []
    for episode in range(args.eval_episodes):
        obs, _ = env.reset(seed=EVAL_SEED + args.seed + episode)
        total, moved, blocks, stuck_blocks, done = 0.0, 0.0, 0, 0, False
        while not done:
            action = policy(resize_frames(obs[None], args.obs_size))[0]
            obs, reward, terminated, truncated, info = env.step(action)
            total, moved = total + reward, moved + info["progress"]
            blocks, stuck_blocks = blocks + 1, stuck_blocks + info["stuck"]
            done = terminated or truncated
        returns.append(total)
        progress.append(moved)
        stuck.append(stuck_blocks / blocks)
    return return_stats(returns) | {
        "mean_progress_map_units": float(np.mean(progress)),
        "stuck_fraction": float(np.mean(stuck)),
    }


def evaluate_dream(policy: Policy, dream: DreamVecEnv, starts: list[np.ndarray], args: argparse.Namespace) -> dict:
    """Returns of `policy` in the dream, one world per real evaluation episode, started from its first frame."""
    obs = resize_frames(dream.venv.reset(seed=EVAL_SEED + args.seed, options={"image": starts})[0], args.obs_size)
    totals = np.zeros(len(starts))
    for _ in range(args.episode_steps):  # the worlds never end on their own: no restarts to pay for
        obs, rewards, _, _ = dream.step(policy(obs))
        obs, totals = resize_frames(obs, args.obs_size), totals + rewards
    return return_stats(totals.tolist())


def verdict(results: dict[str, dict], where: str) -> str:
    """How the dream-trained policy did against the random one (two standard errors of the difference)."""
    dream, random = results["ppo_dream"], results["random"]
    return compare_returns(dream, random, "PPO trained in the dream", where, "--eval-episodes")


def plot(evaluation: dict[str, dict], training: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(evaluation["real"])
    positions = np.arange(len(names))
    for offset, where, color, label in ((-0.2, "real", "#37a", "real game"), (0.2, "dream", "#bbb", "dream")):
        means = [evaluation[where][n]["mean_return"] for n in names]
        stds = [evaluation[where][n]["std_return"] for n in names]
        bars.bar(positions + offset, means, 0.4, yerr=stds, capsize=3, color=color, label=label)
    bars.set_xticks(positions, names)
    bars.axhline(0, color="black", linewidth=0.8)
    bars.set_ylabel("episode return (mean ± std)")
    bars.set_title("evaluation: the same start frames")
    bars.legend()
    for label, stats in training.items():
        if stats["curve"]:
            steps, returns = zip(*stats["curve"])
            curves.plot(steps, returns, marker=".", label=label)
    curves.set_xlabel("env steps")
    curves.set_ylabel("mean episode return during training")
    curves.set_title("training (each in its own world)")
    curves.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    world = WorldModel.from_pretrained(args.model, device=args.device)
    task = DoomTask.for_model(args.reward, world, goal=args.goal, stuck_penalty=args.stuck_penalty)

    # 1. PPO in the dream: N worlds in one forward, started from real frames, rewarded by the model.
    dream = DreamVecEnv(
        model=world, num_envs=args.num_envs, reward=task.dream_reward(), max_episode_steps=args.episode_steps
    )
    dream.venv.reset(seed=args.seed, options={"image": dream_starts(world, task, args)})
    dream.seed(args.seed)
    dream_env = VecMonitor(VecResizeFrames(dream, args.obs_size))
    dream_policy, dream_stats = train(dream_env, args.steps, "PPO in the dream", args, args.time_limit)
    dream_env.close()

    # 2. PPO in the real game, for as many env steps as the dream run took.
    in_process = args.real_envs == 1
    games = make_vec_env(  # each game is wrapped in a Monitor: episode returns for the log
        real_game if args.real_envs > 1 else RealDoomEnv,
        n_envs=args.real_envs,
        seed=args.seed,
        env_kwargs=real_env_kwargs(world, task, args, in_process),
        wrapper_class=FlattenActions,
        vec_env_cls=DummyVecEnv if in_process else SubprocVecEnv,
    )
    real_env = VecResizeFrames(games, args.obs_size)
    real_policy, real_stats = train(real_env, dream_stats["env_steps"], "PPO in the real game", args)
    real_env.close()

    # 3. Everyone plays the same real episodes through the same pipeline, and the dream started from
    #    their first frames (was the dream policy good in the dream, and did that carry over?).
    env = FlattenActions(RealDoomEnv(**real_env_kwargs(world, task, args, in_process=True)))
    starts = [env.reset(seed=EVAL_SEED + args.seed + e)[0] for e in range(args.eval_episodes)]
    dream = DreamVecEnv(model=world, num_envs=args.eval_episodes, reward=task.dream_reward())
    rng = np.random.default_rng(args.seed)
    forward = np.array([[1, -1, -1, -1, 0, 0]], np.float32)  # hold W, mouse still
    policies: dict[str, Policy] = {
        "random": lambda obs: rng.uniform(-1, 1, (len(obs), *env.action_space.shape)).astype(np.float32),
        "always_forward": lambda obs: np.repeat(forward, len(obs), axis=0),
        "ppo_dream": lambda obs: dream_policy.predict(obs, deterministic=True)[0],
        "ppo_real": lambda obs: real_policy.predict(obs, deterministic=True)[0],
    }
    evaluation: dict[str, dict] = {"real": {}, "dream": {}}
    for name, policy in tqdm(policies.items(), desc="evaluation", disable=args.no_progress):
        evaluation["real"][name] = evaluate_real(policy, env, args)
        evaluation["dream"][name] = evaluate_dream(policy, dream, starts, args)
    env.close()

    summary = {
        "model": world.config.name,
        "device": str(world.device),
        "task": {"reward": args.reward, "stuck_penalty": task.stuck_penalty, "goal": task.goal},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "training": {"dream": dream_stats, "real": real_stats},
        "evaluation": evaluation,
        "verdict": verdict(evaluation["real"], "in the real game"),
        "dream_verdict": verdict(evaluation["dream"], "in the dream"),
    }
    summary["settings"]["obs_size"] = list(args.obs_size)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    title = f"{world.config.name}, task {args.reward}, {dream_stats['env_steps']} env steps"
    training = {"PPO in the dream (dream reward)": dream_stats, "PPO in the real game (real reward)": real_stats}
    plot(evaluation, training, out / "returns.png", title)
    for name, stats in evaluation["real"].items():
        moved, stuck = stats["mean_progress_map_units"], stats["stuck_fraction"]
        real = f"{stats['mean_return']:.3f} ± {stats['std_return']:.3f}"
        dreamed = "{mean_return:.3f} ± {std_return:.3f}".format(**evaluation["dream"][name])
        print(f"{name:>15}: real game {real} (progress {moved:.0f} map units, stuck {stuck:.0%}); dream {dreamed}")
    print(summary["dream_verdict"])
    print(summary["verdict"])
    print(f"wrote {out / 'results.json'} and {out / 'returns.png'}")
    return summary


if __name__ == "__main__":
    main()
