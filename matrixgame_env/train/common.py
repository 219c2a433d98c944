"""Training infrastructure shared by every stage: one `TrainRun` per stage, resumable in time-limited sessions.

A stage runs as a series of sessions (e.g. 10-minute calls, each on a fresh machine): each ends by itself
within `--minutes`, saves, and the next one, started with `--resume`, continues exactly where it
stopped. A stage reads like this (see train/vae.py for a complete one)::

    def add_arguments(parser):                                # `matrixgame-env train STAGE` options
        add_session_arguments(parser, batch_size=32)          # --data --model-config --init --out --minutes ...
        add_optimizer_arguments(parser, steps=10_000, lr=3e-4)  # --steps --lr --warmup-steps --ema ...

    def run(args):
        training = TrainRun.from_args(args, "vae")            # OUT/vae/, device, seed; the clock starts here
        config, dit, vae, clip, source = initial_model(args.init, args.model_config)  # CPU, float32
        vae.to(training.device).train()                       # move first, then register
        optimizer = adamw(vae.parameters(), args.lr, args.weight_decay)
        training.add_module("vae", vae, ema_decay=args.ema)   # checkpointed as vae.safetensors (+ .ema)
        training.add_optimizer("vae", optimizer, warmup_cosine(optimizer, args.warmup_steps, args.steps))
        training.resume()                                     # loads the last checkpoint with --resume
        if not training.finished:
            batches = training.batches(dataset, args.batch_size, args.workers)  # continues at training.step
            while training.keep_going():                      # False at --steps or when time is short
                batch = next(batches)
                with training.autocast():                     # bf16 on CUDA, nothing on the CPU
                    loss = ...
                grad_norm = training.optimize(loss)           # backward, clip, step, schedule, zero grads
                training.end_step(loss=loss, grad_norm=grad_norm)  # count, EMA, log, periodic save
            training.save()                                   # every session ends with a checkpoint
        if training.finished:                                 # all --steps done (maybe in an earlier session)
            export_model(training.folder / "model", config, dit, training.weights("vae"), clip, source=source)
        training.close()

Several optimizers (e.g. a generator and a critic): register each by name and call
`optimize(loss, optimizer="critic")`; `end_step` once per step. Anything else to checkpoint goes in
with `add_state(name, obj)`: any object with `state_dict()` / `load_state_dict()` of plain content.

Folder of a stage (`OUT/<stage>/`):
    run.json               the arguments of every session, appended
    log.jsonl              one JSON object per `log_every` steps: step, time (unix), lr, metric means
    checkpoints/latest     JSON {"step", "dir"}: the last complete checkpoint (replaced atomically, last)
    checkpoints/step_00000123/<name>.safetensors, <name>.ema.safetensors, train_state.pt
    model/                 the stage's model folder in our format (`export_model`): vae, dit and distill write it as
                           every session ends, reward once all its steps are done
Only the latest checkpoint is kept. `train_state.pt` holds only tensors, dicts, lists, ints, floats,
strings and None (optimizer and scheduler state dicts, the step, the RNG states) and is read with
`torch.load(weights_only=True)`.

Time: `keep_going()` stops when one more step plus a save no longer fit in `--minutes` (both are
measured; the save time is remembered across sessions). The clock starts when the `TrainRun` is
made, so create it first; work after the loop (exports) should be short or bounded.

Exact resumption: datasets must return the same item for the same index (draw randomness in the
training step from torch's global RNG, which is saved with each checkpoint);
`batches()` orders batches by the seed and the step alone. On the CPU a resumed run is bit-identical
to an uninterrupted one (tested); on CUDA it is up to the nondeterminism of the kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .. import distributed
from ..checkpoints import build_modules, load_model, save_model
from ..model_config import ModelConfig
from ..nn.clip import CLIPVisionEncoder
from ..nn.dit import CausalDiT
from ..nn.vae import WanVAE
from ..weights import load_into, read_state_dict, save_safetensors

STATE_FILE = "train_state.pt"
STATE_FORMAT = 1
LATEST_FILE = "latest"
DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parents[2] / "models" / "doom-small" / "config.json"


class StageError(Exception):
    """A problem with a stage's inputs that the user can fix (the CLI prints it without a traceback)."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


# Arguments


def add_session_arguments(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int,
    data_help: str = "recorded dataset folder (from `matrixgame-env record`)",
    init_help: str | None = None,
) -> None:
    """Options of every stage's session: data, model, output folder, time budget, device, seed, resume.

    With `init_help` the stage needs an existing model (`--init` required, described by it); without,
    it can start a new one from `--model-config`.
    """
    parser.add_argument("--data", required=True, help=data_help)
    if init_help is None:
        parser.add_argument(
            "--model-config",
            default=str(DEFAULT_MODEL_CONFIG),
            help="config.json of a new model (default: the doom-small preset); not used with --init",
        )
        parser.add_argument("--init", default=None, help="model folder to start from (its config and weights)")
    else:
        parser.add_argument("--init", required=True, help=init_help)
    parser.add_argument("--out", required=True, help="output folder; the stage writes OUT/<stage>/")
    parser.add_argument(
        "--minutes", type=float, default=9.0, help="wall-clock budget of this session, saving included (default: 9)"
    )
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--resume", action="store_true", help="continue from what OUT/<stage>/ holds")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4, help="data loader worker processes (0: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_optimizer_arguments(parser: argparse.ArgumentParser, *, steps: int, lr: float, warmup_steps: int = 200) -> None:
    """Options of stages that optimise: schedule, regularisation, EMA, checkpoint and log frequency."""
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps, all sessions (default: {steps})")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak AdamW learning rate (default: {lr})")
    parser.add_argument("--warmup-steps", type=int, default=warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights, e.g. 0.999 (0: no EMA)")
    parser.add_argument("--save-minutes", type=float, default=5.0, help="save a checkpoint this often (default: 5)")
    parser.add_argument("--log-every", type=int, default=25, help="steps between log.jsonl lines")
    parser.add_argument("--stop-after-steps", type=int, default=None, help="end this session after N steps (debugging)")


def existing_dir(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """`path` as a Path, or a StageError naming `what` when it is not a folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise StageError(f"{what} {folder} is not a folder{'; ' + hint if hint else ''}")
    return folder


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: live on a terminal, sparse in a log file."""
    return 0.5 if sys.stderr.isatty() else 30.0


def resolve_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# Optimisation


def adamw(
    parameters: Any, lr: float, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.99)
) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients, fused on CUDA.

    `parameters` is an iterable of tensors, or of parameter-group dicts ({"params": ..., "lr": ...}).
    """
    items = list(parameters)
    if items and isinstance(items[0], dict):
        groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in items]
        groups = [group for group in groups if group["params"]]
    else:
        groups = [{"params": [p for p in items if p.requires_grad]}]
    fused = any(p.is_cuda for group in groups for p in group["params"][:1])
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, final_fraction: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` to the optimizer's lr, then cosine decay to `final_fraction` of it."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers (float32 copies)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        live = module.state_dict()
        # One fused kernel per group of tensors rather than one launch per tensor (hundreds in a DiT).
        torch._foreach_lerp_(list(self.shadow.values()), [live[k].float() for k in self.shadow], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)

    def averaged(self, module: nn.Module) -> nn.Module:
        """A copy of `module` holding the averaged weights (the module itself is left as it is)."""
        copied = copy.deepcopy(module)
        with torch.no_grad():
            for key, value in copied.state_dict().items():
                if key in self.shadow:
                    value.copy_(self.shadow[key])
        return copied


# Data order


class StepBatchSampler(Sampler[list[int]]):
    """Endless batches of indices: epoch e is the permutation drawn from (seed, e), read in order.

    Batch b holds positions [b B, (b + 1) B) of the concatenated epochs, so the batches from step s on
    are the same whether or not the run was interrupted before s. With `ranks` > 1 processes, process
    `rank` gets the rank-th of `ranks` equal consecutive shares of each batch (B must divide evenly).
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, ranks: int = 1
    ) -> None:
        if num_items < 1 or batch_size < 1:
            raise ValueError(f"need at least one item and a batch size of at least 1, got {num_items}, {batch_size}")
        if batch_size % ranks or not 0 <= rank < ranks:
            raise ValueError(f"a batch of {batch_size} does not split into {ranks} equal shares (rank {rank})")
        self.num_items, self.batch_size, self.seed, self.start_batch = num_items, batch_size, seed, start_batch
        self.share = slice(rank * batch_size // ranks, (rank + 1) * batch_size // ranks)

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start_batch * self.batch_size
        epoch, offset = divmod(position, self.num_items)
        order = self._permutation(epoch)
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if offset == self.num_items:
                    epoch, offset = epoch + 1, 0
                    order = self._permutation(epoch)
                batch.append(int(order[offset]))
                offset += 1
            yield batch[self.share]

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)


# RNG state as weights_only-loadable values


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python as tensors, lists and numbers."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": position, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }  # fmt: skip


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# The run


class TrainRun:
    """The folder, clock, checkpoints, log and progress bar of one training stage.

    Register what a checkpoint holds with `add_module`, `add_optimizer` and `add_state`, then call
    `resume()`; the loop is `keep_going()` / `optimize(loss)` / `end_step(**metrics)`, and `save()` at
    the end. `step` counts completed optimizer steps over all sessions.

    Started by torchrun (`torchrun --nproc_per_node=N -m matrixgame_env.cli train STAGE ...`), each
    process makes its own run: `batches()` hands each process its share of every (global) batch, the
    stage calls its trained modules inside `data_parallel(step)`, which averages their gradients
    over the processes (DistributedDataParallel), and every process steps the same weights. Rank 0
    alone writes run.json, log.jsonl (metrics averaged over the processes), checkpoints and the
    model folder; its clock decides when to stop and when to save, so all processes take the same
    steps. Each process draws its own random numbers (rank 0 those of a single-process run), and a
    checkpoint holds every process's random state, so a resumed run continues exactly.

    Args:
        folder: OUT/<stage>/, created.
        total_steps: steps of the whole run; `finished` once they are done.
        minutes: this session's wall-clock budget, counted from construction; the loop stops early
            enough to save within it (one step and one save are reserved, both measured).
        seed: seeds torch, numpy and random (a resumed run restores their saved states instead).
        device: torch device; None picks CUDA when there is one.
        resume: load the last checkpoint of `folder` in `resume()` (a fresh start when there is none).
        stop_after_steps: end this session after that many steps (tests, debugging).
        save_minutes: save a checkpoint this often during the session.
        log_every: steps between log lines (metrics are averaged over them).
        grad_clip: default max gradient norm of `optimize` (0: no clipping).
        progress: show a tqdm bar with the latest metrics.
        settings: the stage's arguments, appended to run.json.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        total_steps: int,
        *,
        minutes: float = math.inf,
        seed: int = 0,
        device: str | torch.device | None = None,
        resume: bool = False,
        stop_after_steps: int | None = None,
        save_minutes: float = 5.0,
        log_every: int = 25,
        grad_clip: float = 1.0,
        progress: bool = True,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.started = time.monotonic()
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.budget_seconds = minutes * 60.0
        self.device = distributed.init(device)  # joins torchrun's processes, if any
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.resume_requested = resume
        self.stop_after_steps = stop_after_steps
        self.save_seconds_interval = save_minutes * 60.0
        self.log_every = max(1, log_every)
        self.grad_clip = grad_clip
        self.show_progress = progress and self.is_main
        self.step = 0
        self.seed = seed
        self._modules: dict[str, tuple[nn.Module, EMA | None]] = {}
        self._optimizers: dict[str, tuple[torch.optim.Optimizer, Any]] = {}
        self._states: dict[str, Stateful] = {}
        self._session_start_step = 0
        self._last_save = time.monotonic()
        self._save_seconds = 0.0  # duration of the slowest save so far (also from earlier sessions)
        self._step_seconds = 0.0  # duration of the slowest recent step
        self._step_started = time.monotonic()
        self._metrics: dict[str, list[torch.Tensor]] = {}
        self._bar: tqdm | None = None
        seed_everything(distributed.seed_for_rank(seed))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # training shapes repeat: pick the fastest kernels once
        if self.is_main:
            self._record_settings(settings or {})

    @classmethod
    def from_args(cls, args: argparse.Namespace, stage: str, **overrides: Any) -> TrainRun:
        """A run in OUT/<stage>/ from `add_session_arguments` + `add_optimizer_arguments` options."""
        options = {
            "minutes": args.minutes,
            "seed": args.seed,
            "device": args.device,
            "resume": args.resume,
            "stop_after_steps": getattr(args, "stop_after_steps", None),
            "save_minutes": args.save_minutes,
            "log_every": args.log_every,
            "grad_clip": args.grad_clip,
            "progress": not args.no_progress,
            "settings": {k: v for k, v in vars(args).items() if not callable(v)},
        }
        options.update(overrides)
        return cls(Path(args.out) / stage, args.steps, **options)

    # Registration

    @property
    def checkpoint_root(self) -> Path:
        return self.folder / "checkpoints"

    def add_module(self, name: str, module: nn.Module, ema_decay: float = 0.0) -> None:
        """Save `module` as <name>.safetensors in checkpoints; with `ema_decay` > 0 keep an EMA of it too."""
        distributed.broadcast_module(module)  # every process starts from rank 0's weights
        ema = EMA(module, ema_decay) if ema_decay > 0 else None
        self._modules[name] = (module, ema)

    def add_optimizer(self, name: str, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        """An optimizer (and its scheduler, stepped after every optimizer step) to checkpoint and drive."""
        self._optimizers[name] = (optimizer, scheduler)

    def add_state(self, name: str, state: Stateful) -> None:
        """Anything else with `state_dict` / `load_state_dict` of weights_only-loadable content."""
        self._states[name] = state

    def data_parallel(self, step: Callable[..., Any], *modules: nn.Module) -> Callable[..., Any]:
        """`step` made data-parallel over `modules` when there are several processes (it is returned as it is
        in a single process): call the trained modules only inside it, once per optimizer step, and
        `optimize` its loss (see `matrixgame_env.distributed.data_parallel`)."""
        return distributed.data_parallel(step, *modules)

    def ema(self, name: str) -> EMA | None:
        return self._modules[name][1]

    def weights(self, name: str, use_ema: bool = True) -> nn.Module:
        """The module to export: an EMA-averaged copy when there is an EMA and `use_ema`, else the module."""
        module, ema = self._modules[name]
        return ema.averaged(module) if (ema is not None and use_ema) else module

    # Session control

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def elapsed(self) -> float:
        """Seconds since this session's run was created."""
        return time.monotonic() - self.started

    def time_left(self) -> float:
        return self.budget_seconds - self.elapsed()

    def keep_going(self) -> bool:
        """Whether to run another step: steps remain, the session's step limit is not reached, and one more
        step plus a save still fit in the time budget. Opens the progress bar on first call."""
        if self._bar is None and self.show_progress:
            self._bar = tqdm(
                total=self.total_steps, initial=self.step, desc=self.folder.name, dynamic_ncols=True,
                mininterval=progress_interval(),
            )  # fmt: skip
        if self.finished:
            return False
        if self.stop_after_steps is not None and self.step - self._session_start_step >= self.stop_after_steps:
            return False
        if distributed.agree(self.time_left() < self._step_seconds + self._save_seconds):
            return False
        self._step_started = time.monotonic()
        return True

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast on CUDA (weights stay float32); nothing on the CPU, where bf16 is slow."""
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield

    def optimize(
        self, loss: torch.Tensor, optimizer: str | None = None, grad_clip: float | None = None
    ) -> torch.Tensor:
        """Backward `loss`, clip the gradient norm of the optimizer's parameters, step it and its scheduler.

        `optimizer` names one registered optimizer (needed when there are several); `grad_clip`
        overrides the run's (0: no clipping). Returns the gradient norm before clipping (a tensor: no sync).
        """
        opt, scheduler = self._optimizers[optimizer or self._only_optimizer()]
        loss.backward()
        parameters = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        limit = self.grad_clip if grad_clip is None else grad_clip
        norm = torch.nn.utils.clip_grad_norm_(parameters, limit if limit > 0 else math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return norm

    def end_step(self, **metrics: float | torch.Tensor) -> None:
        """Count a finished step: update EMAs, collect `metrics`, log every `log_every` steps, save when due."""
        self.step += 1
        for module, ema in self._modules.values():
            if ema is not None:
                ema.update(module)
        for key, value in metrics.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self._metrics.setdefault(key, []).append(value)
        # Slow to forget a slow step: the budget check must not underestimate the next one.
        self._step_seconds = max(0.9 * self._step_seconds, time.monotonic() - self._step_started)
        if self._bar is not None:
            self._bar.update(1)
        if self.step % self.log_every == 0 or self.finished:
            self._flush_metrics()
        if not self.finished and distributed.agree(time.monotonic() - self._last_save >= self.save_seconds_interval):
            self.save()

    def log(self, **values: Any) -> None:
        """Append one line to log.jsonl (step and lr added) and show it in the progress bar (rank 0 only)."""
        if not self.is_main:
            return
        record = {"step": self.step, "time": round(time.time(), 3), **self._learning_rates(), **values}
        with (self.folder / "log.jsonl").open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self._bar is not None:
            self._bar.set_postfix({k: _short(v) for k, v in values.items()}, refresh=False)

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar (rank 0 only)."""
        if self.is_main:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # Data

    def batches(
        self,
        dataset: Dataset,
        batch_size: int,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
    ) -> Iterator[Any]:
        """Endless batches in an order that depends only on the seed and the step (continues at `self.step`).

        `batch_size` is the global batch: with several processes each gets its share of it.
        """
        self.local_batch_size(batch_size)  # checks that it splits evenly
        sampler = StepBatchSampler(len(dataset), batch_size, self.seed, self.step, self.rank, self.world_size)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            # Its own generator: creating the loader must not draw from the global RNG (saved for resume).
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def local_batch_size(self, batch_size: int) -> int:
        """This process's share of a global batch of `batch_size` (a StageError when it does not split evenly)."""
        if batch_size % self.world_size:
            raise StageError(
                f"--batch-size {batch_size} is the global batch, split over {self.world_size} processes: "
                f"give a multiple of {self.world_size}"
            )
        return batch_size // self.world_size

    # Checkpoints

    def save(self) -> Path:
        """Write a checkpoint of everything registered, atomically (the `latest` pointer moves last).

        With several processes every one calls it at the same step; rank 0 writes.
        """
        self._flush_metrics()
        started = time.monotonic()
        name = f"step_{self.step:08d}"
        target = self.checkpoint_root / name
        if self._latest_dir() == target:  # read by every process before rank 0 writes (it waits for all below)
            return target  # nothing has changed since that checkpoint was written
        rank_rngs = distributed.gather_objects(rng_state()) if self.world_size > 1 else None
        if self.is_main:
            partial = self.checkpoint_root / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for module_name, (module, ema) in self._modules.items():
                save_safetensors(module.state_dict(), partial / f"{module_name}.safetensors")
                if ema is not None:
                    save_safetensors(ema.state_dict(), partial / f"{module_name}.ema.safetensors")
            state = {
                "format": STATE_FORMAT,
                "step": self.step,
                "optimizers": {n: opt.state_dict() for n, (opt, _) in self._optimizers.items()},
                "schedulers": {n: s.state_dict() for n, (_, s) in self._optimizers.items() if s is not None},
                "states": {n: s.state_dict() for n, s in self._states.items()},
                "rng": rng_state(),
                "save_seconds": self._save_seconds,
            }
            if rank_rngs is not None:
                state["rank_rngs"] = rank_rngs  # every process's random state, by rank
            torch.save(state, partial / STATE_FILE)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
            _write_text_atomically(self.checkpoint_root / LATEST_FILE, json.dumps({"step": self.step, "dir": name}))
            # Older checkpoints, and any left by a session killed between its rename and the pointer update.
            for old in self.checkpoint_root.glob("step_*"):
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()  # the checkpoint is complete for every process
        self._last_save = time.monotonic()
        self._save_seconds = max(self._save_seconds, self._last_save - started)
        return target

    def resume(self) -> bool:
        """With `resume=True`, load the last checkpoint into everything registered; False when there was none."""
        if not self.resume_requested:
            if self._latest_dir() is not None:
                raise StageError(
                    f"{self.folder} already holds a checkpoint: pass --resume to continue it, or another --out"
                )
            return False
        latest = self._latest_dir()
        if latest is None:
            self.message(f"no checkpoint in {self.folder}: starting from step 0")
            return False
        for module_name, (module, ema) in self._modules.items():
            load_into(module, read_state_dict(latest / f"{module_name}.safetensors"), what=module_name)
            if ema is not None:
                ema_file = latest / f"{module_name}.ema.safetensors"
                ema.load_state_dict(read_state_dict(ema_file) if ema_file.exists() else module.state_dict())
        state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise StageError(f"{latest / STATE_FILE} has format {state.get('format')}, this code reads {STATE_FORMAT}")
        for name, (optimizer, scheduler) in self._optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
            if scheduler is not None:
                scheduler.load_state_dict(state["schedulers"][name])
        for name, stateful in self._states.items():
            stateful.load_state_dict(state["states"][name])
        rank_rngs = state.get("rank_rngs", [])
        if self.world_size > 1 and len(rank_rngs) == self.world_size:
            set_rng_state(rank_rngs[self.rank])
        elif self.is_main:
            set_rng_state(state["rng"])
        else:  # written by another number of processes: a stream of this process's own
            seed_everything(distributed.seed_for_rank(self.seed + int(state["step"])))
        self.step = self._session_start_step = int(state["step"])
        self._save_seconds = float(state.get("save_seconds", 0.0))
        if self.is_main:
            self._truncate_log()
        self.message(f"resumed {self.folder} at step {self.step}")
        return True

    # Internals

    def _latest_dir(self) -> Path | None:
        pointer = self.checkpoint_root / LATEST_FILE
        if not pointer.exists():
            return None
        return self.checkpoint_root / json.loads(pointer.read_text())["dir"]

    def _only_optimizer(self) -> str:
        if len(self._optimizers) != 1:
            raise ValueError(f"name the optimizer to step: registered {sorted(self._optimizers)}")
        return next(iter(self._optimizers))

    def _learning_rates(self) -> dict[str, float]:
        rates = {}
        for name, (optimizer, _) in self._optimizers.items():
            key = "lr" if len(self._optimizers) == 1 else f"lr_{name}"
            rates[key] = float(optimizer.param_groups[0]["lr"])
        return rates

    def _flush_metrics(self) -> None:
        if not self._metrics:
            return
        # Averaged over the processes too (one all-reduce): each saw its share of the global batches.
        means = distributed.mean_over_ranks({key: torch.stack(values).mean() for key, values in self._metrics.items()})
        self._metrics = {}
        self.log(**means)

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint we resume from (the steps will be redone)."""
        path = self.folder / "log.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= self.step]
        _write_text_atomically(path, "".join(line + "\n" for line in kept))

    def _record_settings(self, settings: Mapping[str, Any]) -> None:
        entry = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "settings": _jsonable(settings)}
        if self.world_size > 1:
            entry["processes"] = self.world_size
        path = self.folder / "run.json"
        sessions = json.loads(path.read_text()) if path.exists() else []
        _write_text_atomically(path, json.dumps([*sessions, entry], indent=1) + "\n")


# Model folders


def initial_model(
    init: str | os.PathLike | None, model_config: str | os.PathLike | None = None
) -> tuple[ModelConfig, CausalDiT, WanVAE, CLIPVisionEncoder, Path | None]:
    """(config, dit, vae, clip, source folder) on the CPU in float32: loaded from the model folder `init`,
    or freshly initialised from the config file `model_config` when `init` is None."""
    if init is not None:
        existing_dir(init, "--init", "give a model folder (config.json + safetensors)")
        loaded = load_model(init, device="cpu", dtype=torch.float32)
        return loaded.config, loaded.dit.train(), loaded.vae.train(), loaded.clip.train(), loaded.folder
    if model_config is None:
        raise StageError("give --init MODEL_DIR or --model-config CONFIG_JSON")
    config_path = Path(model_config)
    if not config_path.exists():
        raise StageError(f"--model-config {config_path} does not exist")
    config = ModelConfig.load(config_path)
    dit, vae, clip = build_modules(config, device="cpu")  # PyTorch's default initialisation
    return config, dit, vae, clip, None


def export_model(
    folder: str | os.PathLike,
    config: ModelConfig,
    dit: CausalDiT,
    vae: WanVAE,
    clip: CLIPVisionEncoder,
    *,
    source: Path | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write a complete model folder in our format, replacing `folder` only once it is fully written.

    Start pictures named in `config.start_images` are copied from `source` (the folder the model was
    loaded from) when they are not produced by `extra_files` ({file name: writer(path)}); other files
    of `source` that the config names (e.g. a reward head) are copied too via `config.extra`.
    """
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    extra_files = dict(extra_files or {})
    for name, write in extra_files.items():
        write(partial / name)
    if source is not None:
        for name in [*config.start_images, *_files_named_in_extra(config)]:
            if name not in extra_files and (source / name).is_file():
                shutil.copy2(source / name, partial / name)
    save_model(partial, config, dit, vae, clip)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    return folder


def _files_named_in_extra(config: ModelConfig) -> list[str]:
    """Files that parts shipped with a model (e.g. `extra["reward_head"]["file"]`) name."""
    return [entry["file"] for entry in config.extra.values() if isinstance(entry, dict) and "file" in entry]


# Small helpers


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _logged_step(line: str) -> float:
    """The step of a log line; infinite for a line cut short by a killed session (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v) for k, v in values.items()}


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
