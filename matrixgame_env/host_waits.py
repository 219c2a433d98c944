"""Where code makes the host wait for the GPU (a diagnostic for loops that should only queue work)."""

from __future__ import annotations

import collections
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def count_host_waits(work: Callable[[], object], within: Path = PACKAGE_DIR) -> collections.Counter:
    """Runs `work` under torch's CUDA sync debug mode and counts every operation that made the host
    wait for the GPU (implicit syncs such as `.item()` or uploads from pageable memory, and explicit
    ones), keyed "file.py:line:function" by the innermost frame of the caller's code under `within`
    (torch names its own frames). Empty where CUDA is absent."""
    counts: collections.Counter = collections.Counter()
    if not torch.cuda.is_available():
        work()
        return counts

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message).lower():
            return
        frames = [f for f in traceback.extract_stack() if Path(f.filename).resolve().is_relative_to(within)]
        frames = [f for f in frames if Path(f.filename).resolve() != Path(__file__).resolve()]
        site = frames[-1] if frames else None
        counts["outside" if site is None else f"{Path(site.filename).name}:{site.lineno}:{site.name}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return counts
