"""Joining states of worlds that started at different times into one batch.

A step costs one DiT forward per `WorldState`, so a vector env whose worlds reset at different
times would otherwise step one state per reset time. Once a world's caches are full, its absolute
frame index reaches what it computes in two ways only: the rotary position embeddings, which make
attention see offsets between frames, never the frames' own indices; and the image condition,
which is read at the frame index (and is constant after its last distinct frame). So a world can be
moved back in time to a younger world's frame index: its cached keys rotate back by the difference,
its ring slots roll with them, and its image condition is read that many frames further along. It
then steps in one batch with the younger world and computes what it would have computed alone, up
to the rounding of its re-rotated keys (float32 math, stored in the cache's dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..nn.action import ActionCaches
from ..nn.dit import CausalDiT, LayerCaches
from ..nn.rope import Rotation
from ..nn.transfer import to_device
from ..nn.vae_cache import DecoderCache
from .cache import RingKVCache
from .condition import ImageLatents
from .graphs import ring_caches
from .state import WorldState


def can_merge(state: WorldState) -> bool:
    """Whether the state has left its start behind: every ring cache full (so attention spans a whole
    window whatever the frame index) and, when it decodes frames, a decoder cache of steady shapes."""
    if state.frame == 0:
        return False
    if any(cache.end_frame < cache.capacity for cache in ring_caches(state)):
        return False
    return state.decoder_cache is None or not state.decoder_cache.filling()


def merge_states(model: CausalDiT, states: Sequence[WorldState]) -> WorldState:
    """One state holding the worlds of `states` in order, at the youngest state's frame index.

    Each state must pass `can_merge`; all must come from the same sampler (same caches and shapes)
    and either all decode frames or none. The worlds keep their random streams, action histories and
    decoder caches; `WorldState.world_frames` still counts each world's own frames.
    """
    if not states:
        raise ValueError("merge_states needs at least one state")
    _check_mergeable({f"state {i}": state for i, state in enumerate(states)})
    for state in states:
        state.settle_noise()
    target = min(state.frame for state in states)
    shifted = [_moved_to(model, state, target) for state in states]
    return _concatenate(shifted, target)


def absorb(model: CausalDiT, host: WorldState, rows: Sequence[int], guest: WorldState) -> None:
    """Write the worlds of `guest` into rows `rows` of `host`, in place: the host keeps its tensors
    (the addresses its CUDA graphs replay on), and the worlds that held those rows are replaced.

    Both states must pass `can_merge`, with caches and decoder caches of the same shapes per world.
    Whichever of the two is further along moves back to the other's frame index (the host in place).
    The host's context rows are overwritten in place: snapshots of the host share its context, so
    take none that must outlive this (the vector env holds none).
    """
    rows = list(rows)
    if len(rows) != guest.batch_size or len(set(rows)) != len(rows):
        raise ValueError(f"give one distinct host row per guest world: {guest.batch_size} worlds, rows {rows}")
    if rows and (min(rows) < 0 or max(rows) >= host.batch_size):
        raise ValueError(f"host rows must lie in 0..{host.batch_size - 1}, got {rows}")
    _check_mergeable({"the host": host, "the guest": guest})
    host.settle_noise()
    guest.settle_noise()
    if guest.frame < host.frame:
        _move_in_place(model, host, guest.frame)
    guest = _moved_to(model, guest, host.frame)
    index = to_device(torch.tensor(rows, dtype=torch.long), host.device)
    for mine, theirs in zip(ring_caches(host), ring_caches(guest), strict=True):
        if mine.key.shape[1:] != theirs.key.shape[1:]:
            raise ValueError("the states' attention caches differ in shape: not from one sampler?")
        mine.key.index_copy_(0, index, theirs.key)
        mine.value.index_copy_(0, index, theirs.value)
    for mine, theirs in zip(host.context.keys + host.context.values, guest.context.keys + guest.context.values):
        mine.index_copy_(0, index.to(mine.device), theirs.to(mine.device))
    length = max(host.image.latents.shape[2], guest.image.latents.shape[2])
    image = host.image.frames(0, length).clone()  # later frames repeat the last one, so padding is exact
    image.index_copy_(0, index.to(image.device), guest.image.frames(0, length))
    host.image = ImageLatents(image)
    host.keyboard_history = _rows_replaced(host.keyboard_history, index, guest.keyboard_history)
    host.mouse_history = _rows_replaced(host.mouse_history, index, guest.mouse_history)
    for row, generator in zip(rows, guest.generators):
        host.generators[row] = generator
    shift = host.frame_shift or [0] * host.batch_size
    for row, guest_shift in zip(rows, guest.frame_shift or [0] * guest.batch_size):
        shift[row] = guest_shift
    host.frame_shift = shift
    if host.decoder_cache is not None:
        for i, (mine, theirs) in enumerate(zip(host.decoder_cache.slots, guest.decoder_cache.slots)):
            if mine.shape[1:] != theirs.shape[1:]:
                raise ValueError(f"the states' decoder caches differ in slot {i}: {mine.shape} vs {theirs.shape}")
            mine.index_copy_(0, index.to(mine.device), theirs)


def _move_in_place(model: CausalDiT, state: WorldState, frame: int) -> None:
    """`_moved_to` written into the state's own tensors (caches and decoder cache keep their addresses)."""
    moved = _moved_to(model, state, frame)
    for mine, theirs in zip(ring_caches(state), ring_caches(moved)):
        mine.key.copy_(theirs.key)
        mine.value.copy_(theirs.value)
        mine.end_frame, mine.last_write = theirs.end_frame, theirs.last_write
    state.image, state.frame, state.frame_shift = moved.image, moved.frame, moved.frame_shift


def _rows_replaced(tensor: torch.Tensor | None, index: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or rows is None:
        if (tensor is None) != (rows is None):
            raise ValueError("one state has an action history and the other has none")
        return None
    return tensor.index_copy(0, index.to(tensor.device), rows.to(tensor.device))


def _check_mergeable(states: dict[str, WorldState]) -> None:
    for name, state in states.items():
        if not can_merge(state):
            raise ValueError(
                f"{name} (at latent frame {state.frame}) cannot be merged yet: its caches fill "
                "after the first window of frames"
            )
    if len({state.decoder_cache is not None for state in states.values()}) > 1:
        raise ValueError("cannot merge states that decode frames with states that do not")


def _moved_to(model: CausalDiT, state: WorldState, frame: int) -> WorldState:
    """A copy of `state` whose next block is latent frame `frame` (<= state.frame)."""
    delta = frame - state.frame
    if delta == 0:
        return state
    rotations = model.frame_rotations(delta, 1, 1, 1, state.device)  # rotations by delta frames
    caches = []
    for layer in state.caches:
        action = layer.action
        if action is not None:
            action = ActionCaches(
                None if action.mouse is None else _shifted_cache(action.mouse, delta, rotations.action),
                None if action.keyboard is None else _shifted_cache(action.keyboard, delta, rotations.action),
            )
        caches.append(LayerCaches(_shifted_cache(layer.self_attn, delta, rotations.dit), action))
    # The condition of frame f is now read at f + delta: read it from -delta frames further along.
    latents = state.image.latents
    index = torch.arange(-delta, -delta + latents.shape[2]).clamp(max=latents.shape[2] - 1)
    image = ImageLatents(latents.index_select(2, to_device(index, latents.device)))
    shift = state.frame_shift or [0] * state.batch_size
    return WorldState(
        caches=caches,
        context=state.context,
        image=image,
        keyboard_history=state.keyboard_history,
        mouse_history=state.mouse_history,
        generators=state.generators,
        frame=frame,
        decoder_cache=state.decoder_cache,
        frame_shift=[s - delta for s in shift],
    )


def _shifted_cache(cache: RingKVCache, delta: int, rotation: Rotation | None) -> RingKVCache:
    """The cache as it would be had its frames been written `delta` frames later: keys rotated by
    delta frames, and the ring slots rolled so that frame f + delta sits in its own slot."""
    if rotation is None:
        raise ValueError("a cache to shift needs the rotation of its attention")
    axis = cache.frame_axis
    ring = cache.capacity - cache.sink
    start = cache.sink * cache.tokens_per_frame
    length = ring * cache.tokens_per_frame
    shifted = object.__new__(RingKVCache)
    shifted.__dict__.update(cache.__dict__)
    keys = rotation.apply(cache.key)
    # Frame f sits in slot sink + (f - sink) mod ring: moving it to f + delta rolls the ring part.
    roll = (delta % ring) * cache.tokens_per_frame
    shifted.key = _roll_part(keys, axis, start, length, roll)
    shifted.value = _roll_part(cache.value, axis, start, length, roll)
    shifted.end_frame = cache.end_frame + delta
    shifted.last_write = tuple(f + delta for f in cache.last_write)
    return shifted


def _roll_part(tensor: torch.Tensor, axis: int, start: int, length: int, shift: int) -> torch.Tensor:
    part = tensor.narrow(axis, start, length).roll(shift, dims=axis)
    return torch.cat([tensor.narrow(axis, 0, start), part], dim=axis) if start else part.contiguous()


def _concatenate(states: Sequence[WorldState], frame: int) -> WorldState:
    if len(states) == 1:
        return states[0]
    first = states[0]
    caches = []
    for layers in zip(*(state.caches for state in states)):
        action = None
        if layers[0].action is not None:
            action = ActionCaches(
                _cat_caches([layer.action.mouse for layer in layers]),
                _cat_caches([layer.action.keyboard for layer in layers]),
            )
        caches.append(LayerCaches(_cat_caches([layer.self_attn for layer in layers]), action))
    image_length = max(state.image.latents.shape[2] for state in states)
    images = [state.image.frames(0, image_length) for state in states]  # later frames repeat the last
    context = first.context
    return WorldState(
        caches=caches,
        context=type(context)(
            [torch.cat(keys) for keys in zip(*(state.context.keys for state in states))],
            [torch.cat(values) for values in zip(*(state.context.values for state in states))],
        ),
        image=ImageLatents(torch.cat(images)),
        keyboard_history=_cat_optional([state.keyboard_history for state in states]),
        mouse_history=_cat_optional([state.mouse_history for state in states]),
        generators=[g for state in states for g in state.generators],
        frame=frame,
        decoder_cache=_cat_decoder_caches([state.decoder_cache for state in states]),
        frame_shift=[s for state in states for s in (state.frame_shift or [0] * state.batch_size)],
    )


def _cat_caches(caches: list[RingKVCache | None]) -> RingKVCache | None:
    if caches[0] is None:
        return None
    first = caches[0]
    for cache in caches[1:]:
        if cache.key.shape[1:] != first.key.shape[1:] or cache.end_frame != first.end_frame:
            raise ValueError("the states' attention caches differ in shape or position: not from one sampler?")
    joined = object.__new__(RingKVCache)
    joined.__dict__.update(first.__dict__)
    joined.key = torch.cat([cache.key for cache in caches])
    joined.value = torch.cat([cache.value for cache in caches])
    return joined


def _cat_optional(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors)


def _cat_decoder_caches(caches: list[DecoderCache | None]) -> DecoderCache | None:
    if caches[0] is None:
        return None
    slots = []
    for i, slot_group in enumerate(zip(*(cache.slots for cache in caches))):
        shapes = {tuple(slot.shape[1:]) for slot in slot_group}
        if len(shapes) > 1:
            raise ValueError(f"the states' decoder caches differ in slot {i}: {sorted(shapes)}")
        slots.append(torch.cat(slot_group))
    joined = DecoderCache(len(slots), sum(cache.batch_size for cache in caches), caches[0].channels_last)
    joined.slots = [joined.adopt(slot) for slot in slots]
    return joined
