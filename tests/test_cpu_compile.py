"""CPU `fast="compile"`: the DiT's passes and the decoder's chunks through torch.compile give the eager
results and stop compiling once the caches' fill states and the batch size have been seen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_dit

from matrixgame_env.env import MatrixGameEnv
from matrixgame_env.nn.vae import WanVAE
from matrixgame_env.vector import MatrixGameVectorEnv
from matrixgame_env.world.compiled_decoder import CompiledDecoder, compile_decoder, decoder_compiled
from matrixgame_env.world.sampler import StreamingSampler


def _actions(steps: int, worlds: int | None = None, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    shape = () if worlds is None else (worlds,)
    return [
        {
            "keyboard": rng.integers(0, 2, (*shape, 4)).astype(np.int64),
            "mouse": rng.uniform(-0.2, 0.2, (*shape, 2)).astype(np.float32),
        }
        for _ in range(steps)
    ]


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def _latent_rollout(env, actions: list[dict]) -> np.ndarray:
    first, _ = env.reset(seed=3)
    return np.stack([first] + [env.step(action)[0] for action in actions])


def test_compiled_dit_gives_the_eager_latents_and_episodes_do_not_recompile():
    eager = MatrixGameEnv(observation="latent", fast=True, device="cpu")
    compiled = MatrixGameEnv(observation="latent", fast="compile", device="cpu")
    assert compiled.world.sampler.dit_compiled and not eager.world.sampler.dit_compiled
    actions = _actions(6)
    expected = _latent_rollout(eager, actions)
    got = _latent_rollout(compiled, actions)
    assert got.shape == expected.shape
    for step, (a, b) in enumerate(zip(got, expected)):
        assert _relative_error(a, b) < 1e-5, f"step {step}"
    # Every shape a stream meets (the caches filling, then full) has compiled: a new episode and
    # its blocks run what was compiled, and any recompilation raises here.
    with torch.compiler.set_stance("fail_on_recompile"):
        again = _latent_rollout(compiled, actions[:4])
    assert np.allclose(again, got[:5], rtol=0, atol=0)


def test_compiled_dit_in_a_vector_env_gives_the_eager_frames():
    """Frames observed (the decoder runs eagerly after the compiled passes), two worlds in one batch."""
    actions = _actions(3, worlds=2)
    rollouts = []
    for fast in (True, "compile"):
        env = MatrixGameVectorEnv(num_envs=2, fast=fast, device="cpu")
        first, _ = env.reset(seed=[5, 6])
        rollouts.append(np.stack([first] + [env.step(action)[0] for action in actions]).astype(np.int16))
        env.close()
    expected, got = rollouts
    assert got.shape == expected.shape == (4, 2, 96, 176, 3)
    difference = np.abs(got - expected)
    assert difference.max() <= 2, "frames of the compiled DiT more than 2 grey levels from eager ones"
    assert difference.mean() < 0.05


def test_compile_dit_is_refused_off_the_cpu_and_can_be_turned_off():
    sampler = StreamingSampler(tiny_dit().to("meta"), latent_size=(4, 6))
    with pytest.raises(ValueError, match="for CPU models.*meta.*fast='compile'"):
        sampler.compile_dit()
    assert not sampler.dit_compiled
    cpu = StreamingSampler(tiny_dit(), latent_size=(4, 6))
    cpu.compile_dit()
    assert cpu.dit_compiled
    cpu.compile_dit(False)
    assert not cpu.dit_compiled and cpu._dit is cpu.model


def _tiny_stream(sampler, blocks: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 16, 2, 4, 6, generator=g)
    state = sampler.start(image, torch.randn(1, 5, 1280, generator=g), seed=3)
    out = []
    for b in range(blocks):
        frames = sampler.video_frames_for_block(state)
        g = torch.Generator().manual_seed(20 + b)
        keyboard = (torch.rand(1, frames, sampler.keyboard_dim, generator=g) > 0.5).float()
        out.append(sampler.step(state, keyboard, 0.1 * torch.randn(1, frames, 2, generator=g)))
    return torch.cat(out, dim=2)


def test_a_failed_compile_warns_and_runs_the_eager_passes(tmp_path):
    """Without a working C++ compiler inductor cannot build its kernels: the sampler says so once
    and streams the eager results."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model = tiny_dit()
    expected = _tiny_stream(StreamingSampler(model, latent_size=(4, 6)))
    sampler = StreamingSampler(model, latent_size=(4, 6))
    sampler.compile_dit()
    # torch's own config patching (restored on exit); nothing built earlier may be reused
    no_compiler = {"force_disable_caches": True, "cpp.cxx": (str(tmp_path / "no-such-compiler"),)}
    with (
        inductor_config.patch(no_compiler),
        pytest.warns(UserWarning, match="compiling the DiT failed .*; it runs eagerly"),
    ):
        got = _tiny_stream(sampler)
    assert not sampler.dit_compiled
    assert torch.equal(got, expected)
    torch._dynamo.reset()
    assert inductor_config.cpp.cxx != no_compiler["cpp.cxx"] and not inductor_config.force_disable_caches


def test_full_cache_passes_compile_whole_and_follow_changed_weights():
    """Once the caches are full a pass is one graph (its cache writes planned, no graph break), and
    weights changed in place after compiling (the compiled graph holds them frozen) are noticed:
    it warns, compiles again and streams what the eager model gives with the new weights."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_dit()
    sampler = StreamingSampler(model, latent_size=(4, 6))
    sampler.compile_dit()
    first = _tiny_stream(sampler)
    assert sampler.dit_compiled
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.05)
    expected = _tiny_stream(StreamingSampler(model, latent_size=(4, 6)))
    with pytest.warns(UserWarning, match="weights changed since it was compiled; compiling it again"):
        got = _tiny_stream(sampler)
    assert not torch.allclose(got, first)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_weights_fingerprint_of_a_model_made_under_inference_mode():
    """Inference tensors keep no version count: their place stands in for it, so a model built
    under `torch.inference_mode` compiles like any other."""
    from matrixgame_env.world.compiled_dit import CompiledDiT

    with torch.inference_mode():
        model = tiny_dit()
    compiled = CompiledDiT(model)
    assert all(p.is_inference() for p in model.parameters())
    assert compiled._weights_fingerprint() == compiled._weights
    other = CompiledDiT(tiny_dit())
    assert other._weights_fingerprint() != compiled._weights


def _tiny_vae(seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(
        dim=8,
        z_dim=4,
        dim_mult=(1, 2, 2),
        num_res_blocks=1,
        temporal_downsample=(True, True),
        latent_mean=[0.1] * 4,
        latent_std=[1.5] * 4,
    ).eval()
    vae.set_decoder_channels_last(True)  # as fast=True and "compile" decode on CPUs
    return vae


def _decoded_stream(vae: WanVAE, latents: torch.Tensor, cache=None) -> torch.Tensor:
    """Two calls of `decode_stream`, as a world decodes its first block and the next."""
    cache = vae.new_decoder_cache(latents.shape[0]) if cache is None else cache
    return torch.cat([vae.decode_stream(latents[:, :, :3], cache), vae.decode_stream(latents[:, :, 3:], cache)], 1)


def test_compiled_decoder_gives_the_eager_frames_in_one_graph_and_restarts_without_compiling():
    """A stream's first latent decodes eagerly (it fills the cache); every later one runs one compiled
    graph (no graph break), within float rounding of the eager decoder. A restarted cache, as a new
    episode's, decodes the same frames again with nothing left to compile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    vae = _tiny_vae()
    latents = torch.randn(1, 4, 6, 4, 6, generator=torch.Generator().manual_seed(2))
    expected = _decoded_stream(vae, latents)
    compile_decoder(vae)
    assert decoder_compiled(vae)
    cache = vae.new_decoder_cache(1)
    got = _decoded_stream(vae, latents, cache)
    assert got.shape == expected.shape == (1, 21, 3, 16, 24)
    assert (got - expected).abs().max() < 1e-4
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    cache.restart()
    with torch.compiler.set_stance("fail_on_recompile"):
        again = _decoded_stream(vae, latents, cache)
    assert torch.equal(again, got)
    compile_decoder(vae, False)
    assert vae.decoder_runner is None and not decoder_compiled(vae)
    torch._dynamo.reset()


def _recorded_runner_calls(vae: WanVAE) -> list[tuple[int, dict]]:
    """Has the VAE's runner note each call's latent count and options in the list it returns."""
    calls: list[tuple[int, dict]] = []
    runner = vae.decoder_runner
    vae.set_decoder_runner(
        lambda x, cache, **options: (calls.append((x.shape[2], options)), runner(x, cache, **options))[1]
    )
    return calls


def test_compiled_decoder_decodes_a_blocks_last_frame_alone_in_one_call_like_the_eager_decoder():
    """With `last_frames` the compiled decoder takes the block's latents in one call (its trimmed layers
    then skip most frames): the eager decoder's last frame, and the same frames after."""
    torch._dynamo.reset()
    vae = _tiny_vae()
    latents = torch.randn(1, 4, 7, 4, 6, generator=torch.Generator().manual_seed(4))
    eager_cache = vae.new_decoder_cache(1)
    vae.decode_stream(latents[:, :, :1], eager_cache)
    expected = vae.decode_stream(latents[:, :, 1:4], eager_cache)
    expected_next = vae.decode_stream(latents[:, :, 4:], eager_cache)
    compile_decoder(vae)
    calls = _recorded_runner_calls(vae)
    try:
        cache = vae.new_decoder_cache(1)
        vae.decode_stream(latents[:, :, :1], cache)
        calls.clear()
        got = vae.decode_stream(latents[:, :, 1:4], cache, last_frames=1)
        assert calls == [(3, {"last_frames": 1})] and got.shape == (1, 1, 3, 16, 24)
        assert (got - expected[:, -1:]).abs().max() < 1e-4
        got_next = vae.decode_stream(latents[:, :, 4:], cache)
        assert (got_next - expected_next).abs().max() < 1e-4
    finally:
        compile_decoder(vae, False)
        torch._dynamo.reset()


def test_a_streams_first_call_decodes_eagerly_and_its_steady_blocks_go_to_the_runner():
    """A world's first block decodes without the runner: the rest of it (two latents after the first)
    would otherwise compile a graph of its own, and the steady three-latent blocks a second one with
    the frame count dynamic. The runner sees only the steady blocks, within float rounding of eager,
    and compiles once: the cache keeps every slot in one layout (`FeatureCache.channels_last`), so the
    slots the eager first block left and those the compiled graph leaves pass the same guards."""
    torch._dynamo.reset()
    vae = _tiny_vae()
    latents = torch.randn(1, 4, 12, 4, 6, generator=torch.Generator().manual_seed(5))
    eager_cache = vae.new_decoder_cache(1)
    expected = [vae.decode_stream(latents[:, :, i : i + 3], eager_cache, last_frames=1) for i in (0, 3, 6, 9)]
    compile_decoder(vae)
    calls = _recorded_runner_calls(vae)
    try:
        cache = vae.new_decoder_cache(1)
        assert cache.channels_last
        first = vae.decode_stream(latents[:, :, :3], cache, last_frames=1)
        assert calls == [] and torch.equal(first, expected[0])
        for i, want in zip((3, 6, 9), expected[1:]):
            with torch.compiler.set_stance("fail_on_recompile" if i > 3 else "default"):
                got = vae.decode_stream(latents[:, :, i : i + 3], cache, last_frames=1)
            assert got.shape == (1, 1, 3, 16, 24) and (got - want).abs().max() < 1e-4
        assert calls == [(3, {"last_frames": 1})] * 3
    finally:
        compile_decoder(vae, False)
        torch._dynamo.reset()


def test_two_compiled_decoders_with_other_weights_each_decode_their_own_frames(monkeypatch):
    """The compiled graphs keep only the identity checks of the modules' guards (`identity_guards_only`):
    two decoders of one class, with other frozen weights, still each run a graph of their own."""
    from matrixgame_env.world import frozen_compile

    identity_guards_only = frozen_compile.identity_guards_only
    torch._dynamo.reset()
    latents = torch.randn(1, 4, 6, 4, 6, generator=torch.Generator().manual_seed(6))
    vaes = [_tiny_vae(seed=0), _tiny_vae(seed=1)]
    expected = [_decoded_stream(vae, latents) for vae in vaes]
    assert (expected[0] - expected[1]).abs().max() > 1e-2
    kept = []

    def recorded(entries):
        keep = identity_guards_only(entries)
        kept.append([(entry.guard_type, flag) for entry, flag in zip(entries, keep)])
        return keep

    monkeypatch.setattr(frozen_compile, "identity_guards_only", recorded)
    try:
        for vae in vaes:
            compile_decoder(vae)
        compiled = []
        for _ in range(2):  # the second round runs the graphs already there
            for vae, want in zip(vaes, expected):
                got = _decoded_stream(vae, latents)
                assert (got - want).abs().max() < 1e-4
            compiled.append(len(kept))
        assert compiled[0] >= 2 and compiled[1] == compiled[0]
        for entries in kept:
            assert all(flag for kind, flag in entries if kind in ("ID_MATCH", "TENSOR_MATCH"))
            assert sum(flag for _, flag in entries) < len(entries) / 2
    finally:
        for vae in vaes:
            compile_decoder(vae, False)
        torch._dynamo.reset()


def test_compiled_decoder_follows_changed_weights_and_is_refused_off_the_cpu():
    """The compiled graph holds the weights frozen: weights changed in place after compiling are
    noticed, and it warns, compiles again and decodes what the eager decoder gives with them."""
    torch._dynamo.reset()
    vae = _tiny_vae()
    latents = torch.randn(1, 4, 6, 4, 6, generator=torch.Generator().manual_seed(3))
    compile_decoder(vae)
    runner = vae.decoder_runner
    assert isinstance(runner, CompiledDecoder)
    first = _decoded_stream(vae, latents)
    with torch.no_grad():
        for parameter in vae.decoder.parameters():
            parameter.mul_(1.05)
    vae.set_decoder_runner(None)
    expected = _decoded_stream(vae, latents)
    vae.set_decoder_runner(runner)
    with pytest.warns(UserWarning, match="decoder's weights changed since it was compiled; compiling it again"):
        got = _decoded_stream(vae, latents)
    assert (expected - first).abs().max() > 1e-3
    assert (got - expected).abs().max() < 1e-4
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="compile_decoder is for CPU models.*meta"):
        compile_decoder(_tiny_vae().to("meta"))


def test_a_failed_decoder_compile_warns_and_decodes_eagerly(tmp_path):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    vae = _tiny_vae()
    latents = torch.randn(1, 4, 6, 4, 6, generator=torch.Generator().manual_seed(4))
    vae.set_decoder_runner(lambda x, cache: vae.decoder(x, cache))  # eager, one latent per call, as runners are fed
    expected = _decoded_stream(vae, latents)
    vae.set_decoder_runner(None)
    compile_decoder(vae)
    no_compiler = {"force_disable_caches": True, "cpp.cxx": (str(tmp_path / "no-such-compiler"),)}
    with (
        inductor_config.patch(no_compiler),
        pytest.warns(UserWarning, match="compiling the decoder failed .*; it runs eagerly"),
    ):
        got = _decoded_stream(vae, latents)
    assert not decoder_compiled(vae)
    assert torch.equal(got, expected)
    torch._dynamo.reset()
