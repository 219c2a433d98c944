"""Behaviour of the streaming engine: batching, exact snapshot/restore, fork, flat memory, errors."""

import warnings

import pytest
import torch
from tiny import tiny_dit

from matrixgame_env.nn.action import action_windows
from matrixgame_env.nn.attention import block_causal_frame_mask
from matrixgame_env.world.condition import first_frame_mask
from matrixgame_env.world.sampler import SamplerConfig, StreamingSampler

LATENT = (4, 8)  # latent height, width (tiny, for speed)


def _start(sampler, batch, seed=0, image_seed=1):
    g = torch.Generator().manual_seed(image_seed)
    image = torch.randn(batch, 16, 2, *LATENT, generator=g)
    context = torch.randn(batch, 5, 1280, generator=g)
    return sampler.start(image, context, seed=seed), image, context


def _actions(batch, frames, seed):
    g = torch.Generator().manual_seed(seed)
    keyboard = (torch.rand(batch, frames, 4, generator=g) > 0.5).float()
    mouse = 0.1 * torch.randn(batch, frames, 2, generator=g)
    return keyboard, mouse


def _roll(sampler, state, blocks, seed=0):
    out = []
    for b in range(blocks):
        keyboard, mouse = _actions(state.batch_size, sampler.video_frames_for_block(state), seed + b)
        out.append(sampler.step(state, keyboard, mouse))
    return torch.cat(out, dim=2)


@pytest.fixture(scope="module")
def sampler():
    return StreamingSampler(tiny_dit(), SamplerConfig(), latent_size=LATENT)


def test_batched_worlds_equal_worlds_run_alone(sampler):
    state, image, context = _start(sampler, 3, seed=10)
    batched = _roll(sampler, state, 4)
    for b in range(3):
        alone = sampler.start(image[b : b + 1], context[b : b + 1], seed=10 + b)
        out = []
        for k in range(4):
            keyboard, mouse = _actions(3, sampler.video_frames_for_block(alone), k)
            out.append(sampler.step(alone, keyboard[b : b + 1], mouse[b : b + 1]))
        torch.testing.assert_close(torch.cat(out, 2), batched[b : b + 1], rtol=0, atol=1e-5)


def test_restore_gives_the_same_latents_again(sampler):
    state, _, _ = _start(sampler, 2)
    _roll(sampler, state, 3)
    snapshot = state.snapshot()
    first = _roll(sampler, state, 3, seed=100)
    state.restore(snapshot)
    second = _roll(sampler, state, 3, seed=100)
    assert torch.equal(first, second)
    assert state.frame == snapshot.frame + 9


def test_snapshot_is_independent_of_later_steps(sampler):
    state, _, _ = _start(sampler, 1)
    _roll(sampler, state, 2)
    snapshot = state.snapshot()
    keys_before = snapshot.caches[0].self_attn.key.clone()
    _roll(sampler, state, 2)
    assert torch.equal(snapshot.caches[0].self_attn.key, keys_before)
    assert not torch.equal(state.caches[0].self_attn.key, keys_before)


def test_fork_copies_each_world_and_equal_actions_give_equal_futures(sampler):
    state, _, _ = _start(sampler, 2)
    _roll(sampler, state, 2)
    forked = state.fork(3)
    assert forked.batch_size == 6 and forked.frame == state.frame
    reference = _roll(sampler, state, 2, seed=7)
    keyboard_plans = []
    out = []
    for k in range(2):
        keyboard, mouse = _actions(2, 12, 7 + k)
        keyboard_plans.append(keyboard)
        out.append(sampler.step(forked, keyboard.repeat_interleave(3, 0), mouse.repeat_interleave(3, 0)))
    out = torch.cat(out, 2)
    for b in range(6):
        torch.testing.assert_close(out[b], reference[b // 3], rtol=0, atol=1e-5)


def test_different_actions_change_the_future(sampler):
    state, _, _ = _start(sampler, 1)
    _roll(sampler, state, 1)
    forked = state.fork(2)
    keyboard = torch.tensor([[[1.0, 0, 0, 0]], [[0, 0, 0, 1.0]]]).expand(2, 12, 4)
    out = sampler.step(forked, keyboard, torch.zeros(2, 12, 2))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_memory_is_identical_after_5_and_after_50_blocks(sampler):
    state, _, _ = _start(sampler, 1)
    _roll(sampler, state, 5)
    after_5 = (state.nbytes, [tuple(layer.self_attn.key.shape) for layer in state.caches])
    pointers = [layer.self_attn.key.data_ptr() for layer in state.caches]
    _roll(sampler, state, 45)
    after_50 = (state.nbytes, [tuple(layer.self_attn.key.shape) for layer in state.caches])
    assert after_5 == after_50
    assert pointers == [layer.self_attn.key.data_ptr() for layer in state.caches]
    assert state.keyboard_history.shape[1] == sampler.action_window
    assert state.frame == 150


def test_streaming_equals_the_masked_full_sequence_for_the_last_block(sampler):
    """The training path (block-causal mask, no cache) gives the streaming prediction when the
    earlier frames are the clean latents at the context timestep."""
    model = sampler.model
    state, image, context = _start(sampler, 1)
    keyboard, mouse = _actions(1, 1 + 4 * 11, 3)  # video frames of 4 blocks
    bounds = [(0, 9), (9, 21), (21, 33), (33, 45)]
    clean = torch.cat([sampler.step(state, keyboard[:, lo:hi], mouse[:, lo:hi]) for lo, hi in bounds[:3]], 2)
    noise = torch.randn(1, 16, 3, *LATENT)
    flows = []
    handle = model.register_forward_hook(lambda m, a, out: flows.append(out))
    lo, hi = bounds[3]
    sampler.step(state, keyboard[:, lo:hi], mouse[:, lo:hi], noise=noise, renoise=[torch.zeros_like(noise)] * 2)
    handle.remove()

    latents = torch.cat([clean, noise], 2)
    cond = torch.cat([first_frame_mask(1, 4, 0, 12, *LATENT), state.image.frames(0, 12)], 1)
    timestep = torch.tensor([[sampler.config.context_noise] * 9 + [sampler.timesteps[0]] * 3])
    window = sampler.action_window
    with torch.no_grad():
        flow = model(
            latents,
            cond,
            timestep,
            context,
            mouse_windows=action_windows(mouse, 0, 0, 12, window),
            keyboard_windows=action_windows(keyboard, 0, 0, 12, window),
            frame_mask=block_causal_frame_mask(12, 3, sampler.window_frames),
        )
    torch.testing.assert_close(flow[:, :, 9:], flows[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda k, m: (k[:, :5], m), "keyboard actions must be"),
        (lambda k, m: (k, m[..., :1]), "mouse actions must be"),
        (lambda k, m: (k, m.clone().fill_(float("nan"))), "NaN"),
        (lambda k, m: (k[:, :, :3], m), r"\[1, 9, 4\]"),
    ],
)
def test_bad_actions_are_rejected_with_what_is_expected(sampler, change, message):
    state, _, _ = _start(sampler, 1)
    keyboard, mouse = change(*_actions(1, 9, 0))
    with pytest.raises(ValueError, match=message):
        sampler.step(state, keyboard, mouse)
    assert state.frame == 0


def test_held_actions_equal_repeated_per_frame_actions(sampler):
    a, _, _ = _start(sampler, 1)
    b, _, _ = _start(sampler, 1)
    key, look = torch.tensor([[1.0, 0, 1, 0]]), torch.tensor([[0.0, 0.1]])
    held = sampler.step(a, key, look)
    repeated = sampler.step(b, key[:, None].expand(1, 9, 4), look[:, None].expand(1, 9, 2))
    assert torch.equal(held, repeated)


def test_bad_start_inputs_are_rejected(sampler):
    with pytest.raises(ValueError, match=r"image latents must have shape \[B, 16, K>=1, 4, 8\]"):
        sampler.start(torch.zeros(1, 16, 1, 5, 8), torch.zeros(1, 5, 1280))
    with pytest.raises(ValueError, match="visual_context must be"):
        sampler.start(torch.zeros(1, 16, 1, *LATENT), torch.zeros(1, 5, 1024))
    with pytest.raises(ValueError, match="NaN"):
        sampler.start(torch.full((1, 16, 1, *LATENT), float("nan")), torch.zeros(1, 5, 1280))
    state, _, _ = _start(sampler, 1)
    with pytest.raises(ValueError, match=r"noise must have shape"):
        sampler.step(state, noise=torch.zeros(1, 16, 2, *LATENT))


def test_templerun_model_takes_no_mouse():
    sampler = StreamingSampler(tiny_dit("templerun"), SamplerConfig((1000, 750, 500, 250)), latent_size=LATENT)
    state = sampler.start(torch.zeros(1, 16, 1, *LATENT), torch.zeros(1, 5, 1280), seed=0)
    keyboard = torch.nn.functional.one_hot(torch.tensor([[1]]), 7).float()[:, 0]
    assert sampler.step(state, keyboard).shape == (1, 16, 3, *LATENT)
    with pytest.raises(ValueError, match="no mouse input"):
        sampler.step(state, keyboard, torch.zeros(1, 2))


def test_gta_drive_window_of_4_streams(sampler):
    gta = StreamingSampler(tiny_dit("gta_drive", local_attn_size=4), SamplerConfig(), latent_size=LATENT)
    state = gta.start(torch.zeros(1, 16, 1, *LATENT), torch.zeros(1, 5, 1280), seed=0)
    for _ in range(4):
        out = gta.step(state, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.1]]))
    assert torch.isfinite(out).all()
    assert state.caches[0].self_attn.key.shape[1] == 4 * gta.tokens_per_frame


def _first_block(config: SamplerConfig, keyboard, mouse) -> torch.Tensor:
    torch.manual_seed(0)
    guided = StreamingSampler(tiny_dit(), config, latent_size=LATENT)
    state, _, _ = _start(guided, 1, seed=3)
    return guided.step(state, keyboard, mouse)


def test_action_guidance_extrapolates_from_no_actions_to_the_actions():
    """With one denoising step the block is x - sigma * flow, so it is affine in the guidance scale:
    scale 3 moves exactly twice as far from scale 1 as scale 2 does."""
    keyboard, mouse = _actions(1, 9, seed=5)
    blocks = {g: _first_block(SamplerConfig(denoising_steps=(1000,), action_guidance=g), keyboard, mouse)
              for g in (1.0, 2.0, 3.0)}  # fmt: skip
    step = blocks[2.0] - blocks[1.0]
    assert step.abs().max() > 1e-3  # the actions matter to the tiny model, so guidance changes the block
    torch.testing.assert_close(blocks[3.0] - blocks[1.0], 2 * step, rtol=0, atol=1e-5)


def test_action_guidance_leaves_blocks_without_actions_and_later_blocks_consistent():
    """Without actions both passes agree, so guidance changes nothing, also over several blocks
    (the extra pass's cache writes are overwritten by the block's own)."""
    unguided = StreamingSampler(tiny_dit(), SamplerConfig(), latent_size=LATENT)
    guided = StreamingSampler(unguided.model, SamplerConfig(action_guidance=2.5), latent_size=LATENT)
    first, _, _ = _start(unguided, 2, seed=4)
    second, _, _ = _start(guided, 2, seed=4)
    for _ in range(4):
        assert torch.equal(unguided.step(first), guided.step(second))


def test_setting_action_guidance_applies_from_the_next_block():
    sampler = StreamingSampler(tiny_dit(), SamplerConfig(), latent_size=LATENT)
    keyboard, mouse = _actions(1, 9, seed=5)
    state, _, _ = _start(sampler, 1, seed=3)
    snapshot = state.snapshot()
    plain = sampler.step(state, keyboard, mouse)
    sampler.set_action_guidance(2.0)
    state.restore(snapshot)
    assert sampler.config.action_guidance == 2.0 and not torch.equal(sampler.step(state, keyboard, mouse), plain)
    with pytest.raises(ValueError, match="action_guidance must be a finite number >= 1"):
        sampler.set_action_guidance(0.5)
    assert sampler.config.action_guidance == 2.0  # a refused value leaves the setting as it was


@pytest.mark.parametrize("value", [0.0, 0.99, float("nan"), float("inf")])
def test_bad_action_guidance_is_refused(value):
    with pytest.raises(ValueError, match="action_guidance must be a finite number >= 1"):
        SamplerConfig.from_dict({"action_guidance": value})
    assert SamplerConfig.from_dict({}).action_guidance == 1.0


def test_fused_chains_compiled_on_this_cpu_give_the_eager_latents(sampler):
    """The action modules' fused chains and few-key attention (nn.fusion), compiled by torch.compile,
    stream the same latents as eager code (float32: only rounding differs)."""
    from matrixgame_env.nn import fusion

    eager_state, _, _ = _start(sampler, 2, seed=4)
    eager = _roll(sampler, eager_state, 3)
    fusion.enable_fusion(True)
    try:
        limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
        assert limit >= fusion.RECOMPILE_LIMIT  # several world configurations per process stay fused
        fused_state, _, _ = _start(sampler, 2, seed=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a chain that fell back to eager would warn
            fused = _roll(sampler, fused_state, 3)
    finally:
        fusion.enable_fusion(False)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-4)


def test_action_windows_gather_each_latent_frames_window_and_say_what_is_missing():
    actions = torch.randn(2, 20, 3)
    for first, start in ((-4, 0), (-4, 1), (1, 2), (5, 3)):
        windows = action_windows(actions, first, start, 3, 4)
        for f in range(3):
            for i in range(4):
                video = max(0, 4 * (start + f) - 4 + i)
                assert torch.equal(windows[:, f, i], actions[:, video - first])
        again = action_windows(actions, first, start, 3, 4)  # the same pattern: the cached index
        assert torch.equal(again, windows)
    with pytest.raises(ValueError, match=r"actions hold video frames 5\.\.24 but latent frames 0\.\.2 need 0\.\.7"):
        action_windows(actions, 5, 0, 3, 4)
