"""A decoder shown each video frame's recent actions (nn/frame_actions.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_model import tiny_model_config, tiny_modules

from matrixgame_env.nn.frame_actions import MOUSE_SCALE, FrameModulation, frame_action_features
from matrixgame_env.nn.vae import WanVAE
from matrixgame_env.world.model import WorldModel

TINY = {"dim": 8, "z_dim": 4, "dim_mult": (1, 2, 2, 2), "num_res_blocks": 1, "latent_mean": [0.0] * 4,
        "latent_std": [1.0] * 4}  # fmt: skip


def test_each_frame_gets_the_actions_of_the_frames_before_it_and_zeros_before_the_clip():
    keyboard = torch.arange(2 * 5 * 4, dtype=torch.float32).view(2, 5, 4)
    mouse = -torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2) / 100
    features = frame_action_features(keyboard, mouse, lags=3)
    assert features.shape == (2, 5, 18)
    for b in range(2):
        for f in range(5):
            for lag in range(1, 4):
                block = features[b, f, 6 * (lag - 1) : 6 * lag]
                if f - lag < 0:
                    assert torch.equal(block, torch.zeros(6))
                else:
                    expected = torch.cat([keyboard[b, f - lag], MOUSE_SCALE * mouse[b, f - lag]])
                    assert torch.equal(block, expected)


@pytest.mark.parametrize(
    ("keyboard", "mouse", "lags", "message"),
    [
        (torch.zeros(5, 4), None, 1, "keyboard must be"),
        (torch.zeros(1, 5, 4), torch.zeros(1, 4, 2), 1, "mouse must be"),
        (torch.zeros(1, 5, 4), None, 0, "lags must be"),
    ],
)
def test_action_features_refuse_what_does_not_fit(keyboard, mouse, lags, message):
    with pytest.raises(ValueError, match=message):
        frame_action_features(keyboard, mouse, lags)


def test_a_modulation_starts_as_the_identity_and_uses_each_frames_own_features():
    torch.manual_seed(0)
    modulation = FrameModulation(channels=3, features=6)
    x = torch.randn(2, 3, 4, 5, 5)
    features = torch.randn(2, 4, 6)
    assert torch.equal(modulation(x, features), x)
    torch.nn.init.normal_(modulation.mlp[-1].weight)
    out = modulation(x, features)
    changed = features.clone()
    changed[:, 2] += 1.0  # only frame 2's features change
    out_changed = modulation(x, changed)
    assert torch.equal(out[:, :, [0, 1, 3]], out_changed[:, :, [0, 1, 3]])
    assert not torch.allclose(out[:, :, 2], out_changed[:, :, 2])
    # The last T rows of longer features are the frames'.
    assert torch.equal(modulation(x[:, :, 2:], features), modulation(x[:, :, 2:], features[:, 2:]))
    with pytest.raises(ValueError, match="frame action features must be"):
        modulation(x, features[:, :3])


def test_a_decoder_shown_actions_starts_as_the_plain_one_and_keeps_its_weights_names():
    torch.manual_seed(0)
    plain = WanVAE(**TINY)
    shown = WanVAE(**TINY, decoder_frame_actions=18)
    result = shown.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".frame_modulations." in key for key in result.missing_keys)
    assert shown.decoder.shown_actions and not plain.decoder.shown_actions
    assert WanVAE.from_config(shown.config).config == shown.config
    assert "decoder_frame_actions" not in plain.config  # official configs stay as they are
    z = torch.randn(2, 4, 3, 4, 6)
    keyboard, mouse = (torch.rand(2, 9, 4) > 0.5).float(), 0.1 * torch.randn(2, 9, 2)
    features = frame_action_features(keyboard, mouse, 3)
    with torch.no_grad():
        assert torch.equal(shown.decode_unnormalised(z, features), plain.decode_unnormalised(z))


def test_a_trained_decoder_shown_actions_draws_each_frame_from_its_own_and_earlier_actions():
    torch.manual_seed(0)
    shown = WanVAE(**TINY, decoder_frame_actions=6)
    for module in shown.decoder.frame_modulations.values():
        torch.nn.init.normal_(module.mlp[-1].weight, std=0.5)
    z = torch.randn(1, 4, 3, 4, 6)
    keyboard = torch.zeros(1, 9, 4)
    features = frame_action_features(keyboard, torch.zeros(1, 9, 2), 1)
    changed = keyboard.clone()
    changed[0, 6, 0] = 1.0  # frame 6's action: shown to frame 7 (lag 1), which later frames see through the cache
    changed_features = frame_action_features(changed, torch.zeros(1, 9, 2), 1)
    with torch.no_grad():
        before = shown.decode_unnormalised(z, features)
        after = shown.decode_unnormalised(z, changed_features)
    same = (before - after).abs().amax(dim=(0, 1, 3, 4))
    assert torch.all(same[:7] == 0)  # frames up to 6 do not see frame 6's action
    assert same[7] > 0


def test_decoding_refuses_actions_a_decoder_is_not_shown_and_misses_those_it_is():
    plain = WanVAE(**TINY)
    shown = WanVAE(**TINY, decoder_frame_actions=6)
    z = torch.randn(1, 4, 3, 4, 6)
    features = torch.zeros(1, 9, 6)
    with torch.no_grad():
        with pytest.raises(ValueError, match="not shown actions"):
            plain.decode_unnormalised(z, features)
        with pytest.raises(ValueError, match="give frame_actions"):
            shown.decode_unnormalised(z)
        with pytest.raises(ValueError, match=r"frame_actions must be \[B=1, T=9"):
            shown.decode_unnormalised(z, features[:, :8])
    with pytest.raises(ValueError, match="decoder_frame_actions must be"):
        WanVAE(**TINY, decoder_frame_actions=-1)


def test_a_world_model_refuses_a_decoder_it_cannot_stream_the_actions_to():
    config = tiny_model_config()
    dit, vae, clip = tiny_modules(config)
    shown = WanVAE.from_config({**vae.config, "decoder_frame_actions": 6})
    with pytest.raises(ValueError, match="does not stream; decode its latents with"):
        WorldModel(dit, shown, clip, config)
    assert WorldModel(dit, vae, clip, config).vae is vae
