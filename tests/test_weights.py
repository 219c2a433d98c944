"""Specification of matrixgame_env.weights, exercised on real files written to tmp_path."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from matrixgame_env.weights import (
    CheckpointError,
    add_prefix,
    all_finite,
    load_into,
    read_state_dict,
    save_safetensors,
    strip_prefix,
    validate_state_dict,
)


class TinyNet(nn.Module):
    """Keys: proj.weight (3, 4), proj.bias (3,), norm.weight (3,), norm.bias (3,)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


class MarkerPayload:
    """Unpickling this creates `marker`: a stand-in for the code a hostile checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Opaque:
    """A harmless custom class: still not something a weight file may hold."""


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {key: value.clone() for key, value in TinyNet().state_dict().items()}


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()  # safetensors stores keys sorted, pickles keep their order
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


# ---- reading files -------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path: Path) -> None:
    state_dict = tiny_state_dict()
    path = tmp_path / "tiny.safetensors"
    save_safetensors(state_dict, path)
    assert_same_tensors(read_state_dict(path), state_dict)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_pickle_round_trip(tmp_path: Path, suffix: str, zip_format: bool) -> None:
    state_dict = tiny_state_dict()
    path = tmp_path / f"tiny{suffix}"
    torch.save(state_dict, path, _use_new_zipfile_serialization=zip_format)
    assert_same_tensors(read_state_dict(path), state_dict)


def test_truncated_safetensors_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"weight": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert str(path) in message
    assert "is truncated or not a safetensors file" in message
    assert "bytes of tensor data" in message


def test_safetensors_header_length_beyond_file_size_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes((10_000).to_bytes(8, "little") + b'{"weight": ')
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert "is truncated or not a safetensors file" in message
    assert "10000 bytes but only 11 bytes follow" in message


def test_safetensors_with_garbage_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    garbage = b"\x00\xffnot json at all\x13\x37" * 4
    path.write_bytes(len(garbage).to_bytes(8, "little") + garbage + bytes(64))
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert str(path) in message
    assert "is truncated or not a safetensors file" in message
    assert "not valid JSON" in message


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_torch_pickle_is_rejected(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "cut.pth"
    torch.save({"weight": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert str(path) in message
    assert "truncated or corrupt" in message


def test_marker_payload_runs_when_unpickled_unsafely(tmp_path: Path) -> None:
    # Control for the next test: the payload really does create its marker under plain pickle.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(MarkerPayload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("container", ["torch_save", "raw_pickle"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    if container == "torch_save":
        torch.save({"weight": torch.zeros(2), "payload": MarkerPayload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"payload": MarkerPayload(marker)}, protocol=2))
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert str(path) in message
    assert "refusing to unpickle arbitrary objects" in message
    assert "open" in message  # names the object torch refused
    assert not marker.exists()


def test_pickled_custom_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "custom.pth"
    torch.save({"weight": torch.zeros(2), "extra": Opaque()}, path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert "refusing to unpickle arbitrary objects" in message
    assert "Opaque" in message


def test_non_tensor_value_is_rejected_naming_key_and_type(tmp_path: Path) -> None:
    path = tmp_path / "set.pth"
    torch.save({"weight": torch.zeros(2), "labels": {1, 2}}, path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert str(path) in message
    assert "'labels' has type set, not torch.Tensor" in message
    assert "flat dict of str -> torch.Tensor" in message


def test_pickle_that_is_not_a_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2), torch.ones(2)], path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    assert "holds an object of type list, not a state dict" in str(caught.value)


def test_unknown_suffix_lists_accepted_suffixes(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"anything")
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert "unknown weight file suffix '.npz'" in message
    for suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        assert suffix in message


def test_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert str(path) in message
    assert "no such file" in message


def test_empty_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(CheckpointError, match="is empty"):
        read_state_dict(path)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module"])
def test_wrapped_state_dict_is_unwrapped(tmp_path: Path, wrapper: str) -> None:
    state_dict = tiny_state_dict()
    path = tmp_path / "wrapped.ckpt"
    torch.save({wrapper: state_dict, "epoch": 7}, path)
    assert_same_tensors(read_state_dict(path), state_dict)


def test_wrapped_value_must_be_a_flat_tensor_dict(tmp_path: Path) -> None:
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"proj": {"weight": torch.zeros(2)}}}, path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert "under 'state_dict'" in message
    assert "'proj' has type dict, not torch.Tensor" in message


# ---- prefixes ------------------------------------------------------------------------------------


def test_strip_prefix_removes_it_from_every_key() -> None:
    weight, bias = torch.zeros(2), torch.ones(2)
    stripped = strip_prefix({"model.head.weight": weight, "model.head.bias": bias}, "model.")
    assert list(stripped) == ["head.weight", "head.bias"]
    assert stripped["head.weight"] is weight


def test_strip_prefix_required_lists_keys_without_it() -> None:
    state_dict = {"model.a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)}
    with pytest.raises(CheckpointError) as caught:
        strip_prefix(state_dict, "model.", source="dit.safetensors")
    message = str(caught.value)
    assert "dit.safetensors" in message
    assert "2 of 3 keys do not start with 'model.': b, c" in message


def test_strip_prefix_not_required_keeps_other_keys() -> None:
    state_dict = {"model.a": torch.zeros(1), "b": torch.zeros(1)}
    assert list(strip_prefix(state_dict, "model.", required=False)) == ["a", "b"]


def test_strip_prefix_rejects_keys_that_collide() -> None:
    state_dict = {"model.a": torch.zeros(1), "a": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="both become 'a'"):
        strip_prefix(state_dict, "model.", required=False)


def test_add_prefix_puts_it_in_front_of_every_key() -> None:
    assert list(add_prefix({"a": torch.zeros(1), "b.c": torch.zeros(1)}, "model.")) == ["model.a", "model.b.c"]


# ---- validation and loading ----------------------------------------------------------------------


def test_validate_reports_missing_unexpected_and_wrong_shape_together() -> None:
    state_dict = tiny_state_dict()
    del state_dict["norm.bias"]
    state_dict["extra.weight"] = torch.zeros(5)
    state_dict["proj.weight"] = torch.zeros(4, 3)
    with pytest.raises(CheckpointError) as caught:
        validate_state_dict(TinyNet(), state_dict, what="TinyNet", source="tiny.pth")
    message = str(caught.value)
    assert "tiny.pth" in message
    assert "does not match TinyNet" in message
    assert "missing keys (1):\n    norm.bias" in message
    assert "unexpected keys (1):\n    extra.weight" in message
    assert "proj.weight: expected (3, 4), got (4, 3)" in message


def test_validate_accepts_a_mapping_of_shapes() -> None:
    manifest_shapes = {"proj.weight": [3, 4], "proj.bias": [3], "norm.weight": [3], "norm.bias": [3]}
    validate_state_dict(manifest_shapes, tiny_state_dict(), what="TinyNet manifest")


def test_validate_truncates_long_key_lists() -> None:
    expected = {f"block.{index}.weight": (2,) for index in range(25)}
    with pytest.raises(CheckpointError) as caught:
        validate_state_dict(expected, {}, what="25 blocks")
    message = str(caught.value)
    assert "missing keys (25):" in message
    assert "block.9.weight" in message
    assert "block.10.weight" not in message
    assert "... and 15 more" in message


def test_validate_ignores_unexpected_keys_matching_patterns() -> None:
    state_dict = {**tiny_state_dict(), "encoder.conv.weight": torch.zeros(1), "conv1.bias": torch.zeros(1)}
    validate_state_dict(TinyNet(), state_dict, what="TinyNet", ignore_unexpected=["encoder.*", "conv1.*"])


def test_validate_suggests_stripping_an_extra_prefix() -> None:
    with pytest.raises(CheckpointError) as caught:
        validate_state_dict(TinyNet(), add_prefix(tiny_state_dict(), "model."), what="TinyNet")
    assert "strip_prefix(state_dict, 'model.')" in str(caught.value)


def test_load_into_casts_bfloat16_tensors_into_a_float32_module(tmp_path: Path) -> None:
    stored = {key: value.to(torch.bfloat16) for key, value in tiny_state_dict(seed=1).items()}
    path = tmp_path / "tiny_bf16.safetensors"
    save_safetensors(stored, path)
    module = load_into(TinyNet(), read_state_dict(path), what="TinyNet", source=path)
    for key, value in module.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, stored[key].float()), key


def test_load_into_with_dtype_converts_the_module() -> None:
    state_dict = tiny_state_dict(seed=2)
    module = load_into(TinyNet(), state_dict, what="TinyNet", dtype=torch.float16)
    assert module.proj.weight.dtype == torch.float16
    assert torch.equal(module.proj.weight, state_dict["proj.weight"].half())


def test_load_into_drops_ignored_unexpected_keys() -> None:
    state_dict = {**tiny_state_dict(seed=3), "encoder.conv.weight": torch.zeros(1)}
    module = load_into(TinyNet(), state_dict, what="TinyNet", ignore_unexpected=["encoder.*"])
    assert torch.equal(module.norm.weight, state_dict["norm.weight"])


def test_load_into_rejects_non_finite_values_naming_the_key() -> None:
    state_dict = tiny_state_dict()
    state_dict["proj.bias"][1] = float("nan")
    state_dict["norm.weight"][0] = float("inf")
    with pytest.raises(CheckpointError) as caught:
        load_into(TinyNet(), state_dict, what="TinyNet", source="tiny.safetensors")
    message = str(caught.value)
    assert "tiny.safetensors" in message
    assert "proj.bias: 1 of 3 values are NaN or infinite" in message
    assert "norm.weight: 1 of 3 values are NaN or infinite" in message


def test_load_into_rejects_values_that_overflow_the_target_dtype() -> None:
    state_dict = tiny_state_dict()
    state_dict["proj.bias"][0] = 1e6  # float16 tops out at 65504
    with pytest.raises(CheckpointError) as caught:
        load_into(TinyNet(), state_dict, what="TinyNet", dtype=torch.float16)
    assert "proj.bias: finite as stored (torch.float32) but beyond the range of torch.float16" in str(caught.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_finds_every_nan_and_infinity_wherever_it_sits(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 31, 1000, 2**20 + 3):  # the last spans the vectorised and threaded reductions
        clean = torch.randn(size, generator=generator).to(dtype)
        assert all_finite(clean) and all_finite(clean.view(-1, 1))
        positions = {0, size // 2, size - 1, int(torch.randint(size, (1,), generator=generator))}
        for bad in (float("nan"), float("inf"), float("-inf")):
            for position in positions:
                tainted = clean.clone()
                tainted[position] = bad
                assert all_finite(tainted) is False, (size, bad, position)
                assert all_finite(tainted) == bool(torch.isfinite(tainted).all())
    largest = torch.finfo(dtype).max
    assert all_finite(torch.tensor([largest, -largest], dtype=dtype))  # extremes that are still finite
    assert all_finite(torch.empty(0, 3, dtype=dtype))
    matrix = torch.randn(64, 48, generator=generator).to(dtype)
    matrix[5, 7] = float("nan")
    assert not all_finite(matrix.t())  # strided layouts too


def test_load_into_leaves_the_module_untouched_when_it_rejects_the_weights() -> None:
    module = TinyNet()
    before = {key: value.clone() for key, value in module.state_dict().items()}
    state_dict = tiny_state_dict(seed=4)
    state_dict["norm.bias"][2] = 1e6  # overflows float16, the dtype asked for
    with pytest.raises(CheckpointError):
        load_into(module, state_dict, what="TinyNet", dtype=torch.float16)
    assert_same_tensors(module.state_dict(), before)


def test_load_into_rejects_unsupported_stored_dtypes() -> None:
    state_dict = tiny_state_dict()
    state_dict["proj.weight"] = state_dict["proj.weight"].double()
    with pytest.raises(CheckpointError) as caught:
        load_into(TinyNet(), state_dict, what="TinyNet")
    message = str(caught.value)
    assert "proj.weight: stored as torch.float64" in message
    assert "float32, bfloat16 or float16" in message


# ---- writing -------------------------------------------------------------------------------------


def test_save_safetensors_writes_views_tied_weights_and_metadata(tmp_path: Path) -> None:
    shared = torch.arange(12.0).reshape(3, 4)
    state_dict = {"weight": shared, "tied": shared, "transposed": shared.t()}
    path = tmp_path / "views.safetensors"
    save_safetensors(state_dict, path, metadata={"format": "pt"})
    assert_same_tensors(read_state_dict(path), {key: value.contiguous() for key, value in state_dict.items()})
    with safe_open(path, framework="pt") as file:
        assert file.metadata() == {"format": "pt"}


def test_save_safetensors_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_safetensors({"weight": torch.zeros(2)}, path)
    save_safetensors({"weight": torch.ones(2)}, path)
    assert torch.equal(read_state_dict(path)["weight"], torch.ones(2))
    assert [entry.name for entry in tmp_path.iterdir()] == ["weights.safetensors"]


def test_save_safetensors_failure_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_safetensors({"weight": torch.zeros(2)}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="'step' has type int, not torch.Tensor"):
        save_safetensors({"weight": torch.ones(2), "step": 3}, path)  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["weights.safetensors"]
