"""Where code makes the host wait for the GPU (a diagnostic for loops that should only queue work)."""

from __future__ import annotations

import collections
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
SYNC_WARNING = "called a synchronizing CUDA operation"  # what torch warns at each wait in "warn" mode


def count_host_waits(work: Callable[[], object], within: Path = PACKAGE_DIR) -> collections.Counter:
    """Runs `work` under torch's CUDA sync debug mode and counts every operation that made the host
    wait for the GPU (implicit syncs such as `.item()` or uploads from pageable memory, and explicit
    ones: a stream's, the device's or an event's synchronisation), keyed "file.py:line:function" by
    the innermost frame of the caller's code under `within` (torch names its own frames; see
    `wait_site`). Empty where CUDA is absent."""
    counts: collections.Counter = collections.Counter()
    if not torch.cuda.is_available():
        work()
        return counts

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if is_host_wait(message):
            counts[wait_site(traceback.extract_stack(), within)] += 1

    event_synchronize = torch.cuda.Event.synchronize

    def synchronize(event: torch.cuda.Event) -> None:  # torch's debug mode does not report these
        counts[wait_site(traceback.extract_stack(), within)] += 1
        event_synchronize(event)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        torch.cuda.Event.synchronize = synchronize
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.Event.synchronize = event_synchronize
    return counts


def is_host_wait(message: object) -> bool:
    """Whether a warning under torch's sync debug mode reports a host wait (not, for instance, torch's
    one-time notice on turning the mode on that it is a prototype, which also speaks of synchronizing)."""
    return SYNC_WARNING in str(message)


def wait_site(stack: traceback.StackSummary, within: Path = PACKAGE_DIR) -> str:
    """The key of one host wait: "file.py:line:function" of the innermost frame under `within`; where
    no frame is, "outside file.py:line:function" of the innermost frame that is not this module's or
    the warnings machinery's (the caller's own code, a finaliser run by the garbage collector), with
    " (thread NAME)" added when the wait came from a thread other than the main one."""
    own = Path(__file__).resolve()
    frames = [f for f in stack if Path(f.filename).resolve() != own and Path(f.filename).name != "warnings.py"]
    inside = [f for f in frames if Path(f.filename).resolve().is_relative_to(within)]
    site = inside[-1] if inside else (frames[-1] if frames else None)
    key = "outside" if site is None else f"{Path(site.filename).name}:{site.lineno}:{site.name}"
    if site is not None and not inside:
        key = f"outside {key}"
    if threading.current_thread() is not threading.main_thread():
        key += f" (thread {threading.current_thread().name})"
    return key
