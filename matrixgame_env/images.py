"""Start-image intake: paths, PIL images and arrays -> centre-cropped, resized model input."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ImageLike = Any  # a path (str or PathLike), a PIL image, or an HxWx3 uint8 numpy array or tensor
ACCEPTED = "a file path, a PIL image, or an HxWx3 uint8 array/tensor"


def to_uint8_array(image: ImageLike) -> np.ndarray:
    """Any accepted image -> HxWx3 uint8 numpy array (RGB)."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"start image {path} does not exist")
        with Image.open(path) as opened:
            return np.asarray(opened.convert("RGB"))
    if type(image).__module__.startswith("PIL."):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"start image array must be HxWx3 (RGB), got shape {image.shape}; accepted: {ACCEPTED}")
        if image.dtype != np.uint8:
            raise ValueError(f"start image array must be uint8 (0..255), got dtype {image.dtype}; accepted: {ACCEPTED}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"start image is empty: shape {image.shape}")
        return image
    raise TypeError(f"cannot use a {type(image).__name__} as a start image; accepted: {ACCEPTED}")


def centre_crop_box(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of the largest centred crop with the target aspect."""
    if height * target_width > width * target_height:  # too tall: keep the width
        crop_w, crop_h = width, int(width * target_height / target_width)
    else:  # too wide: keep the height
        crop_h, crop_w = height, int(height * target_width / target_height)
    crop_h, crop_w = max(1, crop_h), max(1, crop_w)
    return round((height - crop_h) / 2), round((width - crop_w) / 2), crop_h, crop_w


def fit_image(image: ImageLike, size: tuple[int, int]) -> torch.Tensor:
    """Centre-crop to the model's aspect, resize (bilinear, antialiased) -> [3, H, W] float in [-1, 1].

    Images of any size are accepted; this is the official pipeline's intake.
    """
    array = to_uint8_array(image)
    top, left, crop_h, crop_w = centre_crop_box(array.shape[0], array.shape[1], *size)
    crop = torch.from_numpy(np.array(array[top : top + crop_h, left : left + crop_w]))
    pixels = crop.permute(2, 0, 1)[None].float() / 255.0
    if (crop_h, crop_w) != tuple(size):
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (pixels[0].clamp(0, 1) - 0.5) / 0.5


def fit_images(images: ImageLike | Sequence[ImageLike], size: tuple[int, int]) -> torch.Tensor:
    """One image, a list, or a [B, H, W, 3] uint8 array -> [B, 3, H, W] in [-1, 1]."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no start images given")
    return torch.stack([fit_image(image, size) for image in images])


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames [B, T, 3, H, W] in [-1, 1] -> [B, T, H, W, 3] uint8 (the official mapping)."""
    return ((frames.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()
