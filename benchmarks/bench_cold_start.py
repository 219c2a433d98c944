"""Time from a fresh process to the first frame of an env: what a user waits for after launching.

Each measurement is a new Python process (a new CUDA context, nothing cached in the process), timed
in phases from the moment it was spawned: interpreter and imports (torch, the package), loading the
model folder (`WorldModel.from_pretrained`), the env (`MatrixGameEnv(fast=True)`: the fast path's
settings), `reset` (the start picture through the VAE encoder and CLIP) and the first `step` (one DiT
block and its decode, frames on the host), with the process's peak host memory after loading and after
the first step (and the GPU's allocated peak). `--repeats` processes run one after the other: the
first may read the weights from disk, later ones from the page cache.

The official weights are not downloadable here, so `--random universal` first writes the full-size
universal architecture with random weights in bf16 (about 4.6 GB, our format, with a random start
picture) to a temporary folder and times loading that: the same bytes to read and place as the
real checkpoint converted to our format (any preset's architecture can be given). Otherwise
`--model` names a preset or model folder.

Usage: python benchmarks/bench_cold_start.py [--model doom-small | --random universal] [--device cuda]
       [--dtype auto] [--repeats 3] [--stop-after load] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PHASES = ("imports", "load", "env", "reset", "first_step")
CHILD_FLAG = "--child"


def child(model: str, device: str, dtype_name: str, spawned: float, last_phase: str) -> None:
    """One cold start, timed in phases from `spawned` (the parent's clock when it launched this
    process) up to `last_phase`; prints one JSON line."""
    marks = {"spawned": spawned, "python_up": time.time()}
    import torch

    from matrixgame_env.env import MatrixGameEnv
    from matrixgame_env.world.model import WorldModel

    def mark(name: str) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        marks[name] = time.time()

    mark("imports")
    dtype = None if dtype_name == "auto" else getattr(torch, dtype_name)
    world = WorldModel.from_pretrained(model, device=device, dtype=dtype)
    mark("load")
    host_peak_after_load = peak_resident_gib()
    if last_phase == "load":
        print(json.dumps({"marks": marks, "peak_gib": {"after_load": host_peak_after_load}}))
        return
    env = MatrixGameEnv(model=world, fast=True)
    mark("env")
    env.reset(seed=0)
    mark("reset")
    env.action_space.seed(0)
    frames = env.step(env.action_space.sample())[4]["frames"]
    mark("first_step")
    env.close()
    peaks = {"after_load": host_peak_after_load, "after_first_step": peak_resident_gib()}
    if device == "cuda":
        peaks["gpu_allocated_peak"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps({"marks": marks, "peak_gib": peaks, "frames": list(frames.shape)}))


def peak_resident_gib() -> float:
    """The most host memory this process has held so far (resident set, GiB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_model_folder(preset: str, folder: Path, device: str) -> Path:
    """The architecture of `preset` with random bf16 weights (generated on `device`) and a random start
    picture, written in our format to `folder`."""
    import numpy as np
    import torch
    from common import random_init_
    from PIL import Image

    from matrixgame_env.checkpoints import build_modules, preset_dir, save_model
    from matrixgame_env.model_config import ModelConfig

    config = ModelConfig.load(preset_dir(preset))
    modules = []
    for seed, module in enumerate(build_modules(config, device="meta")):
        module = module.to_empty(device=device)
        random_init_(module, seed, on_device=True)
        modules.append(module.to(torch.bfloat16))
    dit, vae, clip = modules
    vae.latent_mean.zero_()
    vae.latent_std.fill_(1.0)
    height, width = config.video_size
    picture = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(picture).save(folder / "start_0.png")
    config.start_images = ["start_0.png"]
    save_model(folder, config, dit, vae, clip)
    del dit, vae, clip, modules
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def run_child(model: str, device: str, dtype: str = "auto", last_phase: str = PHASES[-1]) -> dict:
    """Spawns one cold start and returns its phases (seconds each, up to `last_phase`), the total from
    spawning to the end of the first step, and the memory peaks."""
    spawned = time.time()
    done = subprocess.run(
        [sys.executable, __file__, CHILD_FLAG, model, device, dtype, repr(spawned), last_phase],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the cold-start process failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    marks = report["marks"]
    row = {"python_up_s": marks["python_up"] - marks["spawned"]}
    previous = marks["python_up"]
    for phase in PHASES[: PHASES.index(last_phase) + 1]:
        row[f"{phase}_s"] = marks[phase] - previous
        previous = marks[phase]
    if "first_step" in marks:
        row["first_frame_s"] = marks["first_step"] - marks["spawned"]
    row.update({f"{name}_peak_gib": value for name, value in report["peak_gib"].items()})
    return row


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == CHILD_FLAG:
        child(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small", help="a preset or model folder")
    parser.add_argument("--random", metavar="PRESET", default=None, help="time this architecture with random weights")
    parser.add_argument("--device", default=None, help="cuda where available, else cpu")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
        help="the model's dtype (auto: bf16 on GPUs, float32 on CPUs)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--stop-after", choices=PHASES[1:], default=PHASES[-1], help="the last phase timed (load: loading alone)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from common import environment, table, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if args.random:
            started = time.perf_counter()
            model = str(random_model_folder(args.random, Path(scratch), device))
            size = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 2**30
            print(f"wrote a random {args.random} model ({size:.2f} GiB) in {time.perf_counter() - started:.1f} s")
        rows = []
        for repeat in range(args.repeats):
            rows.append({"repeat": repeat, **run_child(model, device, args.dtype, args.stop_after)})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    columns = ["repeat", "first_frame_s", "python_up_s", *(f"{phase}_s" for phase in PHASES), "after_load_peak_gib"]
    print(table(rows, columns))
    name = f"random_{args.random}" if args.random else Path(args.model).name
    if args.stop_after != PHASES[-1]:
        name += f"_to_{args.stop_after}"
    if args.dtype != "auto":
        name += f"_{args.dtype}"
    device_name = torch.cuda.get_device_name(0).split()[1].lower() if device == "cuda" else "cpu"
    result = {
        "environment": environment(),
        "model": f"{args.random} architecture, random bf16 weights" if args.random else args.model,
        "device": device,
        "phases": "spawned -> python up -> imports -> load -> env (fast=True) -> reset -> first step (frames on host)",
        "last_phase": args.stop_after,
        "dtype": args.dtype,
        "rows": rows,
    }
    print(f"wrote {write_json(f'cold_start_{name}_{device_name}', result, args.out)}")


if __name__ == "__main__":
    main()
