"""The Triton causal-convolution kernel (`nn.triton_conv`) against torch's conv3d in float64.

Triton kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, read when a
kernel is defined), so these checks run in a subprocess of their own. The interpreter computes
float16 exactly as the GPU kernel does (float32 sums, one rounding at the end); bfloat16 is checked
on GPUs (tests/test_cuda_graphs.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from matrixgame_env.nn import triton_conv
from matrixgame_env.nn.vae import set_conv3d_mode

pytest.importorskip("triton", reason="the kernel's checks need Triton (installed with the dev extras)")


def run_interpreted(code: str, prelude: str = "") -> str:
    """Runs `prelude` then `code` (dedented) in a Python process with Triton's interpreter on; returns
    its standard output."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# For interpreted processes: a tiny float16 decoder, channels-last, `stream()`, which decodes two
# chunks of latents through it from an empty cache, and a check that two such streams differ by rounding.
TINY_DECODER = """
import torch
from matrixgame_env.nn.vae import WanVAE
torch.manual_seed(0)
vae = WanVAE(dim=16, num_res_blocks=1).eval().half()
vae.set_decoder_channels_last(True)
latents = [torch.randn(1, 16, n, 1, 2).half() for n in (1, 2)]
def stream():
    cache = vae.new_decoder_cache(1)
    with torch.no_grad():
        return torch.cat([vae.decode_stream(z, cache, check_finite=False).float() for z in latents], dim=1)
def assert_rounding_apart(a, b):
    # float16 activations through ~20 layers: each form rounds its own sums, so close but not equal
    assert a.shape == b.shape == (1, 9, 3, 8, 16), a.shape
    err = (a - b).abs().max().item()
    assert 0 < err < 1e-2, err
"""


def test_kernel_matches_float64_convolution_for_each_width_with_and_without_bias():
    out = run_interpreted(
        """
        import torch, torch.nn.functional as F
        from matrixgame_env.nn import triton_conv as tc
        g = torch.Generator().manual_seed(0)
        cases = [(16, 16, 5, 7, True), (32, 16, 4, 9, False), (16, 32, 3, 3, True), (64, 64, 2, 17, True),
                 (16, 16, 1, 1, False)]
        for c_in, c_out, h, w, with_bias in cases:
            x = torch.randn(2, c_in, 5, h, w, generator=g).half().contiguous(memory_format=torch.channels_last_3d)
            weight = (torch.randn(c_out, c_in, 3, 3, 3, generator=g) / (27 * c_in) ** 0.5).half()
            bias = torch.randn(c_out, generator=g).half() if with_bias else None
            ref = F.conv3d(x.double(), weight.double(), None if bias is None else bias.double(), padding=(0, 1, 1))
            # 27 products of depth C_in, or 9 of the row's taps together; those with output frames in
            # groups of 2 or 4 (each input row read once for all its output frames; 3 frames: a group
            # of 4 runs past the end, one of 2 ends halfway)
            for row_taps, group in ((False, 1), (True, 1), (True, 2), (True, 4)):
                if group > 1 and c_in > 32:  # refused: beyond a GPU's shared memory
                    continue
                y = tc.causal_conv3x3x3(x, tc.pack_weight(weight), bias, row_taps=row_taps, frames_per_program=group)
                assert y.shape == ref.shape and y.dtype == torch.float16
                assert y.is_contiguous(memory_format=torch.channels_last_3d)
                # one float16 rounding of the float32 sum: half a unit in the last place, 2**-11 relative
                err = ((y.double() - ref).abs() - ref.abs() * 2.0**-11).max().item()
                print(c_in, c_out, row_taps, group, err)
                assert err <= 1e-6, (c_in, c_out, h, w, row_taps, group, err)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_kernel_reads_views_with_their_own_batch_and_frame_strides():
    out = run_interpreted(
        """
        import torch, torch.nn.functional as F
        from matrixgame_env.nn import triton_conv as tc
        g = torch.Generator().manual_seed(1)
        whole = torch.randn(3, 16, 7, 4, 6, generator=g).half().contiguous(memory_format=torch.channels_last_3d)
        view = whole[1:, :, 2:]  # other worlds, later frames: the pixel strides stay channels-last
        weight = (torch.randn(16, 16, 3, 3, 3, generator=g) / 20).half()
        assert tc.applies(view, weight)
        ref = F.conv3d(view.double(), weight.double(), padding=(0, 1, 1))
        for row_taps, group in ((False, 1), (True, 1), (True, 4)):
            y = tc.causal_conv3x3x3(view, tc.pack_weight(weight), None, row_taps=row_taps, frames_per_program=group)
            assert ((y.double() - ref).abs() - ref.abs() * 2.0**-11).max().item() <= 1e-6
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_decoder_streams_the_same_frames_with_the_triton_form():
    out = run_interpreted(
        """
        from matrixgame_env.nn import triton_norm
        from matrixgame_env.nn.vae import set_conv3d_mode
        triton_norm.set_enabled(False)  # the convolution alone; its fused norms: tests/test_triton_norm.py
        results = {}
        for mode, per_vae in (("native", False), ("triton", False), ("auto", True), ("native", True)):
            set_conv3d_mode(mode)
            vae.set_decoder_triton(per_vae)  # the env's fast path: the kernel while the mode is "auto"
            results[mode, per_vae] = stream()
        set_conv3d_mode("auto")
        assert torch.equal(results["auto", True], results["triton", False])
        assert torch.equal(results["native", True], results["native", False])  # an explicit mode wins
        assert_rounding_apart(results["native", False], results["triton", False])
        print("ok")
        """,
        prelude=TINY_DECODER,
    )
    assert out.strip().endswith("ok")


def test_training_keeps_gradients_by_taking_torchs_convolution():
    out = run_interpreted(
        """
        import torch
        from matrixgame_env.nn.vae import CausalConv3d, FeatureCache, set_conv3d_mode
        torch.manual_seed(0)
        conv = CausalConv3d(16, 16, 3).half()
        x = torch.randn(1, 16, 2, 3, 4).half().contiguous(memory_format=torch.channels_last_3d)
        set_conv3d_mode("triton")
        conv(x, FeatureCache(1, 1)).float().square().sum().backward()
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_applies_only_to_what_the_kernel_computes():
    weight = torch.zeros(16, 16, 3, 3, 3, dtype=torch.float16)
    last = torch.zeros(1, 16, 4, 5, 6, dtype=torch.float16).contiguous(memory_format=torch.channels_last_3d)
    assert not triton_conv.applies(last, weight)  # a CPU tensor without the interpreter
    assert triton_conv.pack_weight(torch.arange(16 * 16 * 27.0).view(16, 16, 3, 3, 3)).shape == (27 * 16, 16)
    packed = triton_conv.pack_weight(torch.arange(2 * 16 * 27.0).view(2, 16, 3, 3, 3))
    # row (tap t*9 + h*3 + w) * C_in + c_in, column c_out
    assert packed[(1 * 9 + 2 * 3 + 0) * 16 + 5, 1].item() == ((1 * 16 + 5) * 27 + 1 * 9 + 2 * 3 + 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_triton_mode_needs_a_gpu_or_the_interpreter():
    if triton_conv.interpreted():
        pytest.skip("the interpreter is on in this process")
    with pytest.raises(ValueError, match="needs Triton and a CUDA GPU"):
        set_conv3d_mode("triton")


def test_bad_kernel_inputs_say_what_is_accepted():
    joined = torch.zeros(1, 8, 3, 4, 4, dtype=torch.float16).contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(ValueError, match=r"takes \(16, 32, 64\) channels in and out, got 8 -> 8"):
        triton_conv.causal_conv3x3x3(joined, torch.zeros(27 * 8, 8, dtype=torch.float16), None)
    joined = torch.zeros(1, 16, 3, 4, 4, dtype=torch.float16).contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(ValueError, match=r"packed kernel of shape \(16, 16\) does not fit 16 input channels"):
        triton_conv.causal_conv3x3x3(joined, torch.zeros(16, 16, dtype=torch.float16), None)
    packed = torch.zeros(27 * 16, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="frames_per_program must be 1, or 2 or 4 with row_taps, got 3"):
        triton_conv.causal_conv3x3x3(joined, packed, None, row_taps=True, frames_per_program=3)
    with pytest.raises(ValueError, match="frames_per_program must be 1, or 2 or 4 with row_taps, got 4"):
        triton_conv.causal_conv3x3x3(joined, packed, None, frames_per_program=4)
    joined = torch.zeros(1, 64, 3, 4, 4, dtype=torch.float16).contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(ValueError, match="frames_per_program above 1 takes at most 32 input channels, got 64"):
        triton_conv.causal_conv3x3x3(
            joined, torch.zeros(27 * 64, 64, dtype=torch.float16), None, row_taps=True, frames_per_program=2
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_decoder_triton_switch_needs_a_gpu_or_the_interpreter():
    from matrixgame_env.nn.vae import WanVAE

    if triton_conv.interpreted():
        pytest.skip("the interpreter is on in this process")
    vae = WanVAE(dim=16, num_res_blocks=1)
    with pytest.raises(ValueError, match="Triton convolutions need Triton and a CUDA GPU"):
        vae.set_decoder_triton(True)
    assert not vae.decoder_triton
    vae.set_decoder_triton(False)  # turning it off is always allowed
