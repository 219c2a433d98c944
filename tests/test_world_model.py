"""WorldModel and checkpoint loading: our format, the official layout, conversion, bad files."""

import pickle

import numpy as np
import pytest
import torch
from tiny_model import tiny_model_config, tiny_modules, write_official_layout

from matrixgame_env.checkpoints import (
    OFFICIAL_CLIP_FILE,
    OFFICIAL_DIT_FILES,
    OFFICIAL_VAE_FILE,
    convert,
    load_model,
    save_model,
)
from matrixgame_env.images import centre_crop_box, fit_image
from matrixgame_env.weights import CheckpointError
from matrixgame_env.world.model import WorldModel


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    config = tiny_model_config()
    folder = tmp_path_factory.mktemp("tiny")
    return save_model(folder, config, *tiny_modules(config))


@pytest.fixture(scope="module")
def world(tiny_folder):
    return WorldModel.from_pretrained(tiny_folder, device="cpu")


def _picture(height=50, width=70, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_frames_come_out_as_uint8_blocks_of_9_then_12(world):
    state = world.start(_picture(), seed=0)
    first = world.step(state, torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0.0, 0.1]]))
    second = world.step(state, torch.tensor([[0.0, 0, 1, 0]]), torch.tensor([[0.1, 0.0]]))
    assert first.shape == (1, 9, 16, 32, 3) and first.dtype == torch.uint8
    assert second.shape == (1, 12, 16, 32, 3)
    assert state.video_frame == 21


def test_start_accepts_paths_pil_images_and_arrays_alike(world, tmp_path):
    from PIL import Image

    picture = _picture(64, 128)
    path = tmp_path / "start.png"
    Image.fromarray(picture).save(path)
    outputs = []
    for image in (picture, Image.fromarray(picture), str(path), torch.from_numpy(picture)):
        state = world.start(image, seed=3)
        outputs.append(world.step(state))
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


def test_snapshot_restore_gives_the_same_frames_again(world):
    state = world.start([_picture(), _picture(seed=1)], seed=5)
    world.step(state)
    snapshot = state.snapshot()
    keys = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    first = [world.step(state, keys) for _ in range(2)]
    state.restore(snapshot)
    second = [world.step(state, keys) for _ in range(2)]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_image_condition_equals_encoding_the_image_followed_by_zero_frames(world):
    """The official pipeline encodes the image + 4(F-1) zero frames; we encode the image once and
    stop at the encoder's fixed point. The conditions agree for every frame used."""
    pixels = fit_image(_picture(), world.video_size)[None]
    frames = 15
    video = torch.cat([pixels[:, :, None], torch.zeros(1, 3, 4 * (frames - 1), *world.video_size)], dim=2)
    official = world.vae.encode(video)
    ours, _ = world.encode_start(_picture())
    torch.testing.assert_close(ours.frames(0, frames), official, rtol=0, atol=1e-5)


def test_centre_crop_keeps_the_model_aspect():
    assert centre_crop_box(100, 400, 32, 64) == (0, 100, 100, 200)  # too wide: crop the sides
    assert centre_crop_box(300, 100, 32, 64) == (125, 0, 50, 100)  # too tall: crop top and bottom


@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.zeros((10, 10, 4), np.uint8), ValueError, "HxWx3"),
        (np.zeros((10, 10, 3), np.float32), ValueError, "uint8"),
        (np.zeros((10, 10), np.uint8), ValueError, "HxWx3"),
        (3.5, TypeError, "accepted"),
        ("/no/such/picture.png", FileNotFoundError, "does not exist"),
    ],
)
def test_bad_start_images_say_what_is_accepted(world, image, error, message):
    with pytest.raises(error, match=message):
        world.start(image)


def test_official_layout_loads_and_converts_to_our_format(tmp_path):
    config = tiny_model_config()
    official = write_official_layout(tmp_path / "official", config, seed=1)
    loaded = load_model(official, config=config, device="cpu")
    converted = convert(official, tmp_path / "ours", config=config)
    reloaded = load_model(converted, device="cpu")
    for a, b in ((loaded.dit, reloaded.dit), (loaded.vae, reloaded.vae), (loaded.clip, reloaded.clip)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    w1 = WorldModel(loaded.dit, loaded.vae, loaded.clip, loaded.config)
    w2 = WorldModel.from_pretrained(converted, device="cpu")
    assert torch.equal(w1.step(w1.start(_picture(), seed=2)), w2.step(w2.start(_picture(), seed=2)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_loads_straight_into_its_dtype_with_each_weight_cast_once(tiny_folder, dtype):
    """Modules allocated in the requested dtype and filled from the files: every parameter and buffer
    in that dtype, equal to the stored float32 weight cast once, the latent statistics too."""
    from matrixgame_env.checkpoints import PART_FILES, WAN21_LATENT_MEAN
    from matrixgame_env.weights import read_state_dict

    loaded = load_model(tiny_folder, device="cpu", dtype=dtype)
    for part in ("dit", "vae", "clip"):
        module = getattr(loaded, part)
        stored = read_state_dict(tiny_folder / PART_FILES[part])
        state = module.state_dict()
        assert state.keys() == stored.keys()
        for key, value in state.items():
            assert value.dtype == (dtype if stored[key].is_floating_point() else stored[key].dtype), key
            assert torch.equal(value, stored[key].to(value.dtype)), key
    config = loaded.config.vae
    expected_mean = torch.tensor(config.get("latent_mean", WAN21_LATENT_MEAN), dtype=torch.float32)
    assert loaded.vae.latent_mean.dtype == dtype and torch.equal(loaded.vae.latent_mean, expected_mean.to(dtype))


def test_missing_official_file_is_named(tmp_path):
    config = tiny_model_config()
    folder = write_official_layout(tmp_path, config)
    (folder / OFFICIAL_VAE_FILE).unlink()
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        load_model(folder, config=config, device="cpu")


def test_dit_with_a_missing_and_an_extra_key_lists_both(tmp_path):
    from safetensors.torch import load_file, save_file

    config = tiny_model_config()
    folder = write_official_layout(tmp_path, config)
    path = folder / OFFICIAL_DIT_FILES["universal"]
    state = load_file(str(path))
    state.pop("model.head.head.bias")
    state["model.blocks.0.surprise.weight"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as error:
        load_model(folder, config=config, device="cpu")
    assert "head.head.bias" in str(error.value) and "blocks.0.surprise.weight" in str(error.value)


def test_truncated_dit_file_is_reported(tmp_path):
    config = tiny_model_config()
    folder = write_official_layout(tmp_path, config)
    path = folder / OFFICIAL_DIT_FILES["universal"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(folder, config=config, device="cpu")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_clip_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    config = tiny_model_config()
    folder = write_official_layout(tmp_path / "model", config)
    marker = tmp_path / "pwned"
    with open(folder / OFFICIAL_CLIP_FILE, "wb") as handle:
        pickle.dump({"visual.cls_embedding": _RunsCode(marker)}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="refus"):
        load_model(folder, config=config, device="cpu")
    assert not marker.exists()


def test_unknown_model_name_lists_the_presets():
    with pytest.raises(CheckpointError, match="universal"):
        load_model("no-such-model", device="cpu")


def test_official_preset_without_weights_explains_the_download(monkeypatch):
    with pytest.raises(CheckpointError, match="huggingface-cli download Skywork/Matrix-Game-2.0"):
        load_model("universal", device="cpu", download=False)


def test_our_folder_missing_a_part_names_the_missing_file_not_the_official_layout(tmp_path):
    config = tiny_model_config()
    folder = save_model(tmp_path / "model", config, *tiny_modules(config))
    (folder / "dit.safetensors").unlink()
    (folder / "clip.safetensors").unlink()
    with pytest.raises(CheckpointError) as caught:
        load_model(folder, device="cpu")
    message = str(caught.value)
    assert "lacks ['clip.safetensors', 'dit.safetensors']" in message
    assert "vae.safetensors" in message
    assert OFFICIAL_VAE_FILE not in message


def test_generate_decodes_each_block_before_the_caches_refresh_with_the_same_results(world, monkeypatch):
    pictures = [_picture(), _picture(seed=1)]

    def actions(block):
        keyboard = torch.zeros(2, 4)
        keyboard[0, block % 4] = 1.0
        return keyboard, torch.tensor([[0.0, 0.05 * block], [0.1, -0.05]])

    state = world.start(pictures, seed=7)
    reference = []
    for block in range(5):  # past the window: young and steady blocks
        latents = world.step_latents(state, *actions(block))
        reference.append((latents, world.decode(state, latents)))
    order = []
    refresh, decode = world.sampler.refresh_caches, world.decode_on_device
    monkeypatch.setattr(world.sampler, "refresh_caches", lambda *a: (order.append("refresh"), refresh(*a))[1])
    monkeypatch.setattr(world, "decode_on_device", lambda *a: (order.append("decode"), decode(*a))[1])
    state = world.start(pictures, seed=7)
    for block in range(5):
        latents, frames = world.generate(state, *actions(block))
        assert torch.equal(latents, reference[block][0]) and torch.equal(frames, reference[block][1])
    assert order == ["decode", "refresh"] * 5


def test_decoding_beside_the_refresh_needs_a_gpu(world):
    with pytest.raises(ValueError, match="needs a CUDA device, the model is on cpu"):
        world.set_decode_beside(True)
    world.set_decode_beside(False)  # turning it off is always fine
    assert world.decode_stream is None
