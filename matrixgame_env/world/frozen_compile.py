"""A module run through `torch.compile` on the CPU with its weights frozen into the graph, compiled
again when the weights change, and run eagerly where compiling fails (no C++ compiler for
inductor, an unsupported torch build). `CompiledDiT` and `CompiledDecoder` build on it."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._dynamo.exc import TorchDynamoException

from ..nn.fusion import raise_recompile_limit

# Inductor's options: the weights frozen into the compiled graph as constants, so that its matrix
# products and convolutions can be prepacked and autotuned (oneDNN/MKL or inductor's own C++ GEMM
# kernels, the elementwise work after each fused into it), and the code that calls the kernels
# generated as C++ rather than Python (`cpp_wrapper`: about 4 % more env steps a second with frames on
# 2 cores, for 20 s more compiling). Set around each call, not as `torch.compile` options: Dynamo
# reads `freezing` while it traces.
COMPILE_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "cpp_wrapper": True,
}


def identity_guards_only(entries: list[Any]) -> list[bool]:
    """Dynamo's guards to keep for a frozen module's graphs: all but those on the modules' own
    attributes (their types, dicts and constant fields: three in four of a decoder graph's ~1,900
    guards, checked at every call), except the identity checks. The frozen weights' identities
    still tell two models apart and the inputs are still checked; what goes unchecked is a module
    attribute changed after compiling, which these modules do not do (a changed weight is caught by
    `FrozenCompiled.run`)."""
    return [e.guard_type == "ID_MATCH" or not e.orig_guard.source.is_unspecialized_nn_module() for e in entries]


class FrozenCompiled:
    """`module` through `torch.compile` (the first batch size static, then dynamic).

    The compiled graph holds the weights as they were when it compiled; a change to them (loading
    other weights in place, an optimiser step) is noticed at the next `run`, which warns and
    compiles again. Where compiling fails, `run` warns once, sets `failed` and calls the module."""

    def __init__(self, module: nn.Module, name: str) -> None:
        raise_recompile_limit()
        self.module = module
        self.name = name
        self.options = dict(COMPILE_OPTIONS)  # inductor's options for this module's graphs
        self.failed = False
        self._compile()

    def _compile(self) -> None:
        self._compiled = torch.compile(self.module, dynamic=None, options={"guard_filter_fn": identity_guards_only})
        # Listed once: walking the modules each call cost ~0.3 ms. A weight replaced by another
        # tensor object is Dynamo's to notice (its guards hold the weights' identities).
        tensors = (*self.module.parameters(), *self.module.buffers())
        self._tracked = [(t, not t.is_inference()) for t in tensors]
        self._weights = self._weights_fingerprint()

    def _weights_fingerprint(self) -> tuple[tuple[int, int], ...]:
        """Where each weight's data lives and how often it was changed in place (inference tensors,
        made under `torch.inference_mode`, keep no count: their place alone)."""
        return tuple((t.data_ptr(), t._version if counted else 0) for t, counted in self._tracked)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled module's call (compiling first where needed), or the module's own where
        compiling fails."""
        if self._weights_fingerprint() != self._weights:
            warnings.warn(f"the {self.name}'s weights changed since it was compiled; compiling it again", stacklevel=3)
            torch._dynamo.reset()  # the frozen graphs pass Dynamo's guards (same tensors): drop them
            self._compile()
        try:
            with inductor_config.patch(self.options):
                return self._compiled(*args, **kwargs)
        except TorchDynamoException as error:
            self.failed = True
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            warnings.warn(
                f"compiling the {self.name} failed ({type(error).__name__}: {first_line}); it runs eagerly",
                stacklevel=3,
            )
            return self.module(*args, **kwargs)
