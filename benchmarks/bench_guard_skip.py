"""One compiled CPU env timed with and without Dynamo's guard checks, alternating in one run.

After warm-up, every step of a `fast="compile"` env calls seven compiled graphs, and Dynamo checks
each call's guards first (~430 us each on 2 cores). This times the same env in alternating rounds of
--steps steps, plainly and under `torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)`
(only the guards that tell cached graphs apart). A measurement, not an option of the package: with
the guards skipped, a call that needs a recompile would run a wrong graph silently.

Usage: python benchmarks/bench_guard_skip.py [--model doom-small] [--dtype bfloat16] [--observation last]
       [--rounds 10] [--steps 8] [--warmup 6] [--threads 2] [--out DIR] [--name NAME]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_env import cpu_env, timed_steps  # noqa: E402
from common import environment, table, write_json  # noqa: E402

SETTINGS = ("guards checked", "guards skipped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--observation", default="last", choices=("last", "latent"))
    parser.add_argument("--rounds", type=int, default=10, help="pairs of rounds, the order reversed every other one")
    parser.add_argument("--steps", type=int, default=8, help="env steps per round")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps first (they compile)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--name", default="guard_skip_cpu", help="results file name, without .json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = cpu_env(args.model, "compile", args.dtype, None, args.observation)
    rng = np.random.default_rng(0)
    timed_steps(env, args.warmup, rng)
    rounds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for index in range(args.rounds):
        for name in SETTINGS if index % 2 == 0 else reversed(SETTINGS):
            skip = name == "guards skipped"
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip):
                rounds[name].append(1 / statistics.median(timed_steps(env, args.steps, rng)))
    env.close()
    checked, skipped = rounds[SETTINGS[0]], rounds[SETTINGS[1]]
    rows = [
        {"setting": name, "steps_per_s": statistics.median(values), "rounds_steps_per_s": values}
        for name, values in rounds.items()
    ]
    print(table(rows, ["setting", "steps_per_s"]))
    ahead = sum(s > c for c, s in zip(checked, skipped))
    ratio = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
    print(f"skipped / checked: {ratio:.3f}x, ahead in {ahead} of {args.rounds} rounds")
    settings = {key: getattr(args, key) for key in ("model", "dtype", "observation", "rounds", "steps", "warmup")}
    settings["threads"] = torch.get_num_threads()
    path = write_json(args.name, {"environment": environment(), "settings": settings, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
