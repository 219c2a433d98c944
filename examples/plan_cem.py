"""Model-predictive control in the dream: the cross-entropy method over imagined futures.

    python examples/plan_cem.py --device cuda --candidates 64 --horizon 3 --steps 16 --episodes 4 --real
    python examples/plan_cem.py --quick --model path/to/model --out /tmp/cem     # a short CPU run

Each step, K candidate action sequences of H blocks are rolled out from the current world state in one
batch (`env.imagine`: the state is forked K times; no frames are decoded where the reward reads
latents), scored by the reward, and refit to the best (elite) ones for a few iterations; the first
action of the best sequence is executed, then the planner plans again. Compared with random actions
(the planner's own starting distribution) and with holding W, on the dream's reward over the same
episodes (same start pictures and seeds).

With `--real` the planner also plays the real ViZDoom game (`RealDoomEnv`): each step the dream is
restarted from the real game's current frame (so the dream remembers nothing but that frame), the
plan is made in the dream, and its first action is executed in the real game, whose reward comes from
the game variables. Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from matrixgame_env.data.doom_env import TASKS, DoomTask, RealDoomEnv
from matrixgame_env.env import MatrixGameEnv
from matrixgame_env.eval.returns import compare_returns, return_stats
from matrixgame_env.rewards import plugin_reads_frames
from matrixgame_env.spaces import ActionLayout
from matrixgame_env.world.model import WorldModel

EVAL_SEED = 10_000  # real-game episodes use seeds from here on (as in ppo_in_dream.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="doom-small", help="preset name or model folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reward", choices=TASKS, default="learned", help="the task (see DoomTask)")
    parser.add_argument("--goal", help="goal picture of clip_goal / pixel_goal (default: the model's last start one)")
    parser.add_argument("--stuck-penalty", type=float, default=0.5, help="reward lost on a block spent stuck")
    parser.add_argument("--candidates", type=int, default=64, help="K: action sequences per iteration")
    parser.add_argument("--horizon", type=int, default=3, help="H: blocks per sequence")
    parser.add_argument("--iterations", type=int, default=2, help="CEM refits per step")
    parser.add_argument("--elites", type=int, default=8, help="best sequences the distribution is refit to")
    parser.add_argument("--pitch", action="store_true", help="plan the mouse pitch too (default: level view)")
    parser.add_argument("--steps", type=int, default=16, help="blocks per episode")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--real", action="store_true", help="also play the real game (re-anchored each step)")
    parser.add_argument("--maps", nargs="+", default=["MAP01"], help="freedoom2 maps of the real game")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/plan_cem")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run (plays the real game)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if parser.parse_known_args(argv)[0].quick:  # smaller defaults; options given explicitly still count
        parser.set_defaults(candidates=4, horizon=2, iterations=1, elites=2, steps=2, episodes=2, real=True)
    args = parser.parse_args(argv)
    for name in ("candidates", "horizon", "iterations", "elites", "steps", "episodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.elites > args.candidates:
        parser.error(f"--elites ({args.elites}) cannot exceed --candidates ({args.candidates})")
    return args


class CEMPlanner:
    """The cross-entropy method over sequences of `horizon` blocks.

    Keys are independent Bernoulli variables per block; the mouse yaw (and pitch with `pitch=True`) is
    Gaussian per block, clipped to the layout's limit. Between steps the distribution is shifted one
    block forward (warm start); the new last block starts from the prior again.
    """

    def __init__(
        self,
        layout: ActionLayout,
        candidates: int,
        horizon: int,
        iterations: int,
        elites: int,
        rng: np.random.Generator,
        pitch: bool = False,
    ) -> None:
        self.layout, self.rng = layout, rng
        self.candidates, self.horizon, self.iterations, self.elites = candidates, horizon, iterations, elites
        self.axes = [0, 1] if pitch else [1]  # mouse axes planned: [pitch, yaw]
        self.prior_std = layout.mouse_limit / 2
        self.reset()

    def reset(self) -> None:
        """Back to the prior: keys pressed with probability 1/2, mouse centred."""
        self.key_probability = np.full((self.horizon, self.layout.keyboard_dim), 0.5)
        self.mouse_mean = np.zeros((self.horizon, 2))
        self.mouse_std = np.full((self.horizon, 2), self.prior_std)

    def sample(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """`count` sequences: keys [count, H, K] int8 and mouse [count, H, 2] float32."""
        keys = (self.rng.random((count, *self.key_probability.shape)) < self.key_probability).astype(np.int8)
        mouse = np.zeros((count, self.horizon, 2), np.float32)
        noise = self.rng.standard_normal((count, self.horizon, len(self.axes)))
        mouse[..., self.axes] = self.mouse_mean[:, self.axes] + self.mouse_std[:, self.axes] * noise
        limit = self.layout.mouse_limit
        return keys, np.clip(mouse, -limit, limit).astype(np.float32)

    def plan(self, env: MatrixGameEnv) -> tuple[dict[str, np.ndarray], float]:
        """(first action of the best sequence found, its imagined return) from the env's current state."""
        best_return, best_action = -math.inf, None
        for _ in range(self.iterations):
            keys, mouse = self.sample(self.candidates)
            plans = [[action(keys[k, h], mouse[k, h]) for h in range(self.horizon)] for k in range(self.candidates)]
            # [K]: one batch, the env is left unchanged; rewards read from latents need no decoded frames
            returns = env.imagine(plans, frames=plugin_reads_frames(env.reward_fn))["rewards"].sum(axis=1)
            elite = np.argsort(-returns)[: self.elites]
            self.key_probability = keys[elite].mean(axis=0).clip(0.05, 0.95)  # never rule a key out entirely
            self.mouse_mean = mouse[elite].mean(axis=0)
            self.mouse_std = np.maximum(mouse[elite].std(axis=0), 0.05 * self.layout.mouse_limit)
            if returns[elite[0]] > best_return:
                best_return, best_action = float(returns[elite[0]]), plans[elite[0]][0]
        self._shift()
        return best_action, best_return

    def _shift(self) -> None:
        self.key_probability = np.concatenate([self.key_probability[1:], np.full_like(self.key_probability[:1], 0.5)])
        self.mouse_mean = np.concatenate([self.mouse_mean[1:], np.zeros_like(self.mouse_mean[:1])])
        self.mouse_std = np.concatenate([self.mouse_std[1:], np.full_like(self.mouse_std[:1], self.prior_std)])


def action(keys: np.ndarray, mouse: np.ndarray) -> dict[str, np.ndarray]:
    return {"keyboard": np.asarray(keys, np.int8), "mouse": np.asarray(mouse, np.float32)}


def verdict(results: dict[str, dict], where: str) -> str:
    """How the planner did against random actions (two standard errors of the difference)."""
    return compare_returns(results["cem"], results["random"], "CEM", where, "--episodes")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    world = WorldModel.from_pretrained(args.model, device=args.device)
    task = DoomTask.for_model(args.reward, world, goal=args.goal, stuck_penalty=args.stuck_penalty)
    dream = MatrixGameEnv(model=world, reward=task.dream_reward())
    layout = dream.layout
    planner = CEMPlanner(layout, args.candidates, args.horizon, args.iterations, args.elites,
                         np.random.default_rng(args.seed), pitch=args.pitch)  # fmt: skip
    prior = CEMPlanner(layout, 1, 1, 1, 1, np.random.default_rng(args.seed + 1), pitch=args.pitch)
    policies = {
        "cem": None,  # planned in the dream
        "random": lambda: action(*(a[0, 0] for a in prior.sample(1))),
        "always_forward": lambda: action(np.array([1, 0, 0, 0]), np.zeros(2)),
    }
    pictures = world.start_image_paths() or [np.zeros((*world.video_size, 3), np.uint8)]
    runs = args.episodes * len(policies) * (2 if args.real else 1)
    bar = tqdm(total=runs * args.steps, desc="episodes", unit="block", disable=args.no_progress)
    planning_seconds, imagined = [], []

    def choose(name: str) -> dict[str, np.ndarray]:
        if name != "cem":
            return policies[name]()
        started = time.perf_counter()
        chosen, imagined_return = planner.plan(dream)
        planning_seconds.append(time.perf_counter() - started)
        imagined.append(imagined_return)
        return chosen

    # In the dream: the planner's imagined futures and the executed steps come from the same model.
    dream_returns: dict[str, list[float]] = {name: [] for name in policies}
    for episode in range(args.episodes):
        dream.reset(seed=args.seed + episode, options={"image": pictures[episode % len(pictures)]})
        start = dream.snapshot()  # every policy starts from this exact state
        for name in policies:
            dream.restore(start)
            planner.reset()
            total = 0.0
            for _ in range(args.steps):
                total += dream.step(choose(name))[1]
                bar.update()
            dream_returns[name].append(total)
    results: dict[str, Any] = {"dream": {name: return_stats(r) for name, r in dream_returns.items()}}
    results["dream_verdict"] = verdict(results["dream"], "on the dream's reward")

    # In the real game: plan in a dream restarted from the real frame, act in the real game.
    if args.real:
        real = RealDoomEnv(model=world, maps=args.maps, max_episode_steps=args.steps, **task.real_env_kwargs())
        real_returns: dict[str, list[float]] = {name: [] for name in policies}
        progress: dict[str, list[float]] = {name: [] for name in policies}
        for episode in range(args.episodes):
            for name in policies:
                frame, _ = real.reset(seed=EVAL_SEED + args.seed + episode)
                planner.reset()
                total, moved = 0.0, 0.0
                for step in range(args.steps):
                    if name == "cem":
                        dream.reset(seed=args.seed + 1000 * episode + step, options={"image": frame})
                    frame, reward, terminated, truncated, info = real.step(choose(name))
                    total, moved = total + reward, moved + info["progress"]
                    bar.update()
                    if terminated or truncated:
                        break
                real_returns[name].append(total)
                progress[name].append(moved)
        real.close()
        results["real"] = {name: return_stats(r) | {"mean_progress_map_units": float(np.mean(progress[name]))}
                           for name, r in real_returns.items()}  # fmt: skip
        results["real_verdict"] = verdict(results["real"], "in the real game")
    bar.close()

    summary = {
        "model": world.config.name,
        "device": str(world.device),
        "task": {"reward": args.reward, "stuck_penalty": task.stuck_penalty, "goal": task.goal},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "planning": {
            "plans": len(planning_seconds),
            "seconds_per_plan": float(np.mean(planning_seconds)),
            "blocks_imagined_per_plan": args.iterations * args.candidates * args.horizon,
            "mean_best_imagined_return": float(np.mean(imagined)),
            "frames_decoded": plugin_reads_frames(dream.reward_fn),  # False: futures scored from latents
        },
        "real_comparison": "each step the dream restarts from the real frame; the real reward comes from the game"
        if args.real
        else None,
        **results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    for where in ("dream", "real"):
        for name, stats in summary.get(where, {}).items():
            print(f"{where:>5} {name:>15}: return {stats['mean_return']:.3f} ± {stats['std_return']:.3f}")
    print(summary["dream_verdict"])
    if args.real:
        print(summary["real_verdict"])
    print(f"{summary['planning']['seconds_per_plan']:.2f} s per plan; wrote {out / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
