"""Host-to-device copies that do not make the host wait for the GPU."""

from __future__ import annotations

import torch

_ASYNC = True


def set_async_uploads(enabled: bool = True) -> None:
    """Process-wide: whether `to_device` stages uploads in pinned memory (default) or makes plain,
    waiting `.to` copies (to measure one against the other)."""
    global _ASYNC
    _ASYNC = bool(enabled)


def async_uploads() -> bool:
    """Whether `to_device` uploads without waiting (`set_async_uploads`)."""
    return _ASYNC


def to_device(
    tensor: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`tensor.to(device, dtype)`, but a CPU tensor bound for a GPU is staged in page-locked memory
    and copied asynchronously on the current stream. A plain `.to` from pageable memory waits for
    every kernel queued before it, so each small upload (actions, indices, rotations) would stall
    the host until the GPU is idle. The staging buffer comes from torch's caching host allocator,
    which does not reuse it before the copy is done. Same values either way."""
    target = tensor.device if device is None else torch.device(device)
    if not _ASYNC or tensor.device.type != "cpu" or target.type != "cuda":
        return tensor.to(device=target, dtype=dtype)
    if dtype is not None:
        tensor = tensor.to(dtype)
    if not tensor.is_pinned():  # (an expanded view too: the staging copy is dense)
        staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        tensor = staged.copy_(tensor)
    return tensor.to(target, non_blocking=True)
