"""What Dynamo's guard checks cost one compiled CPU env, and how long the decoder takes to warm up.

One MatrixGameEnv on the CPU (`fast="compile"`, bfloat16): the first two blocks' decodes (the
decoder's compile falls in them) timed on their own, then rounds of steps alternating the compiled
graphs' guards checked as usual and skipped (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`,
safe here: nothing changes between the rounds). The difference is what the remaining guards cost
a step; `FrozenCompiled` keeps only the identity checks of the modules' guards
(`frozen_compile.identity_guards_only`).

Usage: python benchmarks/bench_guard_cost.py [--threads 2] [--rounds 12] [--steps 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, noted_decodes, table, write_json  # noqa: E402

from matrixgame_env.env import MatrixGameEnv  # noqa: E402
from matrixgame_env.speed import random_actions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=8, help="steps before the rounds (the compiles fall in them)")
    parser.add_argument("--rounds", type=int, default=12, help="rounds, alternating guards checked / skipped")
    parser.add_argument("--steps", type=int, default=8, help="steps a round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = MatrixGameEnv(args.model, device="cpu", fast="compile", dtype=torch.bfloat16, info_frames=False)
    decodes = noted_decodes(env)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    for _ in range(args.warmup):
        env.step(random_actions(env.action_space, rng))
    first_two = sum(seconds for seconds, _ in decodes[:2])
    rates: dict[str, list[float]] = {"checked": [], "skipped": []}
    for r in range(args.rounds):
        mode = "checked" if r % 2 == 0 else "skipped"
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=mode == "skipped"):
            started = time.perf_counter()
            for _ in range(args.steps):
                env.step(random_actions(env.action_space, rng))
            rates[mode].append(args.steps / (time.perf_counter() - started))
    rows = [
        {
            "guards": mode,
            "steps_per_s": round(statistics.median(values), 2),
            "rounds": ", ".join(f"{v:.2f}" for v in values),
        }
        for mode, values in rates.items()
    ]
    print(f"decodes of the first two blocks (the decoder's compile among them): {first_two:.1f} s")
    print(table(rows, ["guards", "steps_per_s", "rounds"]))
    share = 1 - statistics.median(rates["checked"]) / statistics.median(rates["skipped"])
    print(f"the guards' share of a step: {100 * share:.1f} %")
    payload = {
        "environment": environment(),
        "settings": vars(args) | {"out": None if args.out is None else str(args.out)},
        "first_two_decodes_s": round(first_two, 2),
        "rows": rows,
        "guard_share": round(share, 4),
    }
    print("wrote", write_json("guard_cost_cpu", payload, args.out))


if __name__ == "__main__":
    main()
