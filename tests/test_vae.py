"""Wan VAE: checkpoint layout, agreement with the official outputs, streaming decode, image condition, input checks."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import MANIFEST_DIR, Fixture, load_fixture, max_relative_error

from matrixgame_env.nn.fusion import channel_rms_norm_silu
from matrixgame_env.nn.vae import (
    CausalConv3d,
    DecoderCache,
    Downsample,
    FeatureCache,
    ImageCondition,
    ResidualBlock,
    RMSNorm,
    Upsample,
    WanVAE,
    conv3d_form,
    nearest_conv_as_transposed,
    set_conv3d_mode,
    set_upsample_mode,
)

TOLERANCE = 1e-4
# The same values computed twice in float32 along the same path (skipped chunks, whole vs streamed).
SAME_COMPUTATION_TOLERANCE = 1e-6
# The same values at another batch size: on CPU, oneDNN picks other convolution kernels for other batch
# sizes (a few 1e-6 apart; bit-identical with torch.backends.mkldnn disabled).
OTHER_BATCH_TOLERANCE = 1e-5
# The same values through another memory layout: other oneDNN kernels, other summation orders.
OTHER_LAYOUT_TOLERANCE = 1e-5
# The same values from decoder calls of several latents instead of one: on CPU, oneDNN picks other
# convolution kernels for the longer inputs (a few 1e-6 apart), as for other batch sizes.
OTHER_CHUNKING_TOLERANCE = 1e-5


def _manifest_shapes(name: str) -> dict[str, list[int]]:
    manifest = json.loads((MANIFEST_DIR / f"{name}.json").read_text())
    return {key: entry["shape"] for key, entry in manifest.items()}


def _state_dict_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in module.state_dict().items()}


def _structure(fixture: Fixture) -> dict[str, Any]:
    """The fixture model's structure arguments (no width), in the official spelling."""
    keys = ("z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample")
    return {key: fixture.spec["model"][key] for key in keys}


def _config(fixture: Fixture) -> dict[str, Any]:
    normalisation = fixture.spec["latent_normalisation"]
    return {
        "dim": fixture.spec["model"]["dim"],
        **_structure(fixture),
        "latent_mean": normalisation["mean"],
        "latent_std": normalisation["std"],
    }


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    return load_fixture("vae")


@pytest.fixture(scope="module")
def vae(fixture: Fixture) -> WanVAE:
    """The fixture's reduced-width VAE loaded from its weights, float32 on CPU."""
    model = WanVAE.from_config(_config(fixture))
    model.load_state_dict(fixture.weights(), strict=True)
    return model.eval()


@pytest.fixture(autouse=True)
def default_forms():
    """Every test leaves the process-wide convolution and upsampling forms on "auto"."""
    yield
    set_conv3d_mode("auto")
    set_upsample_mode("auto")


def _image(fixture: Fixture) -> torch.Tensor:
    """The start image as [B, 3, H, W] (stored as [B, 3, 1, H, W])."""
    return fixture.input("image").squeeze(2)


def _zero_frames_after(image: torch.Tensor, num_latent_frames: int, temporal_factor: int) -> torch.Tensor:
    """The official image-condition video: the image then temporal_factor * (F - 1) zero frames."""
    batch, channels, height, width = image.shape
    zeros = image.new_zeros(batch, channels, temporal_factor * (num_latent_frames - 1), height, width)
    return torch.cat([image.unsqueeze(2), zeros], dim=2)


def _latents_per_decode_call(fixture: Fixture, temporal_factor: int) -> list[int]:
    """Latent frames behind each recorded streaming call: 1 + f (n - 1) video frames first, f n later."""
    frames = fixture.spec["decode_streaming"]["frames_per_chunk"]
    return [(frames[0] - 1) // temporal_factor + 1] + [count // temporal_factor for count in frames[1:]]


def _stream(vae: WanVAE, latents: torch.Tensor, sizes: list[int], cache: DecoderCache) -> list[torch.Tensor]:
    outputs, start = [], 0
    for size in sizes:
        outputs.append(vae.decode_stream(latents[:, :, start : start + size], cache))
        start += size
    return outputs


# Checkpoint layout


def test_state_dict_matches_checkpoint_at_official_width(fixture: Fixture) -> None:
    with torch.device("meta"):
        model = WanVAE.from_config({"dim": fixture.spec["model"]["official_dim"], **_structure(fixture)})
    assert _state_dict_shapes(model) == _manifest_shapes("vae")


def test_decoder_part_matches_streaming_decoder_checkpoint(fixture: Fixture) -> None:
    with torch.device("meta"):
        model = WanVAE.from_config({"dim": fixture.spec["model"]["official_dim"], **_structure(fixture)})
    decoder_part = {
        key: shape for key, shape in _state_dict_shapes(model).items() if key.startswith(("decoder.", "conv2."))
    }
    assert decoder_part == _manifest_shapes("vae_decoder_wrapper")


def test_latent_constants_are_buffers_outside_the_state_dict(vae: WanVAE, fixture: Fixture) -> None:
    normalisation = fixture.spec["latent_normalisation"]
    assert torch.equal(vae.latent_mean, torch.tensor(normalisation["mean"]))
    assert torch.equal(vae.latent_std, torch.tensor(normalisation["std"]))
    assert not {"latent_mean", "latent_std"} & set(vae.state_dict())


def test_config_round_trips(vae: WanVAE) -> None:
    rebuilt = WanVAE.from_config(vae.config)
    assert rebuilt.config == vae.config
    assert _state_dict_shapes(rebuilt) == _state_dict_shapes(vae)


def test_unknown_config_key_is_rejected(fixture: Fixture) -> None:
    with pytest.raises(ValueError, match="unknown VAE config keys"):
        WanVAE.from_config({**_config(fixture), "dropout": 0.0})


# Agreement with the official code


def test_encode_image_followed_by_zero_frames_matches_official(vae: WanVAE, fixture: Fixture) -> None:
    expected = fixture.io("encode_img_cond")
    video = _zero_frames_after(_image(fixture), expected.shape[2], vae.temporal_factor)
    assert max_relative_error(vae.encode(video), expected) <= TOLERANCE


def test_encode_random_clip_matches_official(vae: WanVAE, fixture: Fixture) -> None:
    expected = fixture.io("encode_rand_clip")
    assert max_relative_error(vae.encode(fixture.input("rand_clip")), expected) <= TOLERANCE


def test_streaming_decode_matches_official_chunks(vae: WanVAE, fixture: Fixture) -> None:
    sizes = _latents_per_decode_call(fixture, vae.temporal_factor)
    outputs = _stream(vae, fixture.input("latents"), sizes, vae.new_decoder_cache(1))
    names = list(fixture.spec["decode_streaming"]["outputs"])
    assert len(outputs) == len(names)
    for output, name in zip(outputs, names):
        expected = fixture.io(name)
        assert output.shape == expected.shape
        assert max_relative_error(output, expected) <= TOLERANCE, name


def test_full_decode_equals_streaming_chunks(vae: WanVAE, fixture: Fixture) -> None:
    latents = fixture.input("latents")
    sizes = _latents_per_decode_call(fixture, vae.temporal_factor)
    streamed = torch.cat(_stream(vae, latents, sizes, vae.new_decoder_cache(1)), dim=1)
    full = vae.decode(latents)
    assert max_relative_error(full, streamed) <= OTHER_CHUNKING_TOLERANCE
    official = torch.cat([fixture.io(name) for name in fixture.spec["decode_streaming"]["outputs"]], dim=1)
    assert max_relative_error(full, official) <= TOLERANCE


def test_decode_stream_runs_the_latents_after_a_streams_first_in_one_call_with_the_same_frames(
    vae: WanVAE, fixture: Fixture
) -> None:
    latents = fixture.input("latents")[:, :, :5]
    calls: list[int] = []
    decoder = vae.decoder.forward
    vae.decoder.forward = lambda x, cache: (calls.append(x.shape[2]), decoder(x, cache))[1]
    try:
        together, alone = vae.new_decoder_cache(1), vae.new_decoder_cache(1)
        blocks = [vae.decode_stream(latents[:, :, i:j], together) for i, j in ((0, 3), (3, 5))]
        assert calls == [1, 2, 2]  # the first latent alone (its first-chunk rules), then whole calls
        one_by_one = [vae.decode_stream(latents[:, :, i : i + 1], alone) for i in range(5)]
        assert calls[3:] == [1] * 5
        assert max_relative_error(torch.cat(blocks, 1), torch.cat(one_by_one, 1)) <= OTHER_CHUNKING_TOLERANCE
        for kept, reference in zip(together.slots, alone.slots):
            assert max_relative_error(kept, reference) <= OTHER_CHUNKING_TOLERANCE
        together.restart()  # a restarted stream's first latent goes alone again
        calls.clear()
        vae.decode_stream(latents[:, :, :3], together)
        assert calls == [1, 2]
        vae.set_latents_per_decoder_call(2)  # a cap on the activations held at once
        calls.clear()
        capped = vae.new_decoder_cache(1)
        frames = vae.decode_stream(latents, capped)
        assert calls == [1, 2, 2]
        assert max_relative_error(frames, torch.cat(one_by_one, 1)) <= OTHER_CHUNKING_TOLERANCE
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="positive integer or None"):
                vae.set_latents_per_decoder_call(bad)
    finally:
        del vae.decoder.forward
        vae.set_latents_per_decoder_call(None)


def test_decode_stream_frame_counts(vae: WanVAE, fixture: Fixture) -> None:
    latents = fixture.input("latents")
    cache = vae.new_decoder_cache(1)
    first = vae.decode_stream(latents[:, :, :2], cache)
    later = vae.decode_stream(latents[:, :, 2:5], cache)
    height, width = latents.shape[-2] * vae.spatial_factor, latents.shape[-1] * vae.spatial_factor
    assert first.shape == (1, 1 + vae.temporal_factor, 3, height, width)
    assert later.shape == (1, 3 * vae.temporal_factor, 3, height, width)
    assert first.abs().max() <= 1 and later.abs().max() <= 1


@pytest.mark.parametrize("conv3d", ["auto", "native", "stacked"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_decoding_only_the_last_frames_gives_them_computes_less_and_moves_the_cache_on_alike(
    vae: WanVAE, fixture: Fixture, monkeypatch, conv3d: str, channels_last: bool
) -> None:
    latents = torch.cat([fixture.input("latents")] * 2)[:, :, :5]  # two worlds: frames sliced per world
    latents[1] = latents[1].flip(-1)
    set_conv3d_mode(conv3d)
    computed: list[int] = []  # every causal convolution's output frames
    convolve = CausalConv3d._convolve_joined
    monkeypatch.setattr(
        CausalConv3d,
        "_convolve_joined",
        lambda self, joined, *rest: (
            computed.append(joined.shape[2] - self.past_frames),
            convolve(self, joined, *rest),
        )[1],
    )
    real_stacked = CausalConv3d._forward_stacked_taps

    def stacked(self, past, x, cache):
        computed.append(past.shape[2] + x.shape[2] - self.past_frames)
        return real_stacked(self, past, x, cache)

    monkeypatch.setattr(CausalConv3d, "_forward_stacked_taps", stacked)
    vae.set_decoder_channels_last(channels_last)
    try:
        whole, trimmed = vae.new_decoder_cache(2), vae.new_decoder_cache(2)
        for cache in (whole, trimmed):
            vae.decode_stream(latents[:, :, :1], cache)
        computed.clear()
        every = vae.decode_stream(latents[:, :, 1:4], whole)  # 12 frames
        all_work = sum(computed)
        for last in (1, 5):
            probe = trimmed.clone()
            computed.clear()
            kept = vae.decode_stream(latents[:, :, 1:4], probe, last_frames=last)
            assert kept.shape == (2, last, *every.shape[2:])
            assert max_relative_error(kept, every[:, -last:]) <= OTHER_CHUNKING_TOLERANCE
            assert sum(computed) < all_work
            for a, b in zip(probe.slots, whole.slots):
                assert max_relative_error(a, b) <= OTHER_CHUNKING_TOLERANCE
        assert computed[-1] == 5  # the head: only the frames asked for
        vae.decode_stream(latents[:, :, 1:4], trimmed, last_frames=1)
        after_whole = vae.decode_stream(latents[:, :, 4:5], whole)
        after_trimmed = vae.decode_stream(latents[:, :, 4:5], trimmed)
        assert max_relative_error(after_trimmed, after_whole) <= OTHER_CHUNKING_TOLERANCE
        # A stream's first latents: the first goes alone, the second's chunk is trimmed.
        first = vae.decode_stream(latents[:, :, :2], vae.new_decoder_cache(2), last_frames=3)
        reference = vae.decode_stream(latents[:, :, :2], vae.new_decoder_cache(2))
        assert max_relative_error(first, reference[:, -3:]) <= OTHER_CHUNKING_TOLERANCE
        for bad in (0, -2, 1.0, True):
            with pytest.raises(ValueError, match="last_frames must be a positive integer or None"):
                vae.decode_stream(latents[:, :, 4:5], whole, last_frames=bad)
    finally:
        vae.set_decoder_channels_last(False)


# Image condition


def test_encode_image_is_first_latent_of_any_video_starting_with_it(vae: WanVAE, fixture: Fixture) -> None:
    clip = fixture.input("rand_clip")
    latent = vae.encode_image(clip[:, :, 0])
    assert latent.shape[2] == 1
    assert max_relative_error(latent, vae.encode(clip)[:, :, :1]) <= SAME_COMPUTATION_TOLERANCE


def test_image_condition_matches_official_encode(vae: WanVAE, fixture: Fixture) -> None:
    expected = fixture.io("encode_img_cond")
    condition = vae.encode_image_condition(_image(fixture), expected.shape[2])
    assert max_relative_error(condition.latents(expected.shape[2]), expected) <= TOLERANCE


# Long enough to pass the encoder's fixed point (29 zero chunks for this architecture, 30 distinct latents).
LONG_CONDITION_FRAMES = 40


@pytest.fixture(scope="module")
def long_plain_encode(vae: WanVAE, fixture: Fixture) -> torch.Tensor:
    """encode() of the image and every zero frame, the way the official pipeline builds img_cond."""
    return vae.encode(_zero_frames_after(_image(fixture), LONG_CONDITION_FRAMES, vae.temporal_factor))


@pytest.mark.parametrize("num_latent_frames", [15, LONG_CONDITION_FRAMES])
def test_image_condition_equals_encoding_every_zero_frame(
    vae: WanVAE, fixture: Fixture, long_plain_encode: torch.Tensor, num_latent_frames: int
) -> None:
    # The encoder is causal: a shorter plain encode is the start of the long one.
    plain = long_plain_encode[:, :, :num_latent_frames]
    condition = vae.encode_image_condition(_image(fixture), num_latent_frames)
    assert max_relative_error(condition.latents(num_latent_frames), plain) <= SAME_COMPUTATION_TOLERANCE
    assert max_relative_error(condition.frames(3, num_latent_frames), plain[:, :, 3:]) <= SAME_COMPUTATION_TOLERANCE


def test_image_condition_stops_at_fixed_point_and_repeats_its_last_frame(vae: WanVAE, fixture: Fixture) -> None:
    condition = vae.encode_image_condition(_image(fixture), 10 * LONG_CONDITION_FRAMES)
    assert condition.reached_fixed_point
    assert condition.num_distinct < LONG_CONDITION_FRAMES
    last = condition.distinct_latents[:, :, -1:]
    beyond = condition.frames(condition.num_distinct - 1, 10 * LONG_CONDITION_FRAMES)
    assert torch.equal(beyond, last.expand_as(beyond))


def test_image_condition_without_fixed_point_refuses_unknown_frames() -> None:
    condition = ImageCondition(torch.zeros(1, 4, 3, 2, 2), reached_fixed_point=False)
    assert condition.latents(3).shape == (1, 4, 3, 2, 2)
    with pytest.raises(ValueError, match="only 3 latent frames"):
        condition.frames(0, 4)


# Decoder cache


def test_batched_decode_equals_each_world_alone(vae: WanVAE, fixture: Fixture) -> None:
    first = fixture.input("latents")
    second = torch.randn(first.shape, generator=torch.Generator().manual_seed(0))
    sizes = _latents_per_decode_call(fixture, vae.temporal_factor)
    batched = torch.cat(_stream(vae, torch.cat([first, second]), sizes, vae.new_decoder_cache(2)), dim=1)
    for index, latents in enumerate([first, second]):
        alone = torch.cat(_stream(vae, latents, sizes, vae.new_decoder_cache(1)), dim=1)
        assert max_relative_error(batched[index : index + 1], alone) <= OTHER_BATCH_TOLERANCE


def test_cache_clone_restores_identical_frames(vae: WanVAE, fixture: Fixture) -> None:
    latents = fixture.input("latents")
    cache = vae.new_decoder_cache(1)
    vae.decode_stream(latents[:, :, :3], cache)
    snapshot = cache.clone()
    untouched = cache.clone()
    continued = vae.decode_stream(latents[:, :, 3:6], cache)
    assert all(torch.equal(a, b) for a, b in zip(snapshot.slots, untouched.slots))
    replayed = vae.decode_stream(latents[:, :, 3:6], snapshot)
    assert torch.equal(continued, replayed)


@pytest.mark.parametrize("conv3d", ["native", "stacked"])
def test_a_cache_written_in_place_keeps_its_addresses_and_decodes_the_same(
    vae: WanVAE, fixture: Fixture, conv3d: str
) -> None:
    set_conv3d_mode(conv3d)
    latents = fixture.input("latents")
    sizes = _latents_per_decode_call(fixture, vae.temporal_factor)
    expected = _stream(vae, latents, sizes, vae.new_decoder_cache(1))
    cache = vae.new_decoder_cache(1)
    cache.write_in_place = True
    start, addresses, outputs = 0, [], []
    for size in sizes:
        outputs.append(vae.decode_stream(latents[:, :, start : start + size], cache))
        addresses.append([slot.data_ptr() for slot in cache.slots])
        if start == 0:
            snapshot = cache.clone()  # must not see the later in-place writes
            frozen = [slot.clone() for slot in cache.slots]
        start += size
    assert all(a == addresses[0] for a in addresses[1:])  # every slot kept its tensor after the first call
    for output, reference in zip(outputs, expected):
        assert torch.equal(output, reference)
    assert not snapshot.write_in_place
    assert all(torch.equal(a, b) for a, b in zip(snapshot.slots, frozen))


def test_cache_to_copies_even_when_nothing_changes(vae: WanVAE, fixture: Fixture) -> None:
    cache = vae.new_decoder_cache(1)
    vae.decode_stream(fixture.input("latents")[:, :, :3], cache)
    moved = cache.to(vae.device, vae.dtype)
    assert all(a.data_ptr() != b.data_ptr() and torch.equal(a, b) for a, b in zip(cache.slots, moved.slots))


def test_temporal_downsampler_reads_its_past_before_an_in_place_write() -> None:
    torch.manual_seed(0)
    downsampler = Downsample(3, temporal=True).double()
    downsampler.cache_slot = 0
    chunks = [torch.randn(1, 3, frames, 6, 8, dtype=torch.float64) for frames in (1, 4, 4)]
    results = {}
    for in_place in (False, True):
        cache = FeatureCache(1, 1)
        cache.write_in_place = in_place
        results[in_place] = [downsampler(chunk, cache) for chunk in chunks]
    for replaced, overwritten in zip(results[False], results[True]):
        assert torch.equal(replaced, overwritten)


def test_cache_select_and_expand_batch_fork_worlds(vae: WanVAE, fixture: Fixture) -> None:
    first = fixture.input("latents")
    second = torch.randn(first.shape, generator=torch.Generator().manual_seed(1))
    cache = vae.new_decoder_cache(2)
    vae.decode_stream(torch.cat([first, second])[:, :, :3], cache)
    reference = vae.decode_stream(torch.cat([first, second])[:, :, 3:6], cache.clone())

    forked = cache.expand_batch(2)
    assert forked.batch_size == 4
    forked_frames = vae.decode_stream(torch.cat([first, first, second, second])[:, :, 3:6], forked)
    assert max_relative_error(forked_frames[0::2], reference) <= OTHER_BATCH_TOLERANCE
    assert max_relative_error(forked_frames[1::2], reference) <= OTHER_BATCH_TOLERANCE

    kept = cache.select([1])
    assert kept.batch_size == 1
    assert max_relative_error(vae.decode_stream(second[:, :, 3:6], kept), reference[1:]) <= OTHER_BATCH_TOLERANCE


def test_a_channels_last_decoders_cache_keeps_every_slot_in_one_layout(vae: WanVAE, fixture: Fixture) -> None:
    """Slices of joins, stacked taps and forks are kept as new dense channels-last tensors (what a
    compiled decoder's stride guards then meet at every call), holding the same values as a cache
    without a layout of its own."""
    latents = fixture.input("latents")
    sizes = _latents_per_decode_call(fixture, vae.temporal_factor)
    vae.set_decoder_channels_last(True)
    try:
        laid_out, free = vae.new_decoder_cache(1), DecoderCache(vae.decoder.num_cache_slots, 1)
        assert laid_out.channels_last and not free.channels_last
        for conv3d in ("native", "stacked"):
            set_conv3d_mode(conv3d)
            for cache in (laid_out, free):
                cache.restart()
                _stream(vae, latents, sizes, cache)
            for cache in (laid_out, laid_out.clone(), laid_out.select([0, 0]), laid_out.expand_batch(2)):
                for slot in cache.slots:
                    expected = torch.empty(slot.shape, memory_format=torch.channels_last_3d).stride()
                    assert slot.stride() == expected
            assert all(torch.equal(a, b) for a, b in zip(laid_out.slots, free.slots))
            assert any(a.stride() != b.stride() for a, b in zip(laid_out.slots, free.slots))
    finally:
        vae.set_decoder_channels_last(False)


def test_cache_memory_does_not_grow(vae: WanVAE, fixture: Fixture) -> None:
    latents = fixture.input("latents")
    cache = vae.new_decoder_cache(1)

    def layout() -> list[tuple[int, ...] | None]:
        return [None if slot is None else tuple(slot.shape) for slot in cache.slots]

    for block in range(10):
        index = block % latents.shape[2]
        vae.decode_stream(latents[:, :, index : index + 1], cache)
        if block == 2:
            bytes_after_3, layout_after_3 = cache.nbytes, layout()
    assert cache.nbytes == bytes_after_3
    assert layout() == layout_after_3
    assert all(shape is not None and shape[2] == 2 for shape in layout_after_3)


def test_cache_to_changes_dtype(vae: WanVAE, fixture: Fixture) -> None:
    cache = vae.new_decoder_cache(1)
    vae.decode_stream(fixture.input("latents")[:, :, :2], cache)
    doubled = cache.to(dtype=torch.float64)
    assert isinstance(doubled, DecoderCache)
    assert all(slot.dtype == torch.float64 for slot in doubled.slots)
    assert doubled.nbytes == 2 * cache.nbytes


def test_cache_from_another_dtype_is_rejected(vae: WanVAE, fixture: Fixture) -> None:
    latents = fixture.input("latents")
    cache = vae.new_decoder_cache(1)
    vae.decode_stream(latents[:, :, :1], cache)
    with pytest.raises(ValueError, match="cache.to"):
        vae.decode_stream(latents[:, :, 1:2], cache.to(dtype=torch.float64))


# Input checks


def _video(vae: WanVAE, extra_frames: int = 0, channels: int = 3, extra_rows: int = 0) -> torch.Tensor:
    """A valid (or, with the extras, deliberately wrong) video of 2 latent frames at 2x2 latents."""
    size = 2 * vae.spatial_factor
    return torch.zeros(1, channels, 1 + vae.temporal_factor + extra_frames, size + extra_rows, size)


def _with_nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[tensor.numel() // 2] = float("nan")
    return tensor


@pytest.mark.parametrize(
    ("make_video", "message"),
    [
        (lambda vae: _video(vae)[:, :, 0], r"\[B, 3, T, H, W\] \(5 dims\), got shape \(1, 3, \d+, \d+\)"),
        (lambda vae: _video(vae, channels=4), r"3 channels .* got shape \(1, 4,"),
        (lambda vae: _video(vae, extra_rows=vae.spatial_factor // 2), r"multiples of \d+, got \d+x\d+"),
        (lambda vae: _video(vae, extra_frames=-1), r"1 \+ \d+k frames .* got \d+"),
        (lambda vae: _with_nan(_video(vae)), "NaN"),
    ],
    ids=["ndim", "channels", "height", "frames", "nan"],
)
def test_encode_rejects_bad_video(vae: WanVAE, make_video: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vae.encode(make_video(vae))


def test_encode_image_rejects_a_video(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\] \(4 dims\)"):
        vae.encode_image(_video(vae))


def test_image_condition_rejects_zero_frames(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match="num_latent_frames must be at least 1, got 0"):
        vae.encode_image_condition(_video(vae)[:, :, 0], 0)


@pytest.mark.parametrize(
    ("make_latents", "message"),
    [
        (lambda vae: torch.zeros(1, vae.z_dim, 2, 2), r"\[B, z_dim, F, h, w\] \(5 dims\)"),
        (lambda vae: torch.zeros(1, vae.z_dim + 1, 1, 2, 2), r"\d+ channels .* got shape \(1, \d+, 1, 2, 2\)"),
        (lambda vae: _with_nan(torch.zeros(1, vae.z_dim, 1, 2, 2)), "NaN"),
    ],
    ids=["ndim", "channels", "nan"],
)
def test_decode_rejects_bad_latents(vae: WanVAE, make_latents: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vae.decode(make_latents(vae))


def test_decode_stream_rejects_a_cache_of_another_batch_size(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match="batch size 2 but the cache holds 1"):
        vae.decode_stream(torch.zeros(2, vae.z_dim, 1, 2, 2), vae.new_decoder_cache(1))


def test_decode_stream_rejects_a_change_of_latent_size(vae: WanVAE) -> None:
    cache = vae.new_decoder_cache(1)
    vae.decode_stream(torch.zeros(1, vae.z_dim, 1, 2, 2), cache)
    with pytest.raises(ValueError, match=r"latents are \(3, 2\)"):
        vae.decode_stream(torch.zeros(1, vae.z_dim, 1, 3, 2), cache)


# Computation forms and layouts: the same function computed in several ways


@pytest.mark.parametrize(
    ("choose", "mode"),
    [(set_conv3d_mode, "native"), (set_conv3d_mode, "stacked"), (set_conv3d_mode, "onednn"),
     (set_upsample_mode, "nearest"), (set_upsample_mode, "transposed")],
)  # fmt: skip
def test_each_computation_form_reproduces_the_official_stream(vae: WanVAE, fixture: Fixture, choose, mode) -> None:
    choose(mode)
    sizes = _latents_per_decode_call(fixture, vae.temporal_factor)
    outputs = _stream(vae, fixture.input("latents"), sizes, vae.new_decoder_cache(1))
    for output, name in zip(outputs, fixture.spec["decode_streaming"]["outputs"]):
        assert max_relative_error(output, fixture.io(name)) <= TOLERANCE, (mode, name)


@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1)])
def test_stacked_taps_equal_conv3d_in_float64_and_carry_the_same_cache(kernel) -> None:
    torch.manual_seed(0)
    conv = CausalConv3d(5, 7, kernel).double()
    conv.cache_slot = 0
    past = torch.randn(2, 5, 2, 6, 9, dtype=torch.float64)
    for frames in (1, 4):
        x = torch.randn(2, 5, frames, 6, 9, dtype=torch.float64)
        results = {}
        for mode in ("native", "stacked"):
            set_conv3d_mode(mode)
            cache = FeatureCache(1, 2)
            cache.slots[0] = past.clone()
            results[mode] = (conv(x, cache), cache.slots[0])
        (native, native_cache), (stacked, stacked_cache) = results["native"], results["stacked"]
        assert stacked.shape == native.shape == (2, 7, frames, 6, 9)
        torch.testing.assert_close(stacked, native, rtol=0, atol=1e-12)
        assert torch.equal(stacked_cache, native_cache)


@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1)])
def test_onednn_form_equals_conv3d_with_the_same_cache_and_gradients(kernel) -> None:
    torch.manual_seed(0)
    conv = CausalConv3d(5, 7, kernel)
    conv.cache_slot = 0
    past = torch.randn(2, 5, 2, 6, 9)
    x = torch.randn(2, 5, 4, 6, 9, requires_grad=True)
    results = {}
    for mode in ("native", "onednn"):
        set_conv3d_mode(mode)
        cache = FeatureCache(1, 2)
        cache.slots[0] = past.clone()
        x.grad, conv.weight.grad = None, None
        y = conv(x, cache)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[mode] = (y.detach(), cache.slots[0], x.grad.clone(), conv.weight.grad.clone())
    for native, onednn in zip(results["native"], results["onednn"]):
        torch.testing.assert_close(onednn, native, rtol=1e-5, atol=1e-5)


def test_onednn_form_asked_for_a_float64_input_says_what_it_takes() -> None:
    conv = CausalConv3d(2, 2, 3).double()
    conv.cache_slot = 0
    x = torch.randn(1, 2, 1, 4, 4, dtype=torch.float64)
    set_conv3d_mode("auto")  # falls back to stacked taps
    expected = conv(x, FeatureCache(1, 1))
    set_conv3d_mode("native")
    torch.testing.assert_close(expected, conv(x, FeatureCache(1, 1)), rtol=0, atol=1e-12)
    set_conv3d_mode("onednn")
    with pytest.raises(ValueError, match="needs a CPU with oneDNN and a float32 input.*got a torch.float64"):
        conv(x, FeatureCache(1, 1))
    set_conv3d_mode("auto")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_takes_onednn_only_where_this_cpu_has_its_kernels(dtype) -> None:
    supported = {
        torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
        torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
    }[dtype]()
    expected = "onednn" if supported and torch.backends.mkldnn.is_available() else "stacked"
    assert conv3d_form(torch.device("cpu"), dtype) == expected
    conv = CausalConv3d(4, 4, 3).to(dtype)
    conv.cache_slot = 0
    x = torch.randn(1, 4, 2, 5, 5).to(dtype)
    out = conv(x, FeatureCache(1, 1))  # runs in whichever form applies (oneDNN raised on CPUs without fp16)
    reference = F.conv3d(
        F.pad(x.double(), (0, 0, 0, 0, 2, 0)), conv.weight.double(), conv.bias.double(), padding=(0, 1, 1)
    )
    torch.testing.assert_close(out.double(), reference, rtol=2e-2, atol=2e-2)


def test_conv3d_mode_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="native"):
        set_conv3d_mode("fast")


def test_channels_last_decoder_gives_the_same_frames_and_switches_back(vae: WanVAE, fixture: Fixture) -> None:
    latents = fixture.input("latents")
    sizes = _latents_per_decode_call(fixture, vae.temporal_factor)
    standard = _stream(vae, latents, sizes, vae.new_decoder_cache(1))
    try:
        vae.set_decoder_channels_last(True)
        assert vae.decoder_channels_last
        assert vae.decoder.head[2].weight.is_contiguous(memory_format=torch.channels_last_3d)
        channels_last = _stream(vae, latents, sizes, vae.new_decoder_cache(1))
    finally:
        vae.set_decoder_channels_last(False)
    assert vae.decoder.head[2].weight.is_contiguous() and not vae.decoder_channels_last
    for a, b in zip(standard, channels_last):
        assert max_relative_error(b, a) <= OTHER_LAYOUT_TOLERANCE


def test_fused_channels_last_decoder_moves_biases_into_fused_kernels_with_the_same_frames(
    vae: WanVAE, fixture: Fixture, monkeypatch
) -> None:
    from matrixgame_env.nn import fusion
    from matrixgame_env.nn import vae as vae_module

    residual_outputs = []

    def spy(*args):  # the residual blocks' fused output: only reached on the fused path
        residual_outputs.append(fusion.channel_bias_add(*args))
        return residual_outputs[-1]

    monkeypatch.setattr(vae_module, "channel_bias_add", spy)
    set_conv3d_mode("native")  # the fused path runs torch's conv3d, as on GPUs
    latents = fixture.input("latents")
    sizes = _latents_per_decode_call(fixture, vae.temporal_factor)
    standard = _stream(vae, latents, sizes, vae.new_decoder_cache(1))
    assert not residual_outputs
    try:
        vae.set_decoder_channels_last(True)
        fusion.enable_fusion(True)  # compiled on this machine's CPU
        fused = _stream(vae, latents, sizes, vae.new_decoder_cache(1))
    finally:
        fusion.enable_fusion(False)
        vae.set_decoder_channels_last(False)
    # Some CPU layers hand back standard-layout tensors, so not every later block meets a channels-last
    # input here (on GPUs all do); the first blocks of every latent frame run fused.
    residual_blocks = sum(isinstance(m, ResidualBlock) for m in vae.decoder.modules())
    assert sum(sizes) * 3 <= len(residual_outputs) <= residual_blocks * sum(sizes)
    for a, b in zip(standard, fused):
        assert max_relative_error(b, a) <= OTHER_LAYOUT_TOLERANCE


def test_a_normed_convolution_moves_biases_in_any_layout_but_not_with_stacked_taps() -> None:
    conv = CausalConv3d(3, 4, 3)
    conv.cache_slot = 0
    norm = RMSNorm(3)
    x, bias = torch.rand(1, 3, 2, 4, 4), torch.rand(3)
    set_conv3d_mode("native")
    expected = conv(torch.nn.functional.silu(norm(x + bias.view(-1, 1, 1, 1))), FeatureCache(1, 1))
    moved = conv.forward_normed(x, norm, FeatureCache(1, 1), input_bias=bias, add_bias=False)
    torch.testing.assert_close(moved + conv.bias.view(-1, 1, 1, 1), expected, rtol=0, atol=1e-6)
    set_conv3d_mode("stacked")
    with pytest.raises(ValueError, match="not stacked taps"):
        conv.forward_normed(x, norm, FeatureCache(1, 1), add_bias=False)


def test_fusable_norm_silu_chain_equals_norm_then_silu_in_float64() -> None:
    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    x[0, :, 0, 0, 0] = 0.0  # an all-zero position: divided by the norm's floor, not by zero
    expected = torch.nn.functional.silu(norm(x))
    torch.testing.assert_close(channel_rms_norm_silu(x, norm.gamma, norm.scale), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(norm.silu_of(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_norm_silu_joined_after_past_frames_equals_the_concatenation_in_both_layouts(fused: bool) -> None:
    from matrixgame_env.nn import fusion

    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    past = torch.randn(2, 6, 2, 4, 5, dtype=torch.float64)
    expected = torch.cat([past, torch.nn.functional.silu(norm(x))], dim=2)
    fusion.enable_fusion(fused)  # compiled on this machine's CPU when fused
    try:
        standard = channel_rms_norm_silu(x, norm.gamma, norm.scale, past=past)
        last = torch.channels_last_3d
        channels_last = channel_rms_norm_silu(x.to(memory_format=last), norm.gamma, norm.scale, past=past)
    finally:
        fusion.enable_fusion(False)
    torch.testing.assert_close(standard, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(channels_last, expected, rtol=0, atol=1e-14)
    assert channels_last.is_contiguous(memory_format=torch.channels_last_3d)  # what cuDNN's NDHWC kernels take


def test_a_fusable_function_that_cannot_compile_runs_unfused_with_a_warning() -> None:
    from matrixgame_env.nn import fusion

    @fusion.fusable
    def with_graph_break(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()  # fullgraph compilation fails here
        return x * 2

    x = torch.arange(4.0)
    fusion.enable_fusion(True)
    try:
        with pytest.warns(UserWarning, match="with_graph_break failed"):
            first = with_graph_break(x)
        second = with_graph_break(x)  # given up on: no second attempt, no second warning
    finally:
        fusion.enable_fusion(False)
    assert torch.equal(first, x * 2) and torch.equal(second, x * 2)


def test_stacked_taps_accept_inputs_in_any_memory_layout() -> None:
    set_conv3d_mode("stacked")
    conv = CausalConv3d(3, 4, 3)
    conv.cache_slot = 0
    frames = torch.rand(1, 5, 8, 10, 3)  # [B, T, H, W, C] as pictures arrive
    video = frames.permute(0, 4, 1, 2, 3)  # [B, C, T, H, W], a channels-last view
    expected = conv(video.contiguous(), FeatureCache(1, 1))
    torch.testing.assert_close(conv(video, FeatureCache(1, 1)), expected, rtol=0, atol=1e-6)


# Upsamplers: nearest upsampling + 3x3 convolution, or one transposed convolution


@pytest.mark.parametrize("size", [(5, 7), (1, 1), (12, 22)])
def test_transposed_kernel_equals_nearest_upsampling_then_convolution_in_float64(size) -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 6, 3, 3, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    pictures = torch.randn(2, 6, *size, dtype=torch.float64)
    expected = F.conv2d(F.interpolate(pictures, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    transposed = F.conv_transpose2d(pictures, nearest_conv_as_transposed(weight), bias, stride=2, padding=1)
    assert transposed.shape == expected.shape == (2, 3, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(transposed, expected, rtol=0, atol=1e-12)


def test_transposed_kernel_sums_in_float32_for_low_precision_weights() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 4, 3, 3).to(torch.bfloat16)
    merged = nearest_conv_as_transposed(weight)
    assert merged.dtype == torch.bfloat16
    # The centre taps sum four weights: rounded once from their exact float32 sum, not per addition.
    exact = weight.float()[:, :, 0:2, 0:2].sum(dim=(2, 3)).transpose(0, 1)
    assert torch.equal(merged[:, :, 2, 2], exact.to(torch.bfloat16))


def test_transposed_kernel_rejects_other_kernel_sizes() -> None:
    with pytest.raises(ValueError, match="3x3"):
        nearest_conv_as_transposed(torch.zeros(2, 2, 5, 5))


@pytest.mark.parametrize("temporal", [False, True])
def test_upsampler_gives_the_same_frames_and_cache_either_way_in_float64(temporal) -> None:
    torch.manual_seed(0)
    upsampler = Upsample(6, temporal=temporal).double()
    if temporal:
        upsampler.time_conv.cache_slot = 0
    chunks = [torch.randn(2, 6, frames, 5, 7, dtype=torch.float64) for frames in (1, 3, 3)]
    results = {}
    for mode in ("nearest", "transposed"):
        set_upsample_mode(mode)
        cache = FeatureCache(1, 2)
        results[mode] = [upsampler(chunk, cache) for chunk in chunks] + [cache.slots[0]]
    for nearest, transposed in zip(results["nearest"][:-1], results["transposed"][:-1]):
        assert transposed.shape == nearest.shape
        torch.testing.assert_close(transposed, nearest, rtol=0, atol=1e-12)
    if temporal:
        assert torch.equal(results["nearest"][-1], results["transposed"][-1])


def test_transposed_upsampling_accepts_channels_last_pictures() -> None:
    set_upsample_mode("transposed")
    torch.manual_seed(0)
    upsampler = Upsample(4, temporal=False)
    video = torch.randn(1, 4, 2, 6, 8).contiguous(memory_format=torch.channels_last_3d)
    expected = upsampler(video.contiguous(), FeatureCache(1, 1))
    torch.testing.assert_close(upsampler(video, FeatureCache(1, 1)), expected, rtol=0, atol=1e-5)


def test_upsample_mode_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="transposed"):
        set_upsample_mode("bilinear")


def test_a_decoder_narrower_than_the_encoder_keeps_its_width_in_the_config_and_the_weights() -> None:
    torch.manual_seed(0)
    vae = WanVAE(dim=8, decoder_dim=4, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1,
                 temporal_downsample=(False, True), latent_mean=[0.0] * 4, latent_std=[1.0] * 4)  # fmt: skip
    assert vae.decoder_dim == 4 and vae.config["decoder_dim"] == 4 and vae.config["dim"] == 8
    assert vae.encoder.conv1.weight.shape[0] == 8  # full-resolution widths: 8 in, 4 out
    assert vae.decoder.head[2].weight.shape[1] == 4
    rebuilt = WanVAE.from_config(vae.config)
    rebuilt.load_state_dict(vae.state_dict())  # strict: the same tensors of the same shapes
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (1, 4, 3, 4, 4)  # 4x space, 2x time
    torch.testing.assert_close(rebuilt.decode(latents), vae.decode(latents), rtol=0, atol=0)
    assert vae.decode(latents).shape == (1, 5, 3, 16, 16)
    same = WanVAE(dim=8, decoder_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1,
                  temporal_downsample=(False, True), latent_mean=[0.0] * 4, latent_std=[1.0] * 4)  # fmt: skip
    assert "decoder_dim" not in same.config  # configs of one width stay as the official ones are
    with pytest.raises(ValueError, match="decoder_dim must be positive"):
        WanVAE(dim=8, decoder_dim=0)
