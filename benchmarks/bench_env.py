"""Environment steps per second with the bundled small model (one step = one block of 12 frames).

  cpu     one MatrixGameEnv on the CPU (threads as given by --threads)
  gpu     MatrixGameVectorEnv with 1..64 worlds in one batch, eager and with CUDA graphs
Both with frame observations (the VAE decoder runs every step) and, with --observations latent,
latent observations (no decoding), side by side; --observations last_only: the last frame of each
block observed and decoded alone (the envs' info_frames=False).

Usage: python benchmarks/bench_env.py [--model doom-small] [--cpu-steps 20] [--gpu-worlds 1 4 16 64]
       [--paths eager graphs compile] [--channels-last off|on|both] [--action-guidance 1 2]
       [--upsample nearest transposed] [--decoder-graphs off|on|both] [--observations last last_only latent]
       [--cpu-paths fast compile_dit compile compile_python] [--cpu-rounds N] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, profile_tables, table, write_json  # noqa: E402

from matrixgame_env.env import MatrixGameEnv  # noqa: E402
from matrixgame_env.nn import triton_norm  # noqa: E402
from matrixgame_env.nn.fusion import enable_fusion, fusion_enabled  # noqa: E402
from matrixgame_env.nn.vae import set_conv3d_mode, set_upsample_mode  # noqa: E402
from matrixgame_env.speed import FAST_PATHS, OBSERVATIONS, graph_counts, random_actions, warm_to_steady  # noqa: E402
from matrixgame_env.vector import MatrixGameVectorEnv  # noqa: E402
from matrixgame_env.world.compiled_decoder import compile_decoder  # noqa: E402

FAST_NAMES = {False: "eager", True: "cuda graphs", "compile": "cuda graphs + compile"}
FAST_OPTIONS = {"eager": False, "graphs": True, "compile": "compile"}  # --paths name -> the envs' `fast`
# --cpu-paths name -> the env's `fast`; "compile_dit" then decodes eagerly (what "compile" did before
# the decoder compiled too); "compile_python": both compiled, the kernels called from Python code
# (inductor's cpp_wrapper off, as before it was on)
CPU_PATHS = {**FAST_PATHS, "compile_dit": "compile", "compile_python": "compile"}


SEEN = {"last": "", "last_only": ", last frame alone decoded", "latent": ", latent observations"}


def observation_name(env) -> str:
    """The --observations name of an env's observation options."""
    return "last_only" if env.observation_mode == "last" and not env.info_frames else env.observation_mode


def cpu_env(model: str, path: str, dtype: str, guidance: float | None, observation: str) -> MatrixGameEnv:
    """The CPU env of a --cpu-paths name, reset; nothing compiled yet (its first steps compile)."""
    env = MatrixGameEnv(
        model,
        device="cpu",
        fast=CPU_PATHS[path],
        action_guidance=guidance,
        dtype=getattr(torch, dtype),
        **OBSERVATIONS[observation],
    )
    if path == "compile_dit":
        compile_decoder(env.world.vae, False)
    if path == "compile_python":
        for compiled in (env.world.sampler._dit, env.world.vae.decoder_runner):
            compiled.options["cpp_wrapper"] = False  # before the first step compiles them
    env.reset(seed=0)
    return env


def timed_steps(env: MatrixGameEnv, steps: int, rng: np.random.Generator) -> list[float]:
    """Seconds of each of `steps` env steps under random actions."""
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        env.step(random_actions(env.action_space, rng))
        times.append(time.perf_counter() - started)
    return times


def cpu_row(env: MatrixGameEnv, path: str, dtype: str, conv3d: str, upsample: str, fused: bool, step_s: float) -> dict:
    """A result row for the CPU env `env` (a --cpu-paths name) that took `step_s` a step."""
    fast = CPU_PATHS[path]
    guidance = env.world.sampler.config.action_guidance
    channels_last = env.world.vae.decoder_channels_last
    observation = observation_name(env)
    layout = ", decoder channels-last" if channels_last else ""
    chains = ", compiled chains" if fused else ""
    seen = SEEN[observation]
    dit = {
        "compile": ", DiT and decoder compiled",
        "compile_dit": ", DiT compiled",
        "compile_python": ", DiT and decoder compiled, Python wrappers",
    }.get(path, "")
    setting = (
        f"cpu single env ({dtype}{dit}, conv3d {conv3d}{layout}{chains}, upsample {upsample}, "
        f"action guidance {guidance:g}{seen})"
    )
    return {
        "setting": setting,
        "observation": observation,
        "dtype": dtype,
        "worlds": 1,
        "step_s": step_s,
        "steps_per_s": 1 / step_s,
        "action_guidance": guidance,
        "upsample": upsample,
        "fast": fast,
        "path": path,
        "channels_last": channels_last,
        "fused_chains": fused,
    }


def cpu_single(
    model: str,
    steps: int,
    warmup: int,
    conv3d: str,
    guidance: float | None = None,
    upsample: str = "auto",
    path: str = "fast",
    dtype: str = "float32",
    fused: bool = False,
    observation: str = "last",
) -> dict:
    set_conv3d_mode(conv3d)
    set_upsample_mode(upsample)
    was_fused = fusion_enabled()
    enable_fusion(fused)
    env = cpu_env(model, path, dtype, guidance, observation)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    timed_steps(env, warmup, rng)
    warmup_s = time.perf_counter() - started
    times = timed_steps(env, steps, rng)
    row = cpu_row(env, path, dtype, conv3d, upsample, fused, statistics.median(times))
    env.close()
    if CPU_PATHS[path] == "compile":
        # Its graphs would stay in Dynamo's caches, whose guards every later compiled env checks first.
        torch._dynamo.reset()
    set_conv3d_mode("auto")
    set_upsample_mode("auto")
    enable_fusion(was_fused)
    return {**row, "warmup_s": warmup_s}


def cpu_side_by_side(
    model: str, paths: list[str], steps: int, rounds: int, warmup: int, dtype: str, observations: list[str]
) -> list[dict]:
    """One CPU env per --cpu-paths name and observation, all built and warmed up first, then timed in
    `rounds` alternating rounds of `steps` steps (the order reversed every other round), so that a
    shared machine's drift falls on every setting alike. A row's step_s is the median of its rounds'
    medians. (Compiled envs share Dynamo's caches: a later one's lookups check the earlier ones'
    guards first, so the order of `paths` favours the first compiled path, slightly.)"""
    envs, warmups, rng = {}, {}, np.random.default_rng(0)
    for setting in itertools.product(dict.fromkeys(paths), dict.fromkeys(observations)):
        envs[setting] = cpu_env(model, setting[0], dtype, None, setting[1])
        started = time.perf_counter()
        timed_steps(envs[setting], warmup, rng)
        warmups[setting] = time.perf_counter() - started
    medians: dict[tuple[str, str], list[float]] = {setting: [] for setting in envs}
    for round_index in range(rounds):
        order = list(envs) if round_index % 2 == 0 else list(reversed(envs))
        for setting in order:
            medians[setting].append(statistics.median(timed_steps(envs[setting], steps, rng)))
    rows = []
    for (path, observation), env in envs.items():
        row = cpu_row(env, path, dtype, "auto", "auto", False, statistics.median(medians[path, observation]))
        rows.append(
            {
                **row,
                "warmup_s": warmups[path, observation],
                "rounds_steps_per_s": [1 / m for m in medians[path, observation]],
            }
        )
        env.close()
    torch._dynamo.reset()
    return rows


def gpu_vector(
    model: str,
    worlds: int,
    fast: bool | str,
    steps: int,
    warmup: int,
    channels_last: bool | None,
    guidance: float | None,
    upsample: str = "auto",
    decoder_graphs: bool | None = None,
    conv3d: str = "auto",
    triton_norms: bool = True,
    dit_kernels: bool | None = None,
    observation: str = "last",
) -> dict:
    """Steps/s of one vector env (`observation` "latent": no decoding);
    `channels_last` None keeps the env's own decoder layout choice;
    `triton_norms` runs the decoder's norms and adds as Triton kernels beside its Triton convolutions;
    `dit_kernels` the DiT's elementwise chains as Triton kernels (nn.triton_dit; not under "compile";
    None: as the env chooses)."""
    set_upsample_mode(upsample)
    set_conv3d_mode(conv3d)
    norms_before = triton_norm.enabled()
    triton_norm.set_enabled(triton_norms)
    env, rng, warmup_steps = warm_vector_env(
        model,
        worlds,
        fast,
        channels_last,
        guidance,
        warmup,
        decoder_graphs=decoder_graphs,
        dit_kernels=dit_kernels,
        observation=observation,
    )
    guidance = env.world.sampler.config.action_guidance
    channels_last = env.world.vae.decoder_channels_last
    decoder_graphs = env.world.decoder_graphs is not None
    triton = env.world.vae.decoder_triton
    fused_norms = triton and triton_norm.enabled()
    dit_kernels = bool(env.world.sampler.dit_kernels) and not fusion_enabled()
    captures_before = graph_captures(env)
    t0 = time.perf_counter()
    for _ in range(steps):
        env.step(random_actions(env.single_action_space, rng, worlds))
    elapsed = time.perf_counter() - t0
    captures_timed = [after - before for after, before in zip(graph_captures(env), captures_before)]
    peak = torch.cuda.max_memory_allocated() / 2**30
    env.close()
    set_upsample_mode("auto")
    set_conv3d_mode("auto")
    triton_norm.set_enabled(norms_before)
    torch.cuda.empty_cache()
    return {
        "setting": f"gpu vector ({FAST_NAMES[fast]}{', decoder channels-last' if channels_last else ''}"
        f"{', decoder graphs' if decoder_graphs else ''}{', Triton norms' if fused_norms else ''}"
        f"{', Triton DiT chains' if dit_kernels else ''}, "
        f"upsample {upsample}, conv3d {conv3d}, "
        f"action guidance {guidance:g}{SEEN[observation]})",
        "observation": observation,
        "worlds": worlds,
        "action_guidance": guidance,
        "upsample": upsample,
        "conv3d": conv3d,
        "decoder_triton": triton,
        "triton_norms": fused_norms,
        "triton_dit": dit_kernels,
        "decoder_graphs": decoder_graphs,
        "step_s": elapsed / steps,
        "steps_per_s": worlds * steps / elapsed,
        "peak_gib": peak,
        "captures_timed": captures_timed,  # [DiT, decoder] CUDA graphs captured inside the timed steps
        "warmup_steps": warmup_steps,
    }


def profile_vector_step(
    model: str,
    worlds: int,
    channels_last: bool | None,
    upsample: str = "auto",
    steps: int = 3,
    conv3d: str = "auto",
    path: str = "compile",
    observation: str = "last",
) -> dict:
    """Where a vector-env step's GPU time goes (`profile_tables`, per step) on one of `FAST_OPTIONS`'
    paths, with CUDA graphs off so that every kernel is seen."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    set_upsample_mode(upsample)
    set_conv3d_mode(conv3d)
    env, rng, _ = warm_vector_env(
        model, worlds, FAST_OPTIONS[path], channels_last, None, 4, graphs=False, observation=observation
    )
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            env.step(random_actions(env.single_action_space, rng, worlds))
        torch.cuda.synchronize()
    env.close()
    set_upsample_mode("auto")
    set_conv3d_mode("auto")
    return {
        "worlds": worlds,
        "path": path,
        "observation": observation,
        "channels_last": env.world.vae.decoder_channels_last,
        "upsample": upsample,
        "conv3d": conv3d,
        **profile_tables(prof, steps),
    }


def graph_captures(env: MatrixGameVectorEnv) -> list[int]:
    """CUDA graphs captured so far by the env's sampler and decoder (0 where there are none)."""
    counts = graph_counts(env.world)
    return [0, 0] if counts is None else list(counts[0])


def warm_vector_env(
    model: str,
    worlds: int,
    fast: bool | str,
    channels_last: bool | None,
    guidance: float | None,
    warmup: int,
    graphs: bool = True,
    decoder_graphs: bool | None = None,
    dit_kernels: bool | None = None,
    observation: str = "last",
) -> tuple[MatrixGameVectorEnv, np.random.Generator, int]:
    """A reset GPU vector env after at least `warmup` steps of random actions (with CUDA graphs, then on
    to steady state: `matrixgame_env.speed.warm_to_steady`), the actions' generator and the warm-up steps taken.
    `channels_last` None keeps the env's decoder layout; `graphs=False` turns CUDA graphs off;
    `decoder_graphs` replays the decoder from CUDA graphs too (`WorldModel.enable_decoder_graphs`);
    `dit_kernels` switches the DiT's Triton chains in its sampler (None: as the env's fast path chose)."""
    env = MatrixGameVectorEnv(
        model, num_envs=worlds, device="cuda", fast=fast, action_guidance=guidance, **OBSERVATIONS[observation]
    )
    if dit_kernels is not None:
        env.world.sampler.dit_kernels = dit_kernels
    if not graphs:
        env.world.sampler.enable_cuda_graphs(False)
    if decoder_graphs is not None:
        env.world.enable_decoder_graphs(decoder_graphs)
    if channels_last is not None:
        env.world.vae.set_decoder_channels_last(channels_last)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    for _ in range(warmup):
        env.step(random_actions(env.single_action_space, rng, worlds))
    taken = warm_to_steady(env.world, lambda: env.step(random_actions(env.single_action_space, rng, worlds)))
    torch.cuda.synchronize()
    return env, rng, warmup + taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the single-env run")
    parser.add_argument("--cpu-steps", type=int, default=20)
    parser.add_argument(
        "--cpu-conv3d",
        nargs="+",
        default=["stacked", "native"],
        choices=["stacked", "native", "onednn", "auto"],
        help="how the VAE's causal convolutions run in the CPU measurement (nn.vae.set_conv3d_mode)",
    )
    parser.add_argument(
        "--cpu-dtypes",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16"],
        help="the CPU env's dtype (the whole model); repeat to alternate",
    )
    parser.add_argument(
        "--cpu-fusion",
        nargs="+",
        default=["off"],
        choices=["off", "on"],
        help="the CPU env's elementwise chains compiled with torch.compile (nn.fusion); repeat to alternate",
    )
    parser.add_argument(
        "--cpu-paths",
        nargs="+",
        default=["fast"],
        choices=list(CPU_PATHS),
        help="the CPU env's fast=False (the standard decoder layout) / True / 'compile' (the DiT and the decoder "
        "compiled) / 'compile_dit' (fast='compile' with the decoder eager) / 'compile_python' (both compiled, "
        "inductor's cpp_wrapper off); repeat to alternate",
    )
    parser.add_argument("--gpu-worlds", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="steps of warm-up at least; GPU vector envs with CUDA graphs then step on until their blocks replay "
        "without captures (matrixgame_env.speed.warm_to_steady)",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["eager", "graphs"],
        choices=["eager", "graphs", "compile"],
        help="GPU speed options to measure (MatrixGameVectorEnv fast=False / True / 'compile')",
    )
    parser.add_argument(
        "--channels-last",
        choices=["auto", "off", "on", "both"],
        default="auto",
        help="run the VAE decoder on channels-last tensors (auto: as the env chooses)",
    )
    parser.add_argument(
        "--action-guidance",
        type=float,
        nargs="+",
        default=[None],
        help="sampler action guidance scales to measure (default: the model's own; 1 is off)",
    )
    parser.add_argument(
        "--upsample",
        nargs="+",
        default=["auto"],
        choices=["auto", "nearest", "transposed"],
        help="how the decoder's upsamplers run (nn.vae.set_upsample_mode); repeat to alternate",
    )
    parser.add_argument(
        "--decoder-graphs",
        choices=["auto", "off", "on", "both"],
        default="auto",
        help="replay the VAE decoder from CUDA graphs (WorldModel.enable_decoder_graphs; auto: as the env chooses)",
    )
    parser.add_argument(
        "--triton-norms",
        choices=["on", "off", "both"],
        default="on",
        help="the decoder's norms and adds as Triton kernels where its convolutions take Triton (nn.triton_norm)",
    )
    parser.add_argument(
        "--triton-dit",
        nargs="+",
        choices=["auto", "on", "off"],
        default=["auto"],
        help="the DiT's elementwise chains as Triton kernels (nn.triton_dit; no effect under 'compile'; auto: "
        "as the env's fast path chooses, on with Triton); repeat to alternate",
    )
    parser.add_argument(
        "--gpu-conv3d",
        nargs="+",
        default=["auto"],
        choices=["auto", "native", "triton"],
        help="how the decoder's causal convolutions run on the GPU (nn.vae.set_conv3d_mode); repeat to alternate",
    )
    parser.add_argument("--profile", action="store_true", help="also profile a GPU step at the largest world count")
    parser.add_argument(
        "--profile-paths",
        nargs="+",
        choices=["eager", "graphs", "compile"],
        default=["compile"],
        help="paths profiled with --profile (CUDA graphs off in each, so that every kernel is seen)",
    )
    parser.add_argument(
        "--observations",
        nargs="+",
        choices=list(OBSERVATIONS),
        default=["last"],
        help="observations measured: frames (the decoder runs), the last frame decoded alone (info_frames=False) "
        "and/or latents (no decoding)",
    )
    parser.add_argument(
        "--cpu-rounds",
        type=int,
        default=0,
        help="side by side: every --cpu-paths env built and warmed first, then timed in this many alternating "
        "rounds of --cpu-steps steps (per dtype, observations alternating too; conv3d, upsample and fusion as "
        "by default)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.cpu_rounds and args.cpu_steps:
        for dtype in args.cpu_dtypes:
            side_rows = cpu_side_by_side(
                args.model, args.cpu_paths, args.cpu_steps, args.cpu_rounds, args.warmup, dtype, args.observations
            )
            for row in side_rows:
                row["threads"] = args.threads
            rows += side_rows
            print(table(side_rows, ["setting", "steps_per_s", "step_s", "threads"]), flush=True)
    for conv3d in args.cpu_conv3d if args.cpu_steps and not args.cpu_rounds else []:
        settings = itertools.product(
            args.action_guidance, args.upsample, args.cpu_dtypes, args.cpu_fusion, args.cpu_paths, args.observations
        )
        for guidance, upsample, dtype, fused, cpu_path, observation in settings:
            row = cpu_single(
                args.model,
                args.cpu_steps,
                args.warmup,
                conv3d,
                guidance,
                upsample,
                cpu_path,
                dtype,
                fused == "on",
                observation,
            )
            rows.append(row)
            rows[-1]["threads"] = args.threads
            print(table(rows[-1:], ["setting", "steps_per_s", "step_s", "threads"]), flush=True)
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        layouts = {"auto": [None], "off": [False], "on": [True], "both": [False, True]}[args.channels_last]
        decoder_graphs = {"auto": [None], "off": [False], "on": [True], "both": [False, True]}[args.decoder_graphs]
        norms = {"on": [True], "off": [False], "both": [False, True]}[args.triton_norms]
        dit_kernels = [{"auto": None, "on": True, "off": False}[choice] for choice in args.triton_dit]
        for worlds in args.gpu_worlds:
            for path in args.paths:
                for channels_last in layouts:
                    settings = itertools.product(
                        args.action_guidance,
                        args.upsample,
                        decoder_graphs,
                        args.gpu_conv3d,
                        norms,
                        dit_kernels,
                        args.observations,
                    )
                    for guidance, upsample, graphed, conv3d, fused_norms, dit_fused, observation in settings:
                        row = gpu_vector(
                            args.model,
                            worlds,
                            FAST_OPTIONS[path],
                            args.gpu_steps,
                            args.warmup,
                            channels_last,
                            guidance,
                            upsample,
                            graphed,
                            conv3d,
                            fused_norms,
                            dit_fused,
                            observation,
                        )
                        print(
                            table(
                                [row],
                                [
                                    "setting",
                                    "worlds",
                                    "steps_per_s",
                                    "step_s",
                                    "peak_gib",
                                    "captures_timed",
                                    "warmup_steps",
                                ],
                            ),
                            flush=True,
                        )
                        rows.append(row)
    print(
        table(
            rows,
            ["setting", "worlds", "steps_per_s", "step_s", "peak_gib", "captures_timed", "warmup_steps", "threads"],
        )
    )
    result = {"environment": environment(), "model": args.model, "rows": rows}
    if args.profile and torch.cuda.is_available():
        layout = {"auto": None, "off": False}.get(args.channels_last, True)
        profiles = []
        for path, observation in itertools.product(args.profile_paths, args.observations):
            profile = profile_vector_step(
                args.model,
                max(args.gpu_worlds),
                layout,
                args.upsample[-1],
                conv3d=args.gpu_conv3d[-1],
                path=path,
                observation=observation,
            )
            profiles.append(profile)
            for view in ("kernels", "operators"):
                print(f"profile: {max(args.gpu_worlds)} worlds, {path}, {observation}, {view} (ms and calls per step)")
                print(table(profile[view], ["name", "ms", "share", "calls"]))
        result["profile"] = profiles[0] if len(profiles) == 1 else profiles
    name = "env_" + (torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else "cpu")
    path = write_json(name, result, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
