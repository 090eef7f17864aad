"""MoCo-v2 "aug+" colour, grayscale, blur, flip and normalisation, batched on the training device.

Runs after the loader on uint8 (N, 3, S, S) views and returns float32 views, normalised, channels_last.
Jitter and grayscale are per-image affine maps of RGB, so they are composed into ONE 3 x 3 matrix per image
(plus an offset for contrast) and applied in a single batched matmul; blur touches only the images that draw
it; flip is an index. Choices that differ from torchvision's per-image PIL ops, on purpose:
- the four jitter factors are applied in a fixed order (brightness, contrast, saturation, hue) instead of a
  random permutation, and pixel values are clamped to [0, 1] once after the colour map instead of after each;
- hue is a rotation of the chroma plane in YIQ space (as DALI's colour twist), not an HSV shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@dataclass(frozen=True)
class AugmentConfig:
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5  # 0 disables blur (the small-image recipe)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels at 224 px, scaled with the view size
    flip_p: float = 0.5


def normalize(views: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float (N, 3, S, S) -> float32 normalised with ImageNet mean/std, channels_last."""
    x = views.float()
    if views.dtype == torch.uint8:
        x = x / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def colour_matrices(
    n: int, config: AugmentConfig, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image jitter+grayscale as (N, 3, 3) matrices and (N,) contrast factors (needed for the offset).

    The image-dependent part of contrast (the mean luminance) is added by `colour_augment`.
    """

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=device)

    b, c, s, h = config.jitter
    jitter = torch.rand(n, generator=generator, device=device) < config.jitter_p
    brightness = torch.where(jitter, uniform(1 - b, 1 + b), torch.ones(n, device=device))
    contrast = torch.where(jitter, uniform(1 - c, 1 + c), torch.ones(n, device=device))
    saturation = torch.where(jitter, uniform(1 - s, 1 + s), torch.ones(n, device=device))
    hue = torch.where(jitter, uniform(-h, h), torch.zeros(n, device=device))
    gray = torch.rand(n, generator=generator, device=device) < config.grayscale_p

    eye = torch.eye(3, device=device).expand(n, 3, 3)
    luma_rows = torch.tensor(LUMA, device=device).expand(3, 3)  # every row = luma weights
    # brightness, then contrast (scales around the mean, offset added later), then saturation.
    sat = saturation.view(n, 1, 1) * eye + (1 - saturation).view(n, 1, 1) * luma_rows
    angle = hue * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(n, 3, 3, device=device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    yiq = _RGB_TO_YIQ.to(device)
    hue_m = torch.linalg.inv(yiq) @ rot @ yiq
    matrix = hue_m @ sat @ ((brightness * contrast).view(n, 1, 1) * eye)
    matrix = torch.where(gray.view(n, 1, 1), luma_rows @ matrix, matrix)
    return matrix, torch.where(jitter, brightness * (1 - contrast), torch.zeros(n, device=device))


def colour_augment(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """[0, 1] float (N, 3, S, S) -> jittered/grayscaled, clamped to [0, 1].

    Contrast pulls toward the brightened image's mean luminance: a grey offset that saturation, hue and
    grayscale all leave unchanged, so it is added after the matrix.
    """
    n = x.shape[0]
    matrix, offset_scale = colour_matrices(n, config, generator, x.device)
    mean_luma = torch.einsum("c,nchw->n", torch.tensor(LUMA, device=x.device), x) / (x.shape[2] * x.shape[3])
    out = torch.einsum("nij,njhw->nihw", matrix, x) + (offset_scale * mean_luma).view(n, 1, 1, 1)
    return out.clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (M, 3, S, S) with a per-image sigma (M,) in pixels; reflect padding."""
    m, c, height, width = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, min(height, width) - 1)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (M*3, K)
    y = x.reshape(1, m * c, height, width)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(m * c, 1, 1, -1), groups=m * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(m * c, 1, -1, 1), groups=m * c)
    return y.view(m, c, height, width)


def augment(views: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N, 3, S, S) views -> float32 (N, 3, S, S) aug+ views, normalised, channels_last.

    All randomness comes from `generator` (on the views' device), so a seeded generator replays exactly.
    """
    n, size = views.shape[0], views.shape[-1]
    x = colour_augment(views.float() / 255, config, generator)
    if config.blur_p > 0:
        blur = torch.rand(n, generator=generator, device=x.device) < config.blur_p
        low, high = config.blur_sigma
        sigma = (low + (high - low) * torch.rand(n, generator=generator, device=x.device)) * size / 224
        picked = blur.nonzero().squeeze(1)
        if len(picked):
            x[picked] = gaussian_blur(x[picked].contiguous(), sigma[picked])
    flip = torch.rand(n, generator=generator, device=x.device) < config.flip_p
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    return normalize(x)
