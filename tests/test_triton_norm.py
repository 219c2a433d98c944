"""The decoder's fused elementwise kernels (`nn.triton_norm`) against float64 references.

As in tests/test_triton_conv.py, Triton's interpreter (TRITON_INTERPRET=1, read when a kernel is
defined) runs the kernels on CPU tensors in a subprocess of their own; bfloat16 and the speed are
GPU matters (tests/test_cuda_graphs.py, benchmarks/)."""

from __future__ import annotations

import pytest
import torch

from matrixgame_env.nn import triton_norm

pytest.importorskip("triton", reason="the kernels' checks need Triton (installed with the dev extras)")

from test_triton_conv import TINY_DECODER, run_interpreted  # noqa: E402  (after the skip: it imports Triton's checks)


def test_norm_silu_joins_the_past_and_matches_float64_for_each_width_and_dtype():
    out = run_interpreted(
        """
        import torch
        from matrixgame_env.nn import triton_norm as tn
        g = torch.Generator().manual_seed(0)
        def reference(past, x, gamma, scale, bias):
            xf = x.double() + (0 if bias is None else bias.double().view(1, -1, 1, 1, 1))
            norm = xf.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
            y = xf / norm * scale * gamma.double().view(1, -1, 1, 1, 1)
            return torch.cat([past.double(), y * torch.sigmoid(y)], dim=2)
        for channels in (16, 24, 96):
            for dtype, relative in ((torch.float32, 2.0**-22), (torch.float16, 2.0**-11)):
                for held, with_bias in ((2, True), (0, False), (2, False)):
                    whole = torch.randn(3, channels, 6, 3, 5, generator=g).to(dtype)
                    whole = whole.contiguous(memory_format=torch.channels_last_3d)
                    x = whole[1:, :, 2:]  # a view: other batch and frame strides, rows still contiguous
                    past = torch.randn(2, channels, held, 3, 5, generator=g).to(dtype)  # standard layout
                    gamma = (1 + 0.1 * torch.randn(channels, 1, 1, 1, generator=g)).to(dtype)
                    bias = torch.randn(channels, generator=g).to(dtype) if with_bias else None
                    scale = channels**0.5
                    assert tn.applies(x)
                    y = tn.past_and_norm_silu(past, x, gamma, scale, bias)
                    ref = reference(past, x, gamma, scale, bias)
                    assert y.shape == ref.shape and y.dtype == dtype
                    assert y.is_contiguous(memory_format=torch.channels_last_3d)
                    assert torch.equal(y[:, :, :held], past)
                    # float32 math, one rounding to the output dtype
                    err = ((y.double() - ref).abs() - ref.abs() * relative).max().item()
                    assert err <= 1e-5, (channels, dtype, held, with_bias, err)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_copy_frames_copies_runs_of_channels_last_frames_exactly_and_anything_else_through_copy():
    out = run_interpreted(
        """
        import torch
        from matrixgame_env.nn import triton_norm as tn
        from matrixgame_env.nn.vae_cache import FeatureCache
        g = torch.Generator().manual_seed(3)
        last = torch.channels_last_3d
        for dtype in (torch.float32, torch.bfloat16):
            for channels, frames, height, width in ((16, 6, 3, 5), (3, 4, 7, 9), (64, 3, 2, 2)):
                whole = torch.randn(3, channels, frames, height, width, generator=g).to(dtype)
                whole = whole.contiguous(memory_format=last)
                kept = whole[:, :, -2:]  # a run of frames: each batch element contiguous, batches apart
                joined = torch.zeros(3, channels, frames + 2, height, width, dtype=dtype).contiguous(memory_format=last)
                assert tn.applies(joined[:, :, :2], kept)
                tn.copy_frames(joined[:, :, :2], kept)
                assert torch.equal(joined[:, :, :2], kept) and not joined[:, :, 2:].any()
                standard = torch.empty(kept.shape, dtype=dtype)  # not channels-last: torch's copy_
                tn.copy_frames(standard, kept)
                assert torch.equal(standard, kept)
                cache = FeatureCache(1, 3)
                cache.keep(0, kept)  # a copy of its own, channels-last
                first = cache.slots[0]
                assert torch.equal(first, kept) and first.data_ptr() != kept.data_ptr()
                assert first.is_contiguous(memory_format=last)
                cache.write_in_place = True
                cache.keep(0, whole[:, :, :2])  # overwritten where it is
                assert cache.slots[0] is first and torch.equal(first, whole[:, :, :2])
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_upsample_nearest2x_equals_torchs_for_channels_last_pictures_and_declines_others():
    out = run_interpreted(
        """
        import torch
        import torch.nn.functional as F
        from matrixgame_env.nn import triton_norm as tn
        g = torch.Generator().manual_seed(4)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for count, channels, height, width in ((3, 16, 3, 5), (2, 3, 4, 1), (1, 64, 2, 3)):
                video = torch.randn(2, channels, count + 1, height, width, generator=g).to(dtype)
                video = video.contiguous(memory_format=torch.channels_last_3d)
                frames = video[1:].transpose(1, 2).flatten(0, 1)[:count]  # channels-last pictures, a view
                up = tn.upsample_nearest2x(frames)
                assert up is not None and up.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(up, F.interpolate(frames, scale_factor=2.0, mode="nearest"))
        assert tn.upsample_nearest2x(torch.randn(2, 4, 3, 5)) is None  # standard layout: torch's kernel
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_bias_add_matches_float64_with_any_of_its_biases():
    out = run_interpreted(
        """
        import torch
        from matrixgame_env.nn import triton_norm as tn
        g = torch.Generator().manual_seed(1)
        for channels, dtype, relative in ((16, torch.float16, 2.0**-11), (40, torch.float32, 2.0**-22)):
            h = torch.randn(2, channels, 3, 4, 5, generator=g).to(dtype)
            h = h.contiguous(memory_format=torch.channels_last_3d)
            skip = torch.randn(3, channels, 3, 4, 5, generator=g).to(dtype)
            skip = skip.contiguous(memory_format=torch.channels_last_3d)[1:]
            for bias, skip_bias in ((True, True), (True, False), (False, True), (False, False)):
                b = torch.randn(channels, generator=g).to(dtype) if bias else None
                sb = torch.randn(channels, generator=g).to(dtype) if skip_bias else None
                ref = h.double() + skip.double()
                for v in (b, sb):
                    if v is not None:
                        ref = ref + v.double().view(1, -1, 1, 1, 1)
                y = tn.bias_add(h, b, skip, sb)
                assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last_3d)
                err = ((y.double() - ref).abs() - ref.abs() * relative).max().item()
                assert err <= 1e-5, (channels, dtype, bias, skip_bias, err)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_decoder_streams_the_same_frames_with_the_fused_kernels():
    out = run_interpreted(
        """
        from matrixgame_env.nn import triton_norm
        vae.set_decoder_triton(True)
        results = {}
        for fused in (False, True):
            triton_norm.set_enabled(fused)
            results[fused] = stream()
        triton_norm.set_enabled(True)
        assert_rounding_apart(results[False], results[True])
        print("ok")
        """,
        prelude=TINY_DECODER,
    )
    assert out.strip().endswith("ok")


def test_decoding_the_last_frames_through_the_fused_kernels_gives_them_and_the_same_cache():
    out = run_interpreted(
        """
        from matrixgame_env.nn import triton_norm
        vae.set_decoder_triton(True)
        joins = []  # (cached frames, new frames) of each fused norm
        norm_silu = triton_norm.past_and_norm_silu
        def spy(past, x, *rest):
            joins.append((past.shape[2], x.shape[2]))
            return norm_silu(past, x, *rest)
        triton_norm.past_and_norm_silu = spy
        two = [torch.cat([z, z.flip(-1)]) for z in latents]  # two worlds: frames sliced per world
        more = torch.randn(2, 16, 1, 1, 2).half()
        caches = [vae.new_decoder_cache(2) for _ in range(2)]
        with torch.no_grad():
            for cache in caches:
                vae.decode_stream(two[0], cache, check_finite=False)
            every = vae.decode_stream(two[1], caches[0], check_finite=False)
            joins.clear()
            last = vae.decode_stream(two[1], caches[1], check_finite=False, last_frames=1)
            # the head reads 3 new frames alone; a layer keeping 7 of 8 frames reads 1 cached one
            assert joins[-1] == (0, 3) and (1, 8) in joins, joins
            assert last.shape == (2, 1, 3, 8, 16), last.shape
            assert (last - every[:, -1:]).abs().max().item() < 1e-3
            for a, b in zip(*(cache.slots for cache in caches)):
                assert (a.float() - b.float()).abs().max().item() < 1e-3
            after = [vae.decode_stream(more, cache, check_finite=False) for cache in caches]
        assert (after[0] - after[1]).abs().max().item() < 1e-3
        print("ok")
        """,
        prelude=TINY_DECODER,
    )
    assert out.strip().endswith("ok")


def test_kernels_take_only_what_they_compute():
    assert triton_norm.enabled()  # on by default
    video = torch.zeros(1, 16, 2, 3, 4).contiguous(memory_format=torch.channels_last_3d)
    if not triton_norm.interpreted():
        assert not triton_norm.applies(video)  # a CPU tensor without the interpreter
    standard = torch.zeros(1, 16, 2, 3, 4)
    assert not triton_norm.applies(standard.cuda() if torch.cuda.is_available() else standard)
    assert not triton_norm.applies(video.double())


def test_bad_kernel_inputs_say_what_is_wrong():
    x = torch.zeros(1, 16, 2, 3, 4).contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(ValueError, match=r"past frames \(1, 8, 2, 3, 4\) do not fit the video \(1, 16, 2, 3, 4\)"):
        triton_norm.past_and_norm_silu(torch.zeros(1, 8, 2, 3, 4), x, torch.ones(16), 4.0)
    with pytest.raises(ValueError, match="gamma and bias need 16 values, got 8 and None"):
        triton_norm.past_and_norm_silu(torch.zeros(1, 16, 2, 3, 4), x, torch.ones(8), 4.0)
    with pytest.raises(ValueError, match=r"the skip \(1, 16, 1, 3, 4\) does not fit the video \(1, 16, 2, 3, 4\)"):
        triton_norm.bias_add(x, None, torch.zeros(1, 16, 1, 3, 4), None)
    with pytest.raises(ValueError, match="a bias needs 16 values, got 3"):
        triton_norm.bias_add(x, torch.zeros(3), torch.zeros_like(x), None)
