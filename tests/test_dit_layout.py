"""Parameter names and shapes equal the official checkpoint manifests, for every official config."""

import json

import pytest
import torch
from conftest import CONFIG_DIR, MANIFEST_DIR

from matrixgame_env.nn import CausalDiT
from matrixgame_env.nn.config import DiTConfig

MODES = ["universal", "gta_drive", "templerun", "foundation"]


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_matches_manifest(mode):
    config = json.loads((CONFIG_DIR / mode / "config.json").read_text())
    manifest = json.loads((MANIFEST_DIR / f"dit_{mode}.json").read_text())
    with torch.device("meta"):
        model = CausalDiT.from_config(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: v["shape"] for k, v in manifest.items()}
    assert sorted(set(theirs) - set(ours)) == []
    assert sorted(set(ours) - set(theirs)) == []
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}


@pytest.mark.parametrize("mode", MODES)
def test_parameter_count_matches_official(mode):
    counts = json.loads((MANIFEST_DIR / "param_counts.json").read_text())
    config = json.loads((CONFIG_DIR / mode / "config.json").read_text())
    with torch.device("meta"):
        model = CausalDiT.from_config(config)
    expected = counts[f"dit_{mode}"]
    assert sum(p.numel() for p in model.parameters()) == expected


def test_meta_model_loads_manifest_shaped_weights_strictly():
    config = json.loads((CONFIG_DIR / "gta_drive" / "config.json").read_text())
    manifest = json.loads((MANIFEST_DIR / "dit_gta_drive.json").read_text())
    with torch.device("meta"):
        model = CausalDiT.from_config(config)
        weights = {k: torch.empty(v["shape"]) for k, v in manifest.items()}
    model.load_state_dict(weights, strict=True, assign=True)


def test_config_round_trips_through_dict():
    config = json.loads((CONFIG_DIR / "templerun" / "config.json").read_text())
    parsed = DiTConfig.from_dict(config)
    assert DiTConfig.from_dict(parsed.to_dict()) == parsed
    assert parsed.action.enable_mouse is False and parsed.action.keyboard_dim_in == 7


def test_unknown_config_key_is_rejected_with_the_accepted_keys():
    config = json.loads((CONFIG_DIR / "universal" / "config.json").read_text())
    config["num_layer"] = 3
    with pytest.raises(ValueError, match="num_layer"):
        CausalDiT.from_config(config)


def test_action_blocks_outside_the_model_are_rejected():
    config = json.loads((CONFIG_DIR / "universal" / "config.json").read_text())
    config["num_layers"] = 10
    with pytest.raises(ValueError, match="outside 0..9"):
        CausalDiT.from_config(config)
