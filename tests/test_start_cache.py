"""Remembered start encodings: the same tensors as encoding again, never stale after new weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_model import tiny_model_config, tiny_modules

from matrixgame_env.checkpoints import save_model
from matrixgame_env.world.condition import ImageLatents
from matrixgame_env.world.model import WorldModel
from matrixgame_env.world.start_cache import StartEncodingCache, stack_latents


@pytest.fixture()
def world(tmp_path):
    config = tiny_model_config()
    return WorldModel.from_pretrained(save_model(tmp_path, config, *tiny_modules(config)), device="cpu")


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 80, 3), dtype=np.uint8)


def _encode_without_cache(world: WorldModel, pictures) -> tuple[torch.Tensor, torch.Tensor]:
    capacity = world.start_encodings.capacity
    world.start_encodings.capacity = 0
    try:
        latents, tokens = world.encode_start(pictures)
    finally:
        world.start_encodings.capacity = capacity
    return latents.latents, tokens


def test_a_picture_seen_before_skips_the_encoders_and_gives_the_same_encoding(world, monkeypatch):
    first, first_tokens = world.encode_start(_picture(0))
    calls = []
    encode = world._encode_pictures
    monkeypatch.setattr(world, "_encode_pictures", lambda pixels: calls.append(len(pixels)) or encode(pixels))
    again, again_tokens = world.encode_start(_picture(0))
    assert calls == []  # not encoded again
    assert torch.equal(again.latents, first.latents) and torch.equal(again_tokens, first_tokens)
    assert (world.start_encodings.hits, world.start_encodings.misses) == (1, 1)
    fresh, fresh_tokens = _encode_without_cache(world, _picture(0))
    assert torch.equal(again.latents, fresh) and torch.equal(again_tokens, fresh_tokens)


def test_a_batch_encodes_only_its_new_distinct_pictures_and_keeps_its_order(world, monkeypatch):
    world.encode_start([_picture(1)])
    calls = []
    encode = world._encode_pictures
    monkeypatch.setattr(world, "_encode_pictures", lambda pixels: calls.append(len(pixels)) or encode(pixels))
    pictures = [_picture(2), _picture(1), _picture(2), _picture(3)]
    latents, tokens = world.encode_start(pictures)
    assert calls == [2]  # pictures 2 and 3 once each; 1 remembered
    expected, expected_tokens = _encode_without_cache(world, pictures)
    torch.testing.assert_close(latents.latents, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens, expected_tokens, rtol=0, atol=1e-5)
    assert torch.equal(latents.latents[0], latents.latents[2])
    assert not torch.allclose(latents.latents[0], latents.latents[1])


def test_edited_or_reloaded_weights_are_never_served_an_old_encoding(world):
    before, before_tokens = world.encode_start(_picture(4))
    with torch.no_grad():
        next(world.vae.parameters()).mul_(1.5)  # in place, as training or load_state_dict would
    after, _ = world.encode_start(_picture(4))
    # Compared over the same frames: other weights may reach the encoding's fixed point a frame
    # sooner or later, so the number of distinct frames kept may differ.
    span = max(after.latents.shape[2], before.latents.shape[2])
    assert not torch.allclose(after.frames(0, span), before.frames(0, span))
    assert torch.equal(after.latents, _encode_without_cache(world, _picture(4))[0])
    with torch.no_grad():
        world.clip.patch_embedding.weight.add_(0.1)
    _, tokens = world.encode_start(_picture(4))
    assert not torch.allclose(tokens, before_tokens)
    assert torch.equal(tokens, _encode_without_cache(world, _picture(4))[1])


def test_states_started_from_remembered_encodings_step_like_fresh_ones(world):
    keys = torch.tensor([[1.0, 0, 0, 0]])
    world.start(_picture(5), seed=7)  # remembered from here on
    remembered = world.start(_picture(5), seed=7)
    world.start_encodings.capacity = 0
    fresh = world.start(_picture(5), seed=7)
    for _ in range(2):
        assert torch.equal(world.step(remembered, keys), world.step(fresh, keys))


def test_the_cache_holds_at_most_its_capacity_least_recently_used_out_first():
    cache = StartEncodingCache(capacity=2)
    weights = [torch.zeros(3)]
    calls = []

    def encoder(pixels):
        calls.append(pixels[:, 0, 0, 0].tolist())
        return pixels[:, :, None].repeat(1, 1, 2, 1, 1), pixels.flatten(2)

    def picture(value: float) -> torch.Tensor:
        return torch.full((1, 3, 2, 2), value)

    for value in (1.0, 2.0, 1.0, 3.0):  # 1 used again, so 2 is the one dropped for 3
        cache.encode(picture(value), encoder, weights)
    assert len(cache) == 2
    cache.encode(picture(1.0), encoder, weights)
    cache.encode(picture(2.0), encoder, weights)
    assert calls == [[1.0], [2.0], [3.0], [2.0]]
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        StartEncodingCache(capacity=-1)


def test_latents_of_different_lengths_stack_to_the_same_condition():
    short = torch.randn(4, 2, 3, 5)
    long = torch.randn(4, 5, 3, 5)
    stacked = ImageLatents(stack_latents([short, long]))
    alone = ImageLatents(short[None])
    torch.testing.assert_close(stacked.frames(0, 9)[0], alone.frames(0, 9)[0], rtol=0, atol=0)
    torch.testing.assert_close(stacked.frames(0, 9)[1], ImageLatents(long[None]).frames(0, 9)[0], rtol=0, atol=0)


def test_a_capacity_set_later_is_checked_too():
    cache = StartEncodingCache()
    for bad in (-1, 2.5, True, None):
        with pytest.raises(ValueError, match="capacity must be >= 0"):
            cache.capacity = bad
    assert cache.capacity == 32


def test_weights_without_version_counters_are_encoded_every_time():
    """Weights made under torch.inference_mode keep no version counter, so in-place edits could not
    be seen: nothing is remembered for them."""
    with torch.inference_mode():
        weights = [torch.ones(3)]
    calls = []

    def encoder(pixels):
        calls.append(len(pixels))
        return pixels[:, :, None], pixels.flatten(2)

    cache = StartEncodingCache()
    picture = torch.zeros(1, 3, 2, 2)
    cache.encode(picture, encoder, weights)
    cache.encode(picture, encoder, weights)
    assert calls == [1, 1] and len(cache) == 0


@pytest.mark.parametrize("encoder", ["vae", "clip"])
def test_encodings_are_checked_once_when_made_and_starts_from_them_refuse_nan_weights(world, encoder):
    state = world.start(_picture(5), seed=1)  # checked at encoding, then started without reading them back
    assert state.batch_size == 1
    module = world.vae.encoder if encoder == "vae" else world.clip
    with torch.no_grad():
        next(module.parameters()).fill_(float("nan"))  # new weights: the picture is encoded again
    name = "VAE encoder's image latents" if encoder == "vae" else "CLIP encoder's tokens"
    with pytest.raises(ValueError, match=f"the {name} contain NaN or infinite values"):
        world.start(_picture(5), seed=1)
