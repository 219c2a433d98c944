"""The DiT's fused elementwise kernels (`nn.triton_dit`) against float64 references and in a DiT.

As in tests/test_triton_conv.py, Triton's interpreter (TRITON_INTERPRET=1, read when a kernel is
defined) runs the kernels on CPU tensors in a subprocess of their own; bfloat16 and the speed are
GPU matters (tests/test_cuda_graphs.py, benchmarks/)."""

from __future__ import annotations

import pytest
import torch

from matrixgame_env.nn import fusion, triton_dit

pytest.importorskip("triton", reason="the kernels' checks need Triton (installed with the dev extras)")

from test_triton_conv import run_interpreted  # noqa: E402  (after the skip: it imports Triton's checks)

# For interpreted processes: float64 helpers for the references, the relative error of one rounding
# to each dtype, and the check of a result against its reference.
REFERENCES = """
import torch
from matrixgame_env.nn import triton_dit as td
RELATIVE = {torch.float32: 2.0**-22, torch.float16: 2.0**-10}
def layer_norm(x):
    x = x.double()
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.square().mean(-1, keepdim=True) + 1e-6).sqrt()
def per_frame(t):
    return t.double()[:, :, None]  # [B, F, 1, D] against tokens [B, F, S, D]
def rms_normalize(t):  # RMS norm over the last dim, no weight
    t = t.double()
    return t / (t.square().mean(-1, keepdim=True) + 1e-6).sqrt()
def rotate(t, cos, sin):  # RoPE on adjacent pairs (real, imaginary)
    real, imag = t[..., 0::2], t[..., 1::2]
    return torch.stack((real * cos - imag * sin, imag * cos + real * sin), dim=-1).flatten(-2)
def assert_close(y, ref, dtype, label, slack=1e-5):
    assert y.shape == ref.shape and y.dtype == dtype, (label, y.shape, ref.shape, y.dtype)
    err = ((y.double() - ref).abs() - ref.abs() * RELATIVE[dtype]).max().item()
    assert err <= slack, (label, err)
"""


def test_norm_modulate_and_gated_add_match_float64_with_per_frame_views():
    out = run_interpreted(
        """
        g = torch.Generator().manual_seed(0)
        for dim in (16, 24, 96):
            for dtype in (torch.float32, torch.float16):
                batch, frames, spatial = 2, 3, 5
                x = torch.randn(batch, frames * spatial, dim, generator=g) * 3 + 1
                mod = torch.randn(batch, frames, 6, dim, generator=g)  # as the DiT's: six views of one tensor
                shift, scale, gate = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]
                y = td.norm_modulate(x, shift, scale, 1e-6, frames, dtype)
                h = layer_norm(x).view(batch, frames, spatial, dim)
                ref = (h * (1 + per_frame(scale)) + per_frame(shift)).view(x.shape)
                assert_close(y, ref, dtype, ("norm_modulate", dim, dtype))
                branch = torch.randn(batch, frames * spatial, dim, generator=g).to(dtype)
                z = td.gated_add(x, branch, gate, frames)
                update = branch.double().view(batch, frames, spatial, dim) * per_frame(gate)
                assert_close(z, x.double() + update.view(x.shape), torch.float32, ("gated_add", dim, dtype))
        print("ok")
        """,
        prelude=REFERENCES,
    )
    assert out.strip().endswith("ok")


def test_affine_norm_rms_norm_and_rms_norm_rope_match_float64():
    out = run_interpreted(
        """
        from matrixgame_env.nn.rope import Rotation
        g = torch.Generator().manual_seed(1)
        for dim, heads in ((16, 2), (24, 2), (96, 4)):
            for dtype in (torch.float32, torch.float16):
                x = torch.randn(2, 7, dim, generator=g) * 2 - 1
                weight, bias = 1 + 0.1 * torch.randn(dim, generator=g), torch.randn(dim, generator=g)
                y = td.affine_norm(x, weight, bias, 1e-6, dtype)
                assert_close(y, layer_norm(x) * weight.double() + bias.double(), dtype, ("affine_norm", dim, dtype))

                t = (torch.randn(2, 7, dim, generator=g) * 4).to(dtype)
                w = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
                pairs = dim // heads // 2
                rotation = Rotation(torch.rand(7, pairs, generator=g) * 6)
                y = td.rms_norm_rope(t, w, 1e-6, rotation.cos, rotation.sin, heads)
                # float64, with the eager chain's two roundings to t's dtype (normalised, then weighted)
                weighted = (rms_normalize(t).to(dtype).double() * w.double()).to(dtype).double()
                ref = rotate(weighted.view(2, 7, heads, 2 * pairs), rotation.cos.double(), rotation.sin.double())
                # the roundings inside the chain can land one unit apart from float64's
                assert_close(y, ref, dtype, ("rms_norm_rope", dim, dtype), slack=4 * RELATIVE[dtype] * 8)

                y = td.rms_norm(t, w, 1e-6)  # the cross attention's query norm: the same without RoPE
                assert_close(y, weighted, dtype, ("rms_norm", dim, dtype), slack=4 * RELATIVE[dtype] * 8)
        print("ok")
        """,
        prelude=REFERENCES,
    )
    assert out.strip().endswith("ok")


def test_the_action_modules_queries_and_temporal_qkv_match_float64():
    out = run_interpreted(
        """
        g = torch.Generator().manual_seed(2)
        for heads, head_dim in ((2, 8), (4, 12)):
            for dtype in (torch.float32, torch.float16):
                batch, frames, spatial = 2, 3, 5
                cos, sin = [f(torch.rand(frames, 1, head_dim // 2, generator=g) * 6) for f in (torch.cos, torch.sin)]
                q = (torch.randn(batch, frames * spatial, heads * head_dim, generator=g) * 3).to(dtype)
                y = td.keyboard_queries(q, cos, sin, 1e-6, frames, heads)
                per_frame = q.view(batch, frames, spatial, heads, head_dim)
                c, s = cos.double()[None, :, None], sin.double()[None, :, None]
                ref = rotate(rms_normalize(per_frame), c, s).view(batch, frames * spatial, heads, head_dim)
                assert_close(y, ref, dtype, ("keyboard_queries", heads, dtype))

                qkv = (torch.randn(batch, frames, spatial, 3 * heads * head_dim, generator=g) * 2).to(dtype)
                qkv = qkv.view(batch, frames, spatial, 3, heads, head_dim)  # as the mouse branch's projection
                q, k, v = td.mouse_temporal_qkv(qkv, cos, sin, 1e-6)
                per_location = qkv.permute(0, 2, 1, 3, 4, 5).reshape(batch * spatial, frames, 3, heads, head_dim)
                for got, which in ((q, 0), (k, 1)):
                    ref = rotate(rms_normalize(per_location[:, :, which]), cos.double(), sin.double())
                    assert_close(got, ref, dtype, ("mouse_temporal_qkv", which, heads, dtype))
                assert torch.equal(v, per_location[:, :, 2]) and v.is_contiguous()
        print("ok")
        """,
        prelude=REFERENCES,
    )
    assert out.strip().endswith("ok")


def test_few_key_attention_matches_float64_for_any_key_count_and_strides():
    out = run_interpreted(
        """
        g = torch.Generator().manual_seed(3)
        for keys in (1, 5, 9):
            for dtype in (torch.float32, torch.float16):
                q = (torch.randn(2, 7, 3, 12, generator=g) * 2).to(dtype)
                kv = (torch.randn(2, keys, 2, 3, 12, generator=g) * 2).to(dtype)
                k, v = kv[:, :, 0], kv[:, :, 1]  # views, as a cache's keys and values can be
                y = td.few_key_attention(q, k, v)
                scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 12**0.5
                ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.double())
                assert_close(y, ref, dtype, ("few_key_attention", keys, dtype), slack=1e-5)
                assert y.is_contiguous()
        print("ok")
        """,
        prelude=REFERENCES,
    )
    assert out.strip().endswith("ok")


def test_the_kernels_decline_what_they_do_not_take():
    """Outside the interpreter CPU tensors are the eager chains' (None); so are tensors needing gradients."""
    x = torch.randn(1, 6, 8)
    mod = torch.randn(1, 2, 8)
    assert triton_dit.norm_modulate(x, mod, mod, 1e-6, 2, torch.float32) is None
    assert triton_dit.gated_add(x, x, mod, 2) is None
    out = run_interpreted(
        """
        x = torch.randn(1, 6, 8, requires_grad=True)
        mod = torch.randn(1, 2, 8)
        assert td.norm_modulate(x, mod, mod, 1e-6, 2, torch.float32) is None  # needs gradients
        with torch.no_grad():
            assert td.norm_modulate(x, mod, mod, 1e-6, 2, torch.float32) is not None
        assert td.norm_modulate(x.detach(), mod, mod, 1e-6, 4, torch.float32) is None  # 6 tokens, 4 frames
        assert td.gated_add(x.detach().half(), x.detach(), mod, 2) is None  # the eager add would promote
        print("ok")
        """,
        prelude=REFERENCES,
    )
    assert out.strip().endswith("ok")


def test_a_streaming_dit_with_the_kernels_gives_the_eager_blocks():
    """A tiny DiT (action modules, KV cache, three blocks) through the sampler: the chains run the kernels
    (each kernel called, the action modules' q/k chains too) and the latents match the eager chains' to
    float32 rounding."""
    out = run_interpreted(
        """
        import sys
        sys.path.insert(0, "tests")
        from tiny import tiny_dit
        from matrixgame_env.world.sampler import SamplerConfig, StreamingSampler
        calls = {}
        launched = td._kernels()
        class Counted:  # the kernels as launched, each launch counted by name
            def __getattr__(self, name):
                kernel = getattr(launched, name)
                class Launch:
                    def __getitem__(self, grid):
                        calls[name] = calls.get(name, 0) + 1
                        return kernel[grid]
                return Launch()
        td._kernels = Counted
        def run(kernels, sampler_choice=None):
            td.set_enabled(kernels)
            model = tiny_dit()
            sampler = StreamingSampler(model, SamplerConfig(), latent_size=(4, 8))
            sampler.dit_kernels = sampler_choice
            g = torch.Generator().manual_seed(1)
            image, context = torch.randn(1, 16, 2, 4, 8, generator=g), torch.randn(1, 5, 1280, generator=g)
            state = sampler.start(image, context, seed=3)
            blocks = []
            with torch.no_grad():
                for k in range(3):
                    frames = sampler.video_frames_for_block(state)
                    keyboard = (torch.rand(1, frames, 4, generator=g) > 0.5).float()
                    mouse = 0.1 * torch.randn(1, frames, 2, generator=g)
                    blocks.append(sampler.step(state, keyboard, mouse))
            return torch.cat(blocks, dim=2)
        eager = run(False)
        assert not calls, calls
        fused = run(True)
        names = ("norm_modulate", "gated_add", "affine_norm", "rms_norm_rope", "few_key_attention")
        assert set(calls) == {f"{name}_rows" for name in names}, calls
        # q and k of the self attention and q of the cross attention (3 a layer), the keyboard's queries
        # and the mouse's q and k (3 in each of the two layers with action modules): 15 a pass of 3 layers;
        # and the CLIP context's keys of each layer, once at the start
        passes = calls["norm_modulate_rows"] // 6
        assert calls["rms_norm_rope_rows"] == 15 * passes + 3, calls
        # the cross attention's affine norm (3 a pass), the mouse MLP's closing LayerNorm in the two layers
        # with action modules (2 a pass), and the CLIP projection's two LayerNorms, once at the start
        assert calls["affine_norm_rows"] == 5 * passes + 2, calls
        scale = eager.abs().max().item()
        err = (fused - eager).abs().max().item()
        assert err <= 1e-5 * scale, (err, scale)  # float32 rounding (about 2e-7 of the scale here)
        # A sampler's own choice (as `fast=True` / `fast=False` set it) overrides the process-wide switch.
        before = dict(calls)
        assert torch.equal(run(True, sampler_choice=False), eager) and calls == before, calls
        assert torch.equal(run(False, sampler_choice=True), fused) and calls != before, calls
        assert not td.enabled()  # the sampler's choice held only within its work
        print("ok", calls, err, scale)
        """,
        prelude=REFERENCES,
    )
    assert out.strip().splitlines()[-1].startswith("ok"), out


def test_switched_overrides_the_process_wide_switch_in_its_thread_only():
    import threading

    assert not triton_dit.enabled()
    seen = []
    with triton_dit.switched(True):
        assert triton_dit.enabled()
        with triton_dit.switched(None):  # no choice: the enclosing one stays
            assert triton_dit.enabled()
        with triton_dit.switched(False):
            assert not triton_dit.enabled()
        assert triton_dit.enabled()
        worker = threading.Thread(target=lambda: seen.append(triton_dit.enabled()))
        worker.start()
        worker.join()
    assert seen == [False] and not triton_dit.enabled()
    triton_dit.set_enabled(True)
    try:
        with triton_dit.switched(False):
            assert not triton_dit.enabled()
        with triton_dit.switched(None):
            assert triton_dit.enabled()
    finally:
        triton_dit.set_enabled(False)


def test_the_switch_is_off_by_default_and_fusion_routes_through_it():
    assert not triton_dit.enabled()
    x = torch.randn(1, 6, 8)
    mod = torch.randn(1, 2, 8)
    triton_dit.set_enabled(True)
    try:  # on the CPU outside the interpreter the kernels decline: the eager chain runs
        torch.testing.assert_close(
            fusion.norm_modulate(x, mod, mod, 1e-6, 2, torch.float32),
            fusion.norm_modulate.__wrapped__(x, mod, mod, 1e-6, 2, torch.float32),
        )
    finally:
        triton_dit.set_enabled(False)
