"""The dtypes a model can run in, by name, for command lines (`--dtype`). Imports torch only when a
name is resolved, so that command lines build their parsers quickly."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--dtype` (one of `DTYPE_NAMES`; default None: bfloat16 on GPUs, float32 on CPUs)."""
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="the model's dtype (default: bfloat16 on GPUs, float32 on CPUs; bfloat16 also runs faster on "
        "CPUs with bf16 instructions, such as avx512_bf16 or AMX, and slower on others)",
    )


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """The torch dtype named `name` (None stays None: the device's default)."""
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)
