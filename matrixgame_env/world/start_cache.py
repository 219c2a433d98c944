"""Remembered encodings of start pictures, so that a reset to a picture seen before skips the encoders.

Episodes in RL restart from a handful of pictures (a model's shipped start pictures) thousands of
times, and encoding one (the VAE's image condition, then CLIP) costs far more than the state it
starts: ~1 s of a CPU reset, ~0.1 s of a GPU one. The cache returns the very tensors the encoders
gave the first time. It is keyed by the fitted pixels themselves and by the encoders' weights
(their tensors' identities and in-place version counters), so new or edited weights never reuse
an old encoding.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

Encoding = tuple[torch.Tensor, torch.Tensor]  # per picture: image-condition latents [C, K, h, w], CLIP tokens [L, D]


class StartEncodingCache:
    """The last `capacity` pictures' encodings (least recently used dropped first; 0: off)."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, Encoding] = OrderedDict()
        self._weights: tuple | None = None  # the encoders' weights the entries were made with
        self.hits = 0
        self.misses = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"capacity must be >= 0 (an integer; 0: always encode), got {value!r}")
        self._capacity = value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def encode(
        self,
        pixels: torch.Tensor,
        encoder: Callable[[torch.Tensor], Encoding],
        weights: Iterable[torch.Tensor],
    ) -> Encoding:
        """Encodings of pictures `pixels` [B, 3, H, W]: remembered ones as they were, the others by
        `encoder` (one call for all of them, in their order) -> (latents [B, ...], tokens [B, ...])."""
        version = weights_version(weights) if self.capacity else None
        if version is None:
            return encoder(pixels)
        if version != self._weights:  # new or edited weights: nothing remembered holds any more
            self._entries.clear()
            self._weights = version
        keys = [picture_digest(picture) for picture in pixels]
        missing = list(dict.fromkeys(key for key in keys if key not in self._entries))
        if missing:
            first = {key: keys.index(key) for key in missing}
            latents, tokens = encoder(pixels[[first[key] for key in missing]])
            for j, key in enumerate(missing):  # copies: a row must not keep its whole batch alive
                self._entries[key] = (latents[j].clone(), tokens[j].clone())
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        found = [self._entries[key] for key in keys]
        for key in keys:
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return stack_latents([latent for latent, _ in found]), torch.stack([token for _, token in found])


def stack_latents(latents: list[torch.Tensor]) -> torch.Tensor:
    """Per-picture condition latents [C, K_i, h, w] -> [B, C, max K_i, h, w]; a shorter one repeats
    its last frame, as `ImageLatents` reads every frame beyond its own (the same condition)."""
    frames = max(latent.shape[1] for latent in latents)
    padded = [
        torch.cat([latent, latent[:, -1:].expand(-1, frames - latent.shape[1], -1, -1)], dim=1)
        if latent.shape[1] < frames
        else latent
        for latent in latents
    ]
    return torch.stack(padded)


def picture_digest(picture: torch.Tensor) -> tuple:
    """A key for one picture's exact values (shape, dtype and a hash of its bytes)."""
    data = picture.detach().cpu().contiguous()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    return tuple(data.shape), str(data.dtype), digest


def weights_version(weights: Iterable[torch.Tensor]) -> tuple | None:
    """Changes when any of the tensors is replaced or modified in place (load_state_dict, training);
    None where a tensor keeps no version counter (made under `torch.inference_mode`): not cached."""
    try:
        return tuple((id(w), w.data_ptr(), w._version) for w in weights)
    except RuntimeError:
        return None
