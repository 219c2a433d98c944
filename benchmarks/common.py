"""Helpers shared by the benchmark scripts: environment description, timing, tables, JSON."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        **_cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> dict[str, Any]:
    """The CPU's model name and its matrix / bf16 instruction sets, where Linux tells them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = fields.get("flags", "").split()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu_model": fields.get("model name", "unknown"), "cpu_flags": [f for f in wanted if f in flags]}


def noted_decodes(env: Any) -> list[tuple[float, int]]:
    """Wraps an env's world's decode to note each call's seconds and the graphs Dynamo compiled during
    it; returns the list it fills."""
    from torch._dynamo.utils import counters

    world, calls = env.world, []
    decode = world.decode_on_device

    def noted(*args: Any, **kwargs: Any) -> Any:
        graphs = counters["stats"]["unique_graphs"]
        started = time.perf_counter()
        frames = decode(*args, **kwargs)
        calls.append((time.perf_counter() - started, counters["stats"]["unique_graphs"] - graphs))
        return frames

    world.decode_on_device = noted
    return calls


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_init_(model: torch.nn.Module, seed: int = 0, on_device: bool = False) -> None:
    """Random weights at a stable scale: N(0, 1/fan_in) matrices, zero biases, unit norms, small
    modulation tables. Works on meta-built models moved with `to_empty`. Drawn on the CPU, so that
    every device gets the same weights, unless `on_device` (fast on a GPU, other values)."""
    device = next(model.parameters()).device if on_device else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            elif "modulation" in name or "embedding" in name and p.dim() == 3:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator, device=device).to(p))
            else:
                fan_in = p[0].numel()
                std = fan_in**-0.5
                p.copy_((std * torch.randn(p.shape, generator=generator, device=device)).to(p))


def random_world(config, device: str, dtype: torch.dtype = torch.bfloat16):
    """A `WorldModel` of `config` with random weights (`random_init_`) and unit latent statistics."""
    from matrixgame_env.checkpoints import build_modules
    from matrixgame_env.world.model import WorldModel

    modules = []
    for seed, module in enumerate(build_modules(config, device="meta")):
        module = module.to_empty(device=device)
        random_init_(module, seed=seed)
        modules.append(module.to(dtype).eval())
    dit, vae, clip = modules
    vae.latent_mean.zero_()
    vae.latent_std.fill_(1.0)
    return WorldModel(dit, vae, clip, config)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = [max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_json(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def profile_tables(prof, repeats: int, top: int = 30) -> dict[str, list[dict[str, Any]]]:
    """Two views of a `torch.profiler` run of `repeats` equal units of work (blocks, steps), per unit:
    the kernels with the most self CUDA time, and the aten operators with the most CUDA time
    (kernels included), which names the operator behind an anonymous elementwise kernel."""
    averages = list(prof.key_averages())
    # Device events only: operators and compiled-kernel launches also carry their kernels' time.
    kernels = [e for e in averages if e.self_device_time_total > 0 and e.device_type == DeviceType.CUDA]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in kernels) / 1e3 / repeats
    kernel_rows = [{"name": "ALL", "ms": total, "share": 1.0, "calls": None}]
    for e in kernels[:top]:
        ms = e.self_device_time_total / 1e3 / repeats
        kernel_rows.append({"name": e.key[:90], "ms": ms, "share": ms / total, "calls": e.count / repeats})
    ops = [e for e in averages if e.key.startswith("aten::") and e.device_time_total > 0]
    ops.sort(key=lambda e: e.device_time_total, reverse=True)
    op_rows = [
        {
            "name": e.key,
            "ms": e.device_time_total / 1e3 / repeats,
            "share": e.device_time_total / 1e3 / repeats / total,
            "calls": e.count / repeats,
        }
        for e in ops[:top]
    ]
    return {"kernels": kernel_rows, "operators": op_rows}
