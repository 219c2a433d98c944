"""A DiT's passes through `torch.compile` on the CPU, falling back to the eager module where
compiling fails (no C++ compiler for inductor, an unsupported torch build)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch._dynamo.exc import TorchDynamoException

from ..nn.dit import CausalDiT
from ..nn.fusion import raise_recompile_limit


class CompiledDiT:
    """Calls like the `CausalDiT` it wraps. Its ring caches' writes stay eager (`RingKVCache.update`
    is never traced), so a pass that fails to compile part-way can run again eagerly: it rewrites
    the same block's slots."""

    def __init__(self, model: CausalDiT) -> None:
        raise_recompile_limit()
        self.model = model
        self.failed = False
        self._compiled = torch.compile(model, dynamic=None)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.failed:
            try:
                return self._compiled(*args, **kwargs)
            except TorchDynamoException as error:
                self.failed = True
                first_line = (str(error).strip().splitlines() or [""])[0][:300]
                warnings.warn(
                    f"compiling the DiT failed ({type(error).__name__}: {first_line}); it runs eagerly",
                    stacklevel=2,
                )
        return self.model(*args, **kwargs)
