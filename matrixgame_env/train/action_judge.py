"""A frozen inverse-dynamics model as a VAE training loss: the decoded clips must keep their actions readable.

The VAE packs 4 video frames into each later latent frame, and measured on real clips that packing is
where the keys and turns that a judge of pixels reads get lost (each frame's own round trip keeps
nearly all of them). `train vae --action-judge IDM --action-weight W` adds W times this loss: an
inverse-dynamics model saved by `matrixgame-env eval` (`--idm-out`), frozen, reads every window of the
decoded clip and is scored against the clip's recorded actions (binary cross-entropy of the keys,
cross-entropy of the yaw direction), so the gradient asks the VAE to render what the judge needs to
see. Use another judge than the one `eval` scores with (another seed or width, `eval --seed S
--idm-out DIR`), or the score measures the training rather than the frames: the judge's weights hash
is kept in the model's config, and `eval` notes when it is the same model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..eval.idm import InverseDynamicsModel, Labels, clip_windows, idm_weights_sha256, load_idm


class ActionJudge:
    """A frozen IDM that scores decoded clips [B, 3, T, H, W] in [-1, 1] against their actions."""

    def __init__(self, model: InverseDynamicsModel, source: str, sha256: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self.sha256 = sha256

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> ActionJudge:
        """The IDM folder `path` (as `load_idm` reads it), frozen on `device`."""
        return cls(load_idm(path, device), *describe(path))

    def check(self, video_size: tuple[int, int], keyboard: int, clip_frames: int) -> str | None:
        """What stops this judge from reading the stage's clips (None: nothing)."""
        config = self.model.config
        if tuple(config.video_size) != tuple(video_size):
            return f"reads {tuple(config.video_size)} frames, the model makes {tuple(video_size)}"
        if len(config.keyboard) != keyboard:
            return f"reads {len(config.keyboard)} keys, the recording has {keyboard}"
        if clip_frames < config.context:
            return f"reads windows of {config.context} frames, longer than --clip-frames {clip_frames}"
        return None

    def loss(self, video: torch.Tensor, keyboard: torch.Tensor, mouse: torch.Tensor) -> torch.Tensor:
        """Mean key BCE + yaw cross-entropy over every window of `video` [B, 3, T, H, W] (float, [-1, 1]),
        labelled from keyboard [B, T, K] and mouse [B, T, 2]; differentiable in `video`."""
        return self.window_losses(video, keyboard, mouse).sum(1).mean()

    def window_losses(self, video: torch.Tensor, keyboard: torch.Tensor, mouse: torch.Tensor) -> torch.Tensor:
        """Each window's key BCE (mean over the keys) and yaw cross-entropy, [B (T - context + 1), 2] in
        the order of `clip_windows`; `loss` is the mean of their sums."""
        model = self.model
        frames = video.transpose(1, 2).float()  # [B, T, 3, H, W]
        windows, keys, mice = clip_windows(frames, keyboard.to(frames.device), mouse.to(frames.device),
                                           model.config.context)  # fmt: skip
        labels = Labels.of_windows(keys, mice, model.config)
        key_logits, yaw_logits = model.read_pixels(windows.to(model.device))
        targets = labels.keys.float().to(key_logits.device)
        key_loss = F.binary_cross_entropy_with_logits(key_logits.float(), targets, reduction="none").mean(1)
        yaw_loss = F.cross_entropy(yaw_logits.float(), labels.yaw.to(yaw_logits.device), reduction="none")
        return torch.stack([key_loss, yaw_loss], dim=1)


def describe(path: str | os.PathLike) -> tuple[str, str]:
    """(resolved folder, weights SHA-256) of the IDM at `path`, without loading it: what a model records."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    return str(folder.resolve()), idm_weights_sha256(folder)
