"""CLIP vision encoder: checkpoint layout, agreement with the official outputs, input checking."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MANIFEST_DIR, Fixture, load_fixture, max_relative_error

from matrixgame_env.nn.clip import CLIPVisionEncoder, split_visual_state_dict

CONFIG_KEYS = ("image_size", "patch_size", "dim", "num_heads", "num_layers", "mlp_ratio", "norm_eps")
TOLERANCE = 1e-4


def _manifest(name: str) -> dict[str, dict]:
    return json.loads((MANIFEST_DIR / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    return load_fixture("clip_visual")


@pytest.fixture(scope="module")
def encoder(fixture: Fixture) -> CLIPVisionEncoder:
    """The fixture's reduced tower, loaded from its weights, float32 on CPU."""
    model = CLIPVisionEncoder.from_config({key: fixture.spec["model"][key] for key in CONFIG_KEYS})
    used, _ = split_visual_state_dict(fixture.weights())
    model.load_state_dict(used, strict=True)
    return model.eval()


def _image(fixture: Fixture) -> torch.Tensor:
    """The fixture's start frame as [B, 3, H, W] (stored as [B, 3, T=1, H, W])."""
    return fixture.input("image").squeeze(2)


def _output(fixture: Fixture, key: str) -> torch.Tensor:
    """An output named in the JSON's `outputs` section (file + tensor entry, or a tensor of the io file)."""
    entry = fixture.spec["outputs"][key]
    if isinstance(entry, dict) and "tensor" in entry:
        return fixture.tensor(entry.get("file", fixture.spec["files"]["io"]), entry["tensor"])
    return fixture.io(key)


def test_parameters_match_used_manifest_keys_at_full_size() -> None:
    manifest = _manifest("clip_visual")
    expected = {
        key.removeprefix("visual."): tuple(entry["shape"])
        for key, entry in manifest.items()
        if entry["used_for_visual_context"]
    }
    with torch.device("meta"):
        model = CLIPVisionEncoder()
    actual = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert actual == expected
    assert model.num_tokens == 257


def test_split_full_checkpoint_loads_strictly_and_reports_dropped_keys() -> None:
    full_layout = _manifest("clip_full")
    visual_layout = _manifest("clip_visual")
    with torch.device("meta"):
        full_state_dict = {key: torch.empty(entry["shape"]) for key, entry in full_layout.items()}
        model = CLIPVisionEncoder()

    used, unused_names = split_visual_state_dict(full_state_dict)

    dropped_visual = {key for key, entry in visual_layout.items() if not entry["used_for_visual_context"]}
    non_visual = {key for key in full_layout if not key.startswith("visual.")}
    assert set(unused_names) == dropped_visual | non_visual
    assert len(unused_names) == len(set(unused_names))
    model.load_state_dict(used, strict=True, assign=True)
    assert all(used[name] is full_state_dict["visual." + name] for name in used)


def test_split_names_missing_visual_keys() -> None:
    with torch.device("meta"):
        state_dict = {"visual." + name: t for name, t in CLIPVisionEncoder(num_layers=4).state_dict().items()}
    # The checkpoint's last block (index 3) is what tells the tower has 4 blocks.
    state_dict["visual.transformer.3.norm1.weight"] = torch.empty(1280, device="meta")
    del state_dict["visual.pre_norm.bias"]
    del state_dict["visual.transformer.1.attn.to_qkv.weight"]
    with pytest.raises(ValueError, match="lacks 2 visual key") as error:
        split_visual_state_dict(state_dict)
    assert "visual.pre_norm.bias" in str(error.value)
    assert "visual.transformer.1.attn.to_qkv.weight" in str(error.value)


def test_split_rejects_unknown_keys() -> None:
    with torch.device("meta"):
        state_dict = {"visual." + name: t for name, t in CLIPVisionEncoder(num_layers=3).state_dict().items()}
    state_dict["visual.extra_token"] = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match=r"visual\.extra_token"):
        split_visual_state_dict(state_dict, num_layers=3)


def test_config_round_trips() -> None:
    with torch.device("meta"):
        model = CLIPVisionEncoder(dim=64, num_heads=4, num_layers=5)
        rebuilt = CLIPVisionEncoder.from_config(model.config)
    assert rebuilt.config == model.config
    assert len(rebuilt.transformer) == 4


def test_from_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="pool_type"):
        CLIPVisionEncoder.from_config({"dim": 64, "pool_type": "token"})


def test_preprocess_matches_fixture(fixture: Fixture, encoder: CLIPVisionEncoder) -> None:
    expected = _output(fixture, "preprocessed")
    actual = encoder.preprocess(_image(fixture))
    assert actual.shape == expected.shape
    assert actual.dtype == torch.float32
    assert max_relative_error(actual, expected) <= TOLERANCE


@torch.no_grad()
def test_tokens_match_fixture(fixture: Fixture, encoder: CLIPVisionEncoder) -> None:
    expected = _output(fixture, "tokens")
    actual = encoder(_image(fixture))
    assert actual.shape == expected.shape
    assert actual.shape[1] == encoder.num_tokens
    assert max_relative_error(actual, expected) <= TOLERANCE


@torch.no_grad()
def test_bfloat16_stays_close_to_fixture(fixture: Fixture, encoder: CLIPVisionEncoder) -> None:
    model = CLIPVisionEncoder.from_config(encoder.config).to(torch.bfloat16)
    model.load_state_dict(encoder.state_dict())
    actual = model(_image(fixture).bfloat16())
    assert actual.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits; measured error is ~0.007 relative to the largest token value.
    assert max_relative_error(actual, _output(fixture, "tokens")) <= 3e-2


@torch.no_grad()
def test_batch_equals_each_image_alone(fixture: Fixture, encoder: CLIPVisionEncoder) -> None:
    first = _image(fixture)
    second = -first.flip(-1)
    batched = encoder(torch.cat([first, second]))
    assert max_relative_error(batched[:1], encoder(first)) <= 1e-6
    assert max_relative_error(batched[1:], encoder(second)) <= 1e-6
    assert not torch.allclose(batched[0], batched[1])


def test_accepts_values_just_outside_range_from_rounding(encoder: CLIPVisionEncoder) -> None:
    frames = torch.full((1, 3, 8, 8), 1.0 + 1e-4)
    assert encoder.preprocess(frames).shape == (1, 3, encoder.image_size, encoder.image_size)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (torch.zeros(3, 8, 8), r"4-D.*\(3, 8, 8\)"),
        (torch.zeros(1, 4, 8, 8), r"3 \(RGB\) channels.*\(1, 4, 8, 8\)"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), r"floating-point.*torch\.uint8"),
        (torch.zeros(1, 3, 8, 8).index_fill(2, torch.tensor([3]), float("nan")), "NaN"),
        (torch.linspace(0.0, 255.0, 192).view(1, 3, 8, 8), r"\[-1, 1\].*255"),
    ],
    ids=["three_dims", "four_channels", "uint8", "nan", "zero_to_255"],
)
def test_bad_frames_raise_value_error(encoder: CLIPVisionEncoder, frames: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encoder(frames)
