"""Aggregate frames per second of the distributed vector env on 1, 2 and 4 GPUs, and the scaling efficiency.

Each GPU runs its own engine for `--worlds-per-gpu` worlds (weak scaling: the worlds grow with the
GPUs) and rank 0 drives a `DistributedVectorEnv` (actions broadcast, frames gathered over NCCL).
Models: the bundled doom-small (96x176) and the full-size official universal architecture (1.6 B
DiT, 352x640) with random weights, both bf16 with the vector env's defaults. Aggregate fps = video frames of all worlds
per second of `step()` on rank 0; scaling efficiency = fps(N GPUs) / (N x fps(1 GPU)). On one GPU
the plain `MatrixGameVectorEnv` is measured too, for the cost of the distributed layer.

    python benchmarks/bench_multi_gpu.py                        # 1, 2, 4 GPUs (as many as there are), both models
    python benchmarks/bench_multi_gpu.py --gpus 1 2 4 8 --models full --full-worlds 8
    python benchmarks/bench_multi_gpu.py --smoke                # CPU, gloo, tiny random model: checks the script

For every N the script starts `torchrun --standalone --nproc_per_node=N` of itself (`--worker`),
then prints the table and writes benchmarks/results/multi_gpu_<gpu>_<models>.json. Runs on the CPU
(`--smoke` or `--device cpu`) are written to /tmp/matrixgame-bench/ unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, random_init_, table, write_json  # noqa: E402

from matrixgame_env import distributed  # noqa: E402
from matrixgame_env.checkpoints import build_modules  # noqa: E402
from matrixgame_env.distributed_vector import DistributedVectorEnv  # noqa: E402
from matrixgame_env.model_config import ModelConfig  # noqa: E402
from matrixgame_env.speed import random_actions  # noqa: E402
from matrixgame_env.vector import MatrixGameVectorEnv  # noqa: E402
from matrixgame_env.world.model import WorldModel  # noqa: E402

MODELS = {
    "small": "the bundled doom-small model (trained weights, 96x176)",
    "full": "the official universal architecture, random weights (1.6 B DiT, 352x640)",
    "tiny": "doom-small's architecture at 16x32, random weights (smoke runs)",
}
CPU_RESULTS = Path(tempfile.gettempdir()) / "matrixgame-bench"


# One process of a torchrun launch


def build_world(name: str, device: torch.device) -> WorldModel:
    """The model `name` on `device`: bf16 on a GPU, float32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "small":
        return WorldModel.from_pretrained("doom-small", device=device, dtype=dtype)
    config = ModelConfig.load(REPO_ROOT / "models" / ("universal" if name == "full" else "doom-small") / "config.json")
    if name == "tiny":
        config.video_size, config.start_images = (16, 32), []
    parts = []
    for seed, module in enumerate(build_modules(config, device="meta")):
        module = module.to_empty(device=device)
        random_init_(module, seed=seed)
        parts.append(module.to(dtype).eval())
    dit, vae, clip = parts
    vae.latent_mean.zero_()
    vae.latent_std.fill_(1.0)
    return WorldModel(dit, vae, clip, config)


def stream(venv: Any, world: WorldModel, steps: int, warmup: int, progress: bool, label: str) -> dict[str, float]:
    """Reset, `warmup` untimed steps, then `steps` timed ones; fps of all worlds together."""
    rng = np.random.default_rng(0)
    picture = None if world.start_image_paths() else rng.integers(0, 256, (*world.video_size, 3), dtype=np.uint8)
    venv.reset(seed=0, options={} if picture is None else {"image": picture})
    for _ in range(warmup):
        venv.step(random_actions(venv.single_action_space, rng, venv.num_envs))
    times, frames = [], 0
    for _ in tqdm(range(steps), desc=label, disable=not progress):
        actions = random_actions(venv.single_action_space, rng, venv.num_envs)
        started = time.perf_counter()
        info = venv.step(actions)[4]  # frames come back to the host: the step is complete
        times.append(time.perf_counter() - started)
        frames += int(info["new_frames"].sum())
    return {"fps": frames / sum(times), "step_ms": 1000 * statistics.median(times), "steps": steps}


def worker(args: argparse.Namespace) -> None:
    device = distributed.init(args.device)
    processes = distributed.world_size()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    description = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    result: dict[str, Any] = {"processes": processes, "devices": distributed.gather_objects(f"{device}: {description}")}
    for name in args.models:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        world = build_world(name, device)
        worlds = getattr(args, f"{name}_worlds") * processes
        venv = DistributedVectorEnv(world, worlds, device=device)
        measured = None
        if venv.is_main:
            label = f"{name} on {processes} process{'es' if processes > 1 else ''}"
            measured = stream(venv, world, args.steps, args.warmup, not args.no_progress, label)
            venv.close()
        else:
            venv.serve()
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        peaks = distributed.gather_objects(peak)
        if venv.is_main:
            measured.update(worlds=worlds, worlds_per_process=worlds // processes, peak_gib_per_process=peaks,
                            cuda_graphs=getattr(world.sampler, "graphs", None) is not None)  # fmt: skip
            if processes == 1:  # the same worlds without the distributed layer
                plain = stream(MatrixGameVectorEnv(world, worlds), world, args.steps, args.warmup, False, "plain")
                measured["plain_vector_env_fps"] = plain["fps"]
            result[name] = measured
        del venv, world
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        distributed.barrier()
    if distributed.is_main():
        Path(args.result).write_text(json.dumps(result, indent=1))


# The launcher


def launch(processes: int, args: argparse.Namespace, device: str, result: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--worker", "--result", str(result), "--device", device, "--models", *args.models,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--small-worlds", str(args.small_worlds),
               "--full-worlds", str(args.full_worlds), "--tiny-worlds", str(args.tiny_worlds)]  # fmt: skip
    if args.no_progress:
        command.append("--no-progress")
    print(f"== {processes} process{'es' if processes > 1 else ''}: {' '.join(command[1:])}", flush=True)
    # One CPU thread per process whatever N is (torchrun sets it for N > 1 only), so the runs compare.
    environment_variables = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": _python_path()}
    subprocess.run(command, check=True, timeout=args.timeout, env=environment_variables)
    return json.loads(result.read_text())


def _python_path() -> str:
    return os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def summarise(runs: dict[int, dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    """One row per model and process count; efficiency against the one-process run of the same model."""
    rows = []
    for name in models:
        single = runs.get(1, {}).get(name)
        for processes, run in sorted(runs.items()):
            measured = run[name]
            peaks = [p for p in measured["peak_gib_per_process"] if p is not None]
            rows.append({
                "model": name,
                "gpus": processes,
                "worlds": measured["worlds"],
                "fps": measured["fps"],
                "fps_per_gpu": measured["fps"] / processes,
                "efficiency": measured["fps"] / (processes * single["fps"]) if single else None,
                "step_ms": measured["step_ms"],
                "peak_gib": max(peaks) if peaks else None,
                "plain_fps": measured.get("plain_vector_env_fps"),
            })  # fmt: skip
    return rows


def versions(device: str) -> dict[str, Any]:
    import gymnasium

    info = environment()
    info.update(gymnasium=gymnasium.__version__, device=device, backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        info["gpus_visible"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        info["driver"] = _driver_version()
    return info


def _driver_version() -> str | None:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="process counts (one GPU each)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small", "full"])
    parser.add_argument("--small-worlds", type=int, default=16, help="worlds per GPU of the small model")
    parser.add_argument("--full-worlds", type=int, default=4, help="worlds per GPU of the full-size model")
    parser.add_argument("--tiny-worlds", type=int, default=2, help="worlds per process of the tiny model")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (blocks of 12 frames)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the 9-frame block included)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is a GPU")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 1 and 2 processes, 2 steps")
    parser.add_argument("--out", type=Path, default=None, help="folder of the JSON (default: see above)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per torchrun launch")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.smoke:
        args.device, args.models, args.gpus, args.steps, args.warmup = "cpu", ["tiny"], [1, 2], 2, 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    available = torch.cuda.device_count() if device == "cuda" else os.cpu_count() or 1
    counts = sorted({n for n in args.gpus if 1 <= n <= available})
    skipped = sorted(set(args.gpus) - set(counts))
    if not counts:
        parser.error(f"--gpus {args.gpus}: this machine has {available} {'GPUs' if device == 'cuda' else 'CPUs'}")
    if skipped:
        print(f"skipping {skipped}: only {available} {'GPUs' if device == 'cuda' else 'CPUs'} here")

    with tempfile.TemporaryDirectory() as scratch:
        runs = {n: launch(n, args, device, Path(scratch) / f"run_{n}.json") for n in counts}
    rows = summarise(runs, args.models)
    print(table(rows, ["model", "gpus", "worlds", "fps", "fps_per_gpu", "efficiency", "step_ms", "peak_gib",
                       "plain_fps"]))  # fmt: skip
    payload = {
        "environment": versions(device),
        "smoke": args.smoke,
        "note": "CPU processes over gloo: checks the script, not GPU figures" if device == "cpu" else None,
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "result", "out")},
        "models": {name: MODELS[name] for name in args.models},
        "skipped_process_counts": skipped,
        "rows": rows,
        "runs": {str(n): run for n, run in runs.items()},
    }
    machine = torch.cuda.get_device_name(0).split()[1].lower() if device == "cuda" else "cpu"
    name = "_".join(["multi_gpu", machine, *args.models, *(["smoke"] if args.smoke else [])])
    path = write_json(name, payload, args.out or (CPU_RESULTS if device == "cpu" else None))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
