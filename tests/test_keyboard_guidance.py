"""A separate guidance scale for the keyboard (`SamplerConfig.keyboard_guidance`): compositional
guidance f_none + g_a (f_mouse - f_none) + g_k (f_full - f_mouse), and its plumbing."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types

import numpy as np
import pytest
import torch
from tiny import tiny_dit, tiny_dit_config
from tiny_model import write_tiny_model
from tiny_training import run_cli

from matrixgame_env.nn.action import action_windows
from matrixgame_env.nn.attention import block_causal_frame_mask
from matrixgame_env.nn.dit import CausalDiT
from matrixgame_env.world.condition import first_frame_mask
from matrixgame_env.world.sampler import SamplerConfig, StreamingSampler

LATENT = (4, 8)
STEPS = (1000, 666, 333)
MESSAGE = "keyboard_guidance must be a finite number >= 1"


def _start(sampler, batch=1, seed=3):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 16, 2, *LATENT, generator=g)
    context = torch.randn(batch, 5, 1280, generator=g)
    return sampler.start(image, context, seed=seed), image, context


def _actions(sampler, state, seed):
    """Random keys (at least one pressed in every frame) and mouse moves for the next block."""
    frames, batch = sampler.video_frames_for_block(state), state.batch_size
    g = torch.Generator().manual_seed(seed)
    keyboard = mouse = None
    if sampler.keyboard_dim:
        keyboard = (torch.rand(batch, frames, sampler.keyboard_dim, generator=g) > 0.5).float()
        keyboard[..., 0] = 1.0
    if sampler.mouse_dim:
        mouse = 0.1 * torch.randn(batch, frames, 2, generator=g)
    return keyboard, mouse


class _Calls:
    """Records every DiT forward call: its keyword inputs (actions) and its output (the flow)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.inputs: list[dict] = []
        self.latents: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.flows: list[torch.Tensor] = []
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(lambda module, args, out: self.flows.append(out.clone())),
        ]

    def _before(self, module, args, kwargs):
        self.inputs.append(dict(kwargs))
        self.latents.append(args[0].clone())
        self.timesteps.append(args[2].clone())

    def __len__(self) -> int:
        return len(self.inputs)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _two_pass_denoise_block(self, state, inputs, before_refresh=None):
    """The sampler's block as it was before the keyboard scale existed (one scale for all actions),
    written out here as the reference that equal scales must reproduce bit for bit."""
    model = self.model
    kwargs = dict(
        context=state.context,
        mouse_windows=inputs.mouse_windows,
        keyboard_windows=inputs.keyboard_windows,
        start_frame=state.frame,
        caches=state.caches,
        rotations=inputs.rotations,
    )
    x = inputs.noise
    timestep = torch.empty(x.shape[0], x.shape[2], device=x.device)
    g = self.config.action_guidance
    none = {k: (torch.zeros_like(v) if k.endswith("_windows") and v is not None else v) for k, v in kwargs.items()}
    x0 = x
    for k, (t, sigma) in enumerate(zip(self.timesteps, self.sigmas)):
        timestep.fill_(t)
        if g != 1.0:
            f_none = model(x, inputs.cond, timestep, **none).double()
            f_full = model(x, inputs.cond, timestep, **kwargs).double()
            flow = f_full + (g - 1.0) * (f_full - f_none)
        else:
            flow = model(x, inputs.cond, timestep, **kwargs)
        x0 = (x.double() - sigma * flow.double()).float()
        if k + 1 < len(self.timesteps):
            x = (1 - self.sigmas[k + 1]) * x0 + self.sigmas[k + 1] * inputs.renoise[k]
    if before_refresh is not None:
        before_refresh(x0)
    model(x0, inputs.cond, timestep.fill_(self.config.context_noise), **kwargs)
    return x0


def _stream(sampler, blocks=4):
    """Latents of `blocks` blocks of one world and the DiT calls of each block."""
    state, _, _ = _start(sampler)
    out, calls = [], []
    for b in range(blocks):
        recorder = _Calls(sampler.model)
        try:
            out.append(sampler.step(state, *_actions(sampler, state, seed=20 + b)))
        finally:
            recorder.remove()
        calls.append(len(recorder))
    return torch.cat(out, dim=2), calls


# ---------------------------------------------------------------------- equal scales: today's sampler


@pytest.mark.parametrize(
    "action_guidance, keyboard_guidance",
    [(1.0, None), (1.0, 1.0), (2.5, None), (2.5, 2.5)],
)
def test_equal_scales_run_exactly_the_two_pass_sampler(action_guidance, keyboard_guidance):
    model = tiny_dit()
    reference = StreamingSampler(model, SamplerConfig(action_guidance=action_guidance), latent_size=LATENT)
    reference.denoise_block = types.MethodType(_two_pass_denoise_block, reference)
    config = SamplerConfig(action_guidance=action_guidance, keyboard_guidance=keyboard_guidance)
    sampler = StreamingSampler(model, config, latent_size=LATENT)
    expected, expected_calls = _stream(reference)
    latents, calls = _stream(sampler)
    assert torch.equal(latents, expected)  # bit for bit, over blocks that read the earlier blocks' caches
    passes = 1 if action_guidance == 1.0 else 2
    assert calls == expected_calls == [passes * len(STEPS) + 1] * 4


# ---------------------------------------------------------------------- different scales: three passes


def _zero(t: torch.Tensor) -> bool:
    return not bool(t.abs().sum())


@pytest.mark.parametrize("g_a, g_k", [(2.0, 4.0), (1.0, 3.0), (3.0, 1.0)])
def test_separate_keyboard_scale_composes_the_three_flows(g_a, g_k):
    """The first block equals a float64 reference built from DiT runs without caches (the training
    path), and the sampler's own three calls per step get the expected inputs and combine as stated."""
    sampler = StreamingSampler(tiny_dit(), SamplerConfig(action_guidance=g_a, keyboard_guidance=g_k),
                               latent_size=LATENT)  # fmt: skip
    model = sampler.model
    state, image, context = _start(sampler)
    keyboard, mouse = _actions(sampler, state, seed=5)
    g = torch.Generator().manual_seed(9)
    shape = (1, 16, 3, *LATENT)
    noise = torch.randn(shape, generator=g)
    renoise = [torch.randn(shape, generator=g) for _ in STEPS[1:]]

    calls = _Calls(model)
    try:
        x0 = sampler.step(state, keyboard, mouse, noise=noise, renoise=renoise)
    finally:
        calls.remove()
    assert len(calls) == 3 * len(STEPS) + 1  # three passes per step, then the clean-context run

    # The inputs: no actions, the mouse alone, all actions; the clean-context run has all actions.
    window = sampler.action_window
    keys = action_windows(keyboard, 0, 0, 3, window)
    looks = action_windows(mouse, 0, 0, 3, window)
    assert not _zero(keys) and not _zero(looks)
    for k in range(len(STEPS)):
        none, mouse_only, full = calls.inputs[3 * k : 3 * k + 3]
        assert _zero(none["keyboard_windows"]) and _zero(none["mouse_windows"])
        assert _zero(mouse_only["keyboard_windows"]) and torch.equal(mouse_only["mouse_windows"], looks)
        assert torch.equal(full["keyboard_windows"], keys) and torch.equal(full["mouse_windows"], looks)
        assert torch.equal(calls.latents[3 * k], calls.latents[3 * k + 2])  # all three at the same x
    assert torch.equal(calls.inputs[-1]["keyboard_windows"], keys)
    assert torch.equal(calls.inputs[-1]["mouse_windows"], looks)

    # The combination, in float64, of the flows the sampler got, with its re-noising between steps.
    x = noise
    for k, t in enumerate(sampler.timesteps):
        assert torch.equal(calls.latents[3 * k], x)
        assert all(bool((step_t == t).all()) for step_t in calls.timesteps[3 * k : 3 * k + 3])
        f_none, f_mouse, f_full = (f.double() for f in calls.flows[3 * k : 3 * k + 3])
        flow = f_none + g_a * (f_mouse - f_none) + g_k * (f_full - f_mouse)
        step_x0 = (x.double() - sampler.sigmas[k] * flow).float()
        if k + 1 < len(STEPS):
            x = (1 - sampler.sigmas[k + 1]) * step_x0 + sampler.sigmas[k + 1] * renoise[k]
    torch.testing.assert_close(x0, step_x0, rtol=0, atol=1e-6)

    # An independent reference: the DiT without caches on the block alone (training path), in float64.
    cond = torch.cat([first_frame_mask(1, 4, 0, 3, *LATENT), state.image.frames(0, 3)], 1)
    mask = block_causal_frame_mask(3, 3, sampler.window_frames)

    def run(x, t, keyboard_windows, mouse_windows):
        with torch.no_grad():
            flow = model(x, cond, torch.full((1, 3), t), context, mouse_windows=mouse_windows,
                         keyboard_windows=keyboard_windows, frame_mask=mask)  # fmt: skip
        return flow.double()

    x = noise
    alone = {}
    for k, t in enumerate(sampler.timesteps):
        f_none = run(x, t, torch.zeros_like(keys), torch.zeros_like(looks))
        f_mouse = run(x, t, torch.zeros_like(keys), looks)
        f_full = run(x, t, keys, looks)
        flow = f_none + g_a * (f_mouse - f_none) + g_k * (f_full - f_mouse)
        reference = (x.double() - sampler.sigmas[k] * flow).float()
        for scale in {g_a, g_k}:  # what one scale for all actions would give instead
            alone[scale] = (x.double() - sampler.sigmas[k] * (f_none + scale * (f_full - f_none))).float()
        if k + 1 < len(STEPS):
            x = (1 - sampler.sigmas[k + 1]) * reference + sampler.sigmas[k + 1] * renoise[k]
    tolerance = 2e-5  # the cached and the cacheless DiT differ by float32 rounding (about 4e-6 here)
    torch.testing.assert_close(x0, reference, rtol=0, atol=tolerance)
    # The check can fail: at the last step alone, one scale for all actions already misses by far more.
    for scale, single in alone.items():
        assert (single - reference).abs().max() > 50 * tolerance, scale


def test_keyboard_scale_acts_between_mouse_only_and_full_actions():
    """With a single denoising step x0 is affine in g_k at fixed g_a: g_k = 5 moves x0 twice as far
    from g_k = 1 as g_k = 3 does, and g_k changes nothing when no key is pressed."""

    def first_block(g_k, no_keys=False):
        config = SamplerConfig(denoising_steps=(1000,), action_guidance=2.0, keyboard_guidance=g_k)
        sampler = StreamingSampler(tiny_dit(), config, latent_size=LATENT)
        state, _, _ = _start(sampler)
        keyboard, mouse = _actions(sampler, state, seed=5)
        return sampler.step(state, torch.zeros_like(keyboard) if no_keys else keyboard, mouse)

    blocks = {g_k: first_block(g_k) for g_k in (1.0, 3.0, 5.0)}
    step = blocks[3.0] - blocks[1.0]
    assert step.abs().max() > 1e-3
    torch.testing.assert_close(blocks[5.0] - blocks[1.0], 2 * step, rtol=0, atol=1e-5)
    # No key pressed: the full flow is the mouse-only flow, so the keyboard scale has nothing to scale.
    torch.testing.assert_close(first_block(5.0, no_keys=True), first_block(2.0, no_keys=True), rtol=0, atol=1e-6)


def test_three_pass_blocks_keep_later_blocks_consistent():
    """The extra passes' cache writes are overwritten by the block's own: streaming without actions,
    any scales give the unguided blocks bit for bit, over several blocks."""
    plain = StreamingSampler(tiny_dit(), SamplerConfig(), latent_size=LATENT)
    guided = StreamingSampler(plain.model, SamplerConfig(action_guidance=1.5, keyboard_guidance=4.0),
                              latent_size=LATENT)  # fmt: skip
    first, _, _ = _start(plain, 2)
    second, _, _ = _start(guided, 2)
    for _ in range(4):
        assert torch.equal(plain.step(first), guided.step(second))


# ---------------------------------------------------------------------- models with one action kind


def test_keyboard_only_model_uses_the_keyboard_scale_with_two_passes():
    """templerun takes no mouse: f_mouse is f_none, so the keyboard scale is the one scale."""
    model = tiny_dit("templerun")
    steps = (1000, 750, 500, 250)
    by_keyboard = StreamingSampler(model, SamplerConfig(steps, action_guidance=1.0, keyboard_guidance=3.0),
                                   latent_size=LATENT)  # fmt: skip
    also_action = StreamingSampler(model, SamplerConfig(steps, action_guidance=2.0, keyboard_guidance=3.0),
                                   latent_size=LATENT)  # fmt: skip
    reference = StreamingSampler(model, SamplerConfig(steps, action_guidance=3.0), latent_size=LATENT)
    reference.denoise_block = types.MethodType(_two_pass_denoise_block, reference)
    unguided = StreamingSampler(model, SamplerConfig(steps), latent_size=LATENT)
    assert by_keyboard.guidance_scales() == also_action.guidance_scales() == (3.0, 3.0)
    expected, expected_calls = _stream(reference)
    for sampler in (by_keyboard, also_action):
        latents, calls = _stream(sampler)
        assert torch.equal(latents, expected)
        assert calls == expected_calls == [2 * len(steps) + 1] * 4
    plain, plain_calls = _stream(unguided)
    assert plain_calls == [len(steps) + 1] * 4
    assert (plain - expected).abs().max() > 1e-3  # the scale does act


def test_model_without_keyboard_ignores_the_keyboard_scale():
    config = tiny_dit_config()
    config["action_config"]["enable_keyboard"] = False
    config["clip_dim"] = 1280
    torch.manual_seed(0)
    model = CausalDiT.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / max(1, p.shape[-1]) ** 0.5)
    sampler = StreamingSampler(model, SamplerConfig(action_guidance=2.0, keyboard_guidance=5.0), latent_size=LATENT)
    reference = StreamingSampler(model, SamplerConfig(action_guidance=2.0), latent_size=LATENT)
    reference.denoise_block = types.MethodType(_two_pass_denoise_block, reference)
    assert sampler.keyboard_dim == 0 and sampler.guidance_scales() == (2.0, 2.0)
    expected, expected_calls = _stream(reference)
    latents, calls = _stream(sampler)
    assert torch.equal(latents, expected) and calls == expected_calls == [2 * len(STEPS) + 1] * 4


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize("value", [0.5, 0.0, -2.0, float("nan"), float("inf"), "2", "abc", True])
def test_bad_keyboard_guidance_is_refused_with_what_is_accepted(value):
    for make in (
        lambda: SamplerConfig(keyboard_guidance=value),
        lambda: SamplerConfig.from_dict({"keyboard_guidance": value}),
    ):
        with pytest.raises(ValueError, match=MESSAGE) as error:
            make()
        assert f"got {value!r}" in str(error.value) and "or None (the same as action_guidance)" in str(error.value)
    sampler = StreamingSampler(tiny_dit(), SamplerConfig(keyboard_guidance=2.0), latent_size=LATENT)
    with pytest.raises(ValueError, match=MESSAGE):
        sampler.set_keyboard_guidance(value)
    assert sampler.config.keyboard_guidance == 2.0  # a refused value leaves the setting as it was


def test_keyboard_guidance_from_dict_and_round_trip():
    assert SamplerConfig.from_dict({}).keyboard_guidance is None
    assert SamplerConfig.from_dict({"keyboard_guidance": None}).keyboard_guidance is None
    config = SamplerConfig.from_dict({"action_guidance": 1.5, "keyboard_guidance": 3})
    assert config.keyboard_guidance == 3.0 and isinstance(config.keyboard_guidance, float)
    assert config.effective_keyboard_guidance == 3.0
    assert SamplerConfig(action_guidance=2.5).effective_keyboard_guidance == 2.5
    again = SamplerConfig.from_dict(dataclasses.asdict(config))
    assert again == config
    assert SamplerConfig.from_dict(dataclasses.asdict(SamplerConfig())) == SamplerConfig()


def test_setting_keyboard_guidance_applies_from_the_next_block():
    sampler = StreamingSampler(tiny_dit(), SamplerConfig(action_guidance=2.0), latent_size=LATENT)
    state, _, _ = _start(sampler)
    actions = _actions(sampler, state, seed=5)
    snapshot = state.snapshot()
    plain = sampler.step(state, *actions)
    sampler.set_keyboard_guidance(4.0)
    assert sampler.config.keyboard_guidance == 4.0 and sampler.guidance_scales() == (2.0, 4.0)
    state.restore(snapshot)
    assert not torch.equal(sampler.step(state, *actions), plain)
    sampler.set_keyboard_guidance(None)
    state.restore(snapshot)
    assert sampler.guidance_scales() == (2.0, 2.0) and torch.equal(sampler.step(state, *actions), plain)


class _Graphs:
    def __init__(self) -> None:
        self.cleared = 0

    def clear(self) -> None:
        self.cleared += 1


def test_setting_keyboard_guidance_drops_captured_graphs():
    sampler = StreamingSampler(tiny_dit(), SamplerConfig(), latent_size=LATENT)
    sampler.graphs = _Graphs()  # stands in for the CUDA graphs, which hold the old passes and scales
    sampler.set_keyboard_guidance(3.0)
    sampler.set_keyboard_guidance(None)
    assert sampler.graphs.cleared == 2


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_graphs_follow_the_keyboard_scale():
    """Graph replays give the eager latents with three passes, and after the scale changes mid-stream."""
    from matrixgame_env.world.model import WorldModel

    world = WorldModel.from_pretrained("doom-small", device="cuda", dtype=torch.float32)
    results = {}
    for graphs in (False, True):
        world.sampler.enable_cuda_graphs(graphs)
        world.sampler.set_action_guidance(1.5)
        world.sampler.set_keyboard_guidance(4.0)
        state = world.start([str(world.start_image_paths()[0])], seed=7)
        latents = []
        for b in range(12):
            if b == 6:
                world.sampler.set_keyboard_guidance(None)  # two passes from here on
            if b == 9:
                world.sampler.set_keyboard_guidance(2.5)  # three again, another scale
            keys = torch.zeros(1, 4)
            keys[:, b % 4] = 1
            latents.append(world.step_latents(state, keys, torch.tensor([[0.0, 0.05]])).cpu())
        results[graphs] = torch.cat(latents, 2)
        if graphs:
            assert world.sampler.graphs.replays >= 4
        world.sampler.enable_cuda_graphs(False)
    eager, fast = results[False], results[True]
    assert (eager - fast).abs().max() <= 1e-4 * eager.abs().max()


# ---------------------------------------------------------------------- envs and command lines


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-keyboard-guidance"))


def test_keyboard_guidance_option_reaches_the_sampler_and_changes_the_frames(world_folder):
    from matrixgame_env.env import MatrixGameEnv
    from matrixgame_env.vector import MatrixGameVectorEnv
    from matrixgame_env.world.model import WorldModel

    own = WorldModel.from_pretrained(world_folder, device="cpu")
    action = {"keyboard": np.array([1, 0, 0, 0], np.int8), "mouse": np.array([0.0, 0.1], np.float32)}
    frames = {}
    for scale in (None, 4.0):
        env = MatrixGameEnv(model=own, action_guidance=2.0, keyboard_guidance=scale)
        assert own.sampler.config.keyboard_guidance == scale
        env.reset(seed=3)
        frames[scale] = env.step(action)[0]
    assert not np.array_equal(frames[None], frames[4.0])
    vector = MatrixGameVectorEnv(own, num_envs=2, keyboard_guidance=2.5)
    assert vector.world.sampler.config.keyboard_guidance == 2.5
    with pytest.raises(ValueError, match=MESSAGE):
        MatrixGameEnv(model=own, keyboard_guidance=0.5)
    with pytest.raises(ValueError, match=MESSAGE):
        MatrixGameVectorEnv(own, num_envs=1, keyboard_guidance=float("nan"))


def test_play_accepts_keyboard_guidance():
    pytest.importorskip("pygame")
    from matrixgame_env.viewer import add_play_arguments

    parser = add_play_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).keyboard_guidance is None
    assert parser.parse_args(["--keyboard-guidance", "3"]).keyboard_guidance == 3.0


@pytest.mark.parametrize("value", ["0.5", "nan", "inf"])
def test_eval_keyboard_guidance_below_one_is_a_clear_error(value, tmp_path):
    status, errors = run_cli("eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"),
                             "--out", str(tmp_path / "out"), "--keyboard-guidance", value, "--device", "cpu",
                             "--no-progress")  # fmt: skip
    assert status == 2 and f"--keyboard-guidance must be a finite number >= 1 (1: off), got {float(value)}" in errors
    assert "Traceback" not in errors


def test_eval_records_the_effective_keyboard_guidance(tmp_path_factory):
    from tiny_training import VAL_FRACTION, tiny_dataset

    from matrixgame_env.model_config import ModelConfig

    dataset = tiny_dataset(tmp_path_factory)
    model = write_tiny_model(tmp_path_factory.mktemp("eval_keyboard_model") / "model")
    config = ModelConfig.load(model)
    config.fps = 17.5  # the recording's frame rate
    config.save(model / "config.json")
    settings = {}
    for name, options in {"default": (), "set": ("--action-guidance", "1.5", "--keyboard-guidance", "3")}.items():
        out = tmp_path_factory.mktemp(f"eval_keyboard_{name}")
        status, errors = run_cli("eval", "--model", str(model), "--data", str(dataset), "--out", str(out),
                                 "--val-fraction", VAL_FRACTION, "--clips", "0", "--steps", "0", "--drift-minutes",
                                 "0", *options, "--device", "cpu", "--no-progress")  # fmt: skip
        assert status == 0, errors
        settings[name] = json.loads((out / "eval.json").read_text())["settings"]
    default_guidance = settings["default"]["action_guidance"]
    assert settings["default"]["keyboard_guidance"] == default_guidance  # None: the action guidance
    assert (settings["set"]["action_guidance"], settings["set"]["keyboard_guidance"]) == (1.5, 3.0)
