"""torch.distributed for the package: one process per GPU, started by `torchrun`.

    torchrun --nproc_per_node=4 -m matrixgame_env.cli train dit ...     # 4 processes, one GPU each

`init()` joins the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL when the processes compute on GPUs, gloo on the CPU.
Small control messages (decisions, Python objects) always travel over gloo, so that they never
wait for queued GPU work. Without torchrun's environment nothing is initialised and every helper
acts for a single process: rank 0 of 1, barriers and broadcasts return at once, `on_main` just
calls its function, and `data_parallel` returns the step function itself.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

_control_group: Any = None  # gloo group for CPU messages when the default group is NCCL


# Who am I


def launched() -> bool:
    """Whether this process was started by torchrun (or with its environment variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank among all processes (0 in a single process)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """The number of processes (1 in a single process)."""
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK; 0 in a single process)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if launched() else 0


def is_main() -> bool:
    """Rank 0: the process that writes files and talks to the user."""
    return rank() == 0


def local_device(device: str | torch.device | None = None) -> torch.device:
    """This process's device: `device`, where "cuda" (or None on a machine with GPUs) means the GPU of
    this process's local rank when started by torchrun. A single process gets `device` unchanged
    (None: "cuda" when there is a GPU, else "cpu")."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or device.index is not None or not launched():
        return device
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no GPU: pass --device cpu (gloo)")
    index = local_rank()
    if index >= torch.cuda.device_count():
        raise RuntimeError(
            f"local rank {index} has no GPU of its own: {torch.cuda.device_count()} visible; start at most "
            f"{torch.cuda.device_count()} processes per machine (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", index)


# Joining and leaving


def init(device: str | torch.device | None = None) -> torch.device:
    """Join torchrun's process group (once; a no-op in a single process) and return this process's device
    (`local_device(device)`). The backend is NCCL when that device is a GPU, gloo otherwise."""
    device = local_device(device)
    if not launched() or initialized():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(shutdown)
    _control()  # created now, while every process is at the same point
    return device


def shutdown(timeout_s: float = 30.0) -> None:
    """Leave the process group (registered at exit by `init`; safe to call twice).

    The processes first wait for each other (up to `timeout_s`, on the gloo group): a process that
    tears its connections down while another still uses them makes gloo abort that other process.
    """
    global _control_group
    if initialized():
        group = _control_group if _control_group is not None else _gloo_world()
        if group is not None and world_size() > 1:
            try:
                dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s))
            except RuntimeError:
                pass  # another process is gone or stuck: leave anyway
        dist.destroy_process_group()
    _control_group = None


def _gloo_world() -> Any:
    """The default group when it is gloo, else None (a new group cannot be made while leaving)."""
    return dist.group.WORLD if dist.get_backend() == "gloo" else None


def _control() -> Any:
    """The gloo group for CPU tensors and objects: the default group unless that one is NCCL."""
    global _control_group
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _control_group


def communication_device() -> torch.device:
    """Where tensors for the default group's collectives must lie (this GPU with NCCL, else the CPU)."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Control messages (gloo, CPU)


def barrier(timeout: float | None = None) -> None:
    """Wait until every process gets here (up to `timeout` seconds when given, else the group's timeout)."""
    if not initialized():
        return
    if timeout is None:
        dist.barrier(group=_control())
    else:
        dist.monitored_barrier(group=_control(), timeout=datetime.timedelta(seconds=timeout))


def agree(decision: bool) -> bool:
    """Rank 0's `decision`, on every process (so that clocks read by each process cannot split them)."""
    if not initialized():
        return decision
    flag = torch.tensor([int(decision)], dtype=torch.int64)
    dist.broadcast(flag, src=0, group=_control())
    return bool(flag.item())


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on at least one process."""
    if not initialized():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control())
    return bool(value.item())


def broadcast_object(value: T = None) -> T:
    """Rank 0's `value` (any picklable object), on every process."""
    if not initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control())
    return box[0]


def broadcast_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's CPU `tensor`, copied in place into the CPU tensor of the same shape and dtype on every process."""
    if initialized():
        dist.broadcast(tensor, src=0, group=_control())
    return tensor


def gather_rows(array: np.ndarray, counts: list[int], on_device: bool = False) -> np.ndarray | None:
    """Every process's `array` (counts[rank] rows, the same trailing shape everywhere) stacked in rank
    order on rank 0; None on the others. `on_device` sends large arrays over the default group (NCCL
    between GPUs), else they go over gloo."""
    if not initialized():
        return array
    rows = max(counts)
    if rows == 0:
        return array[:0] if is_main() else None
    local = torch.from_numpy(np.ascontiguousarray(array))
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[: len(local)] = local
    group = None if on_device else _control()
    if on_device:
        padded = padded.to(communication_device())
    buffers = [torch.empty_like(padded) for _ in range(world_size())] if is_main() else None
    dist.gather(padded, buffers, dst=0, group=group)
    if not is_main():
        return None
    return np.concatenate([buffer[:count].cpu().numpy() for buffer, count in zip(buffers, counts)])


def gather_objects(value: Any) -> list[Any] | None:
    """Every process's `value` as a list by rank on rank 0; None on the others."""
    if not initialized():
        return [value]
    values = [None] * world_size() if is_main() else None
    dist.gather_object(value, values, dst=0, group=_control())
    return values


def on_main(function: Callable[[], T]) -> T:
    """`function()` run on rank 0 alone; every process returns its result or raises its exception.

    For work that must happen once (reading and writing shared files) before all processes go on.
    """
    if not initialized():
        return function()
    outcome: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            outcome = (True, function())
        except Exception as error:  # handed to every process, which raise it (rank 0 included)
            outcome = (False, error)
    succeeded, value = broadcast_object(outcome)
    if not succeeded:
        raise value
    return value


def seed_for_rank(seed: int) -> int:
    """A different seed per process, derived from `seed`: `seed` itself on rank 0 (and in a single process)."""
    if rank() == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank()]).generate_state(1, np.uint64)[0] % 2**63)


# Numbers over all processes


def mean_over_ranks(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """{name: scalar tensor} -> {name: its mean over all processes} (one all-reduce for all of them)."""
    if not initialized():
        return {key: float(value) for key, value in values.items()}
    device = communication_device()
    stacked = torch.stack([value.detach().float().reshape(()).to(device) for value in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).tolist()))


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into `module` on every process."""
    if not initialized():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        with torch.no_grad():
            if tensor.device == communication_device():
                dist.broadcast(tensor.data, src=0)
            else:  # e.g. a CPU module next to NCCL
                copy = tensor.detach().to(communication_device())
                dist.broadcast(copy, src=0)
                tensor.copy_(copy)


# Data parallelism


class _StepModule(nn.Module):
    """A step function as a module: DistributedDataParallel watches its forward (the whole step) and
    averages the gradients of `parts`, however the function calls them."""

    def __init__(self, function: Callable[..., Any], parts: Iterable[nn.Module]) -> None:
        super().__init__()
        object.__setattr__(self, "function", function)  # not a submodule, even when it is a module's method
        self.parts = nn.ModuleList(parts)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


def data_parallel(function: Callable[..., T], *modules: nn.Module) -> Callable[..., T]:
    """`function`, run under DistributedDataParallel over the parameters of `modules` when there are
    several processes; `function` itself in a single process.

    Call it once per optimizer step for everything that gives `modules` their gradients (the trained
    modules may be called inside it any way: methods other than forward, several forwards, compiled
    code). The following `backward()` then leaves every process with the gradients averaged over
    all processes. Parameters the step does not use keep no gradient, as in a single process.
    """
    if not initialized() or world_size() == 1:
        return function
    return nn.parallel.DistributedDataParallel(
        _StepModule(function, modules),
        device_ids=None,  # the modules are on this process's device already; inputs are left as they are
        find_unused_parameters=True,  # e.g. q/k norms a config switches off
        gradient_as_bucket_view=True,
    )
