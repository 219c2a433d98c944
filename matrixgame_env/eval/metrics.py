"""Image fidelity metrics on uint8 frames: PSNR and SSIM (per frame, batched, in torch).

Both take frames [..., H, W, 3] uint8 (or float on the 0..255 scale) and return one value per frame
(shape [...]). SSIM follows Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, constants
C1 = (0.01 L)^2 and C2 = (0.03 L)^2 with L = 255, computed over the windows that lie fully inside
the frame ("valid" filtering), per colour channel, then averaged over windows and channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DATA_RANGE = 255.0
PSNR_CAP = 100.0  # dB reported for identical frames (the PSNR of equal frames is infinite)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(a: torch.Tensor, b: torch.Tensor, cap: float = PSNR_CAP) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each frame pair, [..., H, W, C] -> [...], at most `cap`."""
    a, b = _checked_pair(a, b)
    mse = (a.double() - b.double()).square().flatten(-3).mean(-1)
    value = 10.0 * torch.log10(DATA_RANGE**2 / mse.clamp_min(DATA_RANGE**2 * 10 ** (-cap / 10)))
    return value.float()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian [size] (float64); the 2-D window is its outer product."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Structural similarity of each frame pair, [..., H, W, C] -> [...] (1 for equal frames).

    Computed in `dtype` on the frames' device; frames must be at least 11x11.
    """
    a, b = _checked_pair(a, b)
    height, width, channels = a.shape[-3:]
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}")
    leading = a.shape[:-3]
    # [N, H, W, C] -> [N * C, 1, H, W]: every channel filtered alone.
    x = a.reshape(-1, height, width, channels).permute(0, 3, 1, 2).reshape(-1, 1, height, width).to(dtype)
    y = b.reshape(-1, height, width, channels).permute(0, 3, 1, 2).reshape(-1, 1, height, width).to(dtype)
    window = gaussian_window().to(device=x.device, dtype=dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable valid filtering: rows, then columns
        t = F.conv2d(t, window.view(1, 1, 1, -1))
        return F.conv2d(t, window.view(1, 1, -1, 1))

    mu_x, mu_y = blur(x), blur(y)
    # Second moments of values centred on mid-grey: (co)variances are unchanged by the shift, and the
    # cancellation in E[x^2] - E[x]^2 loses four times fewer bits in float32.
    xc, yc = x - DATA_RANGE / 2, y - DATA_RANGE / 2
    mu_xc, mu_yc = mu_x - DATA_RANGE / 2, mu_y - DATA_RANGE / 2
    var_x = blur(xc * xc) - mu_xc * mu_xc
    var_y = blur(yc * yc) - mu_yc * mu_yc
    cov = blur(xc * yc) - mu_xc * mu_yc
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    per_channel = ssim_map.flatten(1).mean(-1).view(-1, channels)
    return per_channel.mean(-1).float().view(leading)


def _checked_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"frames to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 3:
        raise ValueError(f"frames must be [..., H, W, C], got shape {tuple(a.shape)}")
    return a, b.to(a.device)
