"""The DiT, its action module and the streaming sampler reproduce the official golden fixtures.

Every size, mode and step list is read from the fixture JSON, so any fixture set of the same
format (MATRIXGAME_FIXTURES) is checked by the same tests.
"""

import pytest
import torch
from conftest import load_fixture, max_relative_error, subsample_strides

from matrixgame_env.nn.action import ActionCaches, ActionModule, action_windows
from matrixgame_env.nn.config import ActionConfig
from matrixgame_env.reference import replay_dit_fixture
from matrixgame_env.world.cache import RingKVCache
from matrixgame_env.world.condition import first_frame_mask

TOLERANCE = 1e-4


def _subsample(t: torch.Tensor, strides: list[int]) -> torch.Tensor:
    """Apply strides to the last len(strides) dims ('[..., ::4, ::4]')."""
    index = [slice(None)] * (t.dim() - len(strides)) + [slice(None, None, s) for s in strides]
    return t[tuple(index)]


def _token_subsample(t: torch.Tensor, description: str) -> torch.Tensor:
    """'[:, ::8] over the tokens' -> stride on dim 1."""
    (stride,) = subsample_strides(description)
    return t[:, ::stride]


@pytest.fixture(scope="module")
def streamed():
    """Replay the official streaming run: (fixture, per-call flows, output latents, sampler)."""
    f = load_fixture("dit_universal")
    replay = replay_dit_fixture(f)
    return f, replay.flows, replay.latents, replay.sampler


def test_sampler_builds_the_fixture_mask_channels():
    f = load_fixture("dit_universal")
    cond, noise = f.input("cond_concat"), f.input("noise")
    mask_channels = cond.shape[1] - noise.shape[1]
    expected = first_frame_mask(noise.shape[0], mask_channels, 0, cond.shape[2], *noise.shape[-2:])
    assert torch.equal(cond[:, :mask_channels], expected)


def test_warped_timesteps_match(streamed):
    f, _, _, sampler = streamed
    assert sampler.timesteps == pytest.approx(f.spec["pipeline_config"]["warped_timesteps"], rel=1e-6)


def test_every_model_call_matches_in_order(streamed):
    f, flows, _, _ = streamed
    strides = subsample_strides(f.spec["outputs"]["per_call_flow_pred"])
    calls = f.spec["calls"]
    assert len(flows) == len(calls)
    for flow, call in zip(flows, calls):
        expected = f.io(call["flow_pred_sub"])
        error = max_relative_error(_subsample(flow, strides), expected)
        assert error < TOLERANCE, f"call {call['index']} ({call['kind']}, block {call['block']}): error {error:.2e}"


def test_every_model_call_matches_full_tensor_stats(streamed):
    f, flows, _, _ = streamed
    for flow, call in zip(flows, f.spec["calls"]):
        stats = call["flow_pred_stats"]
        assert flow.double().abs().sum().item() == pytest.approx(stats["abs_sum"], rel=1e-4)
        assert flow.abs().max().item() == pytest.approx(stats["max_abs"], rel=1e-4, abs=1e-4)


def test_whole_latent_sequence_matches(streamed):
    f, _, latents, _ = streamed
    expected = f.io(f.spec["outputs"]["output_latents"]["tensor"])
    assert latents.shape == expected.shape
    assert max_relative_error(latents, expected) < TOLERANCE


def test_cache_counters_follow_the_official_ones(streamed):
    f, _, _, sampler = streamed
    last = f.spec["calls"][-1]["cache_after_call_layer0"]
    frames = last["keyboard"]["global_end_index"]
    assert frames == f.spec["pipeline_config"]["num_latent_frames"]
    assert last["self_attn"]["global_end_index"] == frames * sampler.tokens_per_frame
    assert last["self_attn"]["local_end_index"] == min(frames, sampler.window_frames) * sampler.tokens_per_frame


def test_action_module_alone_matches_branch_by_branch():
    f = load_fixture("action_universal")
    config = ActionConfig.from_dict(f.spec["action_config"])
    module = ActionModule(config).eval()
    prefix = "blocks.0.action_model."
    module.load_state_dict({k[len(prefix) :]: v for k, v in f.weights().items()}, strict=True)
    capacity = f.spec["caches_initial"]["KB"]["k,v"][1]
    spatial = f.spec["caches_initial"]["MS"]["k,v"][0]
    caches = ActionCaches(
        RingKVCache((1, spatial), capacity, 1, config.heads_num, config.head_dim) if config.enable_mouse else None,
        RingKVCache((1,), capacity, 1, config.heads_num, config.head_dim),
    )
    keyboard, window = f.io("keyboard_cond"), config.window_video_frames
    mouse = f.io("mouse_cond") if config.enable_mouse else None
    fpb = 3
    for call in f.spec["calls"]:
        s = call["start_frame"]
        with torch.no_grad():
            out, mouse_branch, keyboard_branch = module(
                f.io(call["x"]),
                fpb,
                s,
                None if mouse is None else action_windows(mouse, 0, s, fpb, window),
                action_windows(keyboard, 0, s, fpb, window),
                caches,
                return_branches=True,
            )
        sub = f.spec["subsample"]
        assert max_relative_error(_token_subsample(out, sub), f.io(call["out_sub"])) < TOLERANCE
        assert max_relative_error(_token_subsample(keyboard_branch, sub), f.io(call["keyboard_branch_sub"])) < TOLERANCE
        if config.enable_mouse:
            assert max_relative_error(_token_subsample(mouse_branch, sub), f.io(call["mouse_branch_sub"])) < TOLERANCE
        assert caches.keyboard.end_frame == call["keyboard_cache_after_global_local"][0]
