"""The latent action reader: targets per latent frame, training that finds actions written into latents,
its loss's gradient, saving and loading."""

import pytest
import torch

from matrixgame_env.train.conditions import ClipBatch
from matrixgame_env.train.latent_actions import (
    LatentActionReader,
    action_loss,
    action_targets,
    load_reader,
    reader_accuracy,
    save_reader,
    train_reader,
)
from matrixgame_env.weights import CheckpointError


def test_each_latent_frame_gets_the_actions_of_the_four_video_frames_it_covers():
    keyboard = torch.zeros(1, 9, 4)  # 3 latent frames: video frame 0, then frames 1-4 and 5-8
    keyboard[0, 1:5, 0] = 1  # W through latent frame 1
    keyboard[0, 5:7, 3] = 1  # D for half of latent frame 2
    mouse = torch.zeros(1, 9, 2)
    mouse[0, 1:5, 1] = 0.1  # turning right in latent frame 1
    mouse[0, 5:9, 1] = -0.01  # a turn too small to count in latent frame 2
    mouse[0, 0, 1] = -5.0  # video frame 0 belongs to latent frame 0, which has no target
    targets = action_targets(keyboard, mouse, frames=3)
    assert torch.equal(targets.keys, torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 0.5]]]))
    assert targets.yaw.tolist() == [[2, 1]]  # right, none
    with pytest.raises(ValueError, match="3 latent frames cover 9 video frames"):
        action_targets(keyboard[:, :8], mouse[:, :8], frames=3)


def _written_actions(batch: int, frames: int = 5, seed: int = 0) -> ClipBatch:
    """Clips whose latents move with their actions: each latent frame is the previous one rolled one step
    down for W, up for S, right for D, left for A (at most one key of each pair), and its channel 0
    raised for a right turn and lowered for a left one; actions held over each latent frame's four
    video frames."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, 3, (batch, frames - 1, 2), generator=g)  # per pair: none, first or second key
    keys = torch.stack([pairs[..., 0] == 1, pairs[..., 0] == 2, pairs[..., 1] == 1, pairs[..., 1] == 2], -1).float()
    yaw = torch.randint(0, 3, (batch, frames - 1), generator=g)
    latents = [torch.randn(batch, 16, 8, 8, generator=g)]
    for t in range(frames - 1):
        frame = latents[-1].clone()
        for b in range(batch):
            down = int(keys[b, t, 0]) - int(keys[b, t, 1])
            right = int(keys[b, t, 3]) - int(keys[b, t, 2])
            frame[b] = frame[b].roll((down, right), dims=(1, 2))
            frame[b, 0] += float(yaw[b, t] - 1)
        latents.append(frame)
    keyboard = torch.cat([torch.zeros(batch, 1, 4), keys.repeat_interleave(4, dim=1)], dim=1)
    mouse = torch.zeros(batch, 1 + 4 * (frames - 1), 2)
    mouse[:, 1:, 1] = 0.1 * (yaw - 1).float().repeat_interleave(4, dim=1)
    return ClipBatch(torch.stack(latents, dim=2), keyboard, mouse, torch.zeros(batch, 8, 8, 3, dtype=torch.uint8))


def test_a_reader_learns_the_actions_written_into_latents_and_reads_held_out_clips():
    batches = (_written_actions(16, seed=seed) for seed in range(10_000))
    reader = train_reader(batches, latent_channels=16, keys=4, steps=300, device="cpu", lr=3e-3, progress=False)
    judged = reader_accuracy(reader, [_written_actions(64, seed=-1)], "cpu")
    assert judged["latent_frames"] == 64 * 4
    assert judged["key_accuracy"] > 0.9 > judged["key_commonest_share"] + 0.1, judged
    assert judged["yaw_accuracy"] > 0.9 > judged["yaw_commonest_share"] + 0.3, judged
    assert not any(p.requires_grad for p in reader.parameters()) and not reader.training


def test_the_action_loss_reaches_the_latents_and_not_the_frozen_reader():
    reader = LatentActionReader(16, 4).eval().requires_grad_(False)
    clips = _written_actions(2)
    latents = clips.latents.clone().requires_grad_(True)
    loss = action_loss(reader, latents, action_targets(clips.keyboard, clips.mouse, clips.num_frames))
    loss.backward()
    assert torch.isfinite(loss) and latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in reader.parameters())


def test_a_saved_reader_loads_the_same_and_a_reader_for_other_keys_is_refused(tmp_path):
    reader = LatentActionReader(16, 4)
    path = save_reader(reader, tmp_path / "reader.safetensors")
    loaded = load_reader(path, latent_channels=16, keys=4, device="cpu")
    latents = torch.randn(1, 16, 3, 4, 8)
    for a, b in zip(reader.eval()(latents), loaded(latents)):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="action reader"):
        load_reader(path, latent_channels=16, keys=7, device="cpu")


def test_training_a_reader_leaves_the_callers_random_state_and_repeats_from_its_seed():
    state = torch.get_rng_state()
    readers = [
        train_reader(iter([_written_actions(2)]), latent_channels=16, keys=4, steps=1, device="cpu", progress=False)
        for _ in range(2)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    first, second = (r.state_dict() for r in readers)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_single_latent_frame_is_refused():
    with pytest.raises(ValueError, match="F >= 2"):
        LatentActionReader(16, 4)(torch.randn(1, 16, 1, 4, 8))


def test_per_frame_targets_keep_each_video_frames_keys():
    keyboard = torch.zeros(1, 9, 4)
    keyboard[0, 3:7, 0] = 1  # W down at the third frame of latent frame 1, up after the second of latent frame 2
    mouse = torch.zeros(1, 9, 2)
    targets = action_targets(keyboard, mouse, frames=3, per_frame=True)
    assert targets.keys.shape == (1, 2, 4, 4)
    assert targets.keys[0, :, :, 0].tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]]
    assert torch.equal(targets.keys.mean(dim=2), action_targets(keyboard, mouse, frames=3).keys)


def _key_onsets(batch: int, frames: int = 5, seed: int = 0) -> ClipBatch:
    """Clips in which W goes down at a random video frame of each latent frame (or not at all) and stays
    down to its end; the latent frame's channel 0 holds how many of its 4 frames had W down. Every
    latent frame's share of frames says as much, but only a reader of each frame names which ones."""
    g = torch.Generator().manual_seed(seed)
    held = torch.randint(0, 5, (batch, frames - 1), generator=g)  # frames with W down, at the end of each
    latents = torch.randn(batch, 16, frames, 8, 8, generator=g)
    latents[:, 0, 1:] += held.float()[..., None, None]
    phase = torch.arange(4)
    per_frame = (phase >= 4 - held[..., None]).float()  # [B, F-1, 4]
    keyboard = torch.zeros(batch, 1 + 4 * (frames - 1), 4)
    keyboard[:, 1:, 0] = per_frame.flatten(1)
    return ClipBatch(
        latents, keyboard, torch.zeros(batch, keyboard.shape[1], 2), torch.zeros(batch, 8, 8, 3, dtype=torch.uint8)
    )


def test_a_reader_of_each_video_frame_learns_where_inside_a_latent_frame_a_key_went_down(tmp_path):
    batches = (_key_onsets(16, seed=seed) for seed in range(10_000))
    reader = train_reader(
        batches, latent_channels=16, keys=4, steps=300, device="cpu", lr=3e-3, progress=False, frames_per_latent=4
    )
    held_out = _key_onsets(64, seed=-1)
    key_logits, yaw_logits = reader(held_out.latents)
    assert key_logits.shape == (64, 4, 4, 4) and yaw_logits.shape == (64, 4, 3)
    judged = reader_accuracy(reader, [held_out], "cpu")
    assert judged["latent_frames"] == 64 * 4
    # W alone takes a quarter of the per-frame answers: chance is high, so the frames of W are checked too
    assert judged["key_accuracy"] > 0.97 and judged["key_accuracy"] > judged["key_commonest_share"] + 0.1, judged
    w_read = key_logits[..., 0] > 0
    w_held = held_out.keyboard[:, 1:, 0].unflatten(1, (4, 4)) > 0.5
    assert (w_read == w_held).float().mean() > 0.9
    loaded = load_reader(save_reader(reader, tmp_path / "reader.safetensors"), 16, 4, "cpu")
    assert loaded.frames_per_latent == 4 and torch.equal(loaded(held_out.latents)[0], key_logits)
    with pytest.raises(ValueError, match="per_frame=True"):
        action_loss(reader, held_out.latents, action_targets(held_out.keyboard, held_out.mouse, 5))
    with pytest.raises(ValueError, match="frames_per_latent must be 1"):
        LatentActionReader(16, 4, frames_per_latent=2)
