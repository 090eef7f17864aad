"""MoCo-v2 "aug+" colour, grayscale, blur, flip and normalisation, batched after the loader, in one place.

Runs on uint8 (N, 3, S, S) views and returns float32 views, normalised, channels_last. The random draws
(`draw`) are made once with the caller's generator; `apply` then runs them on the views' device:
- on CUDA, batched torch: jitter and grayscale are per-image affine maps of RGB, composed into ONE 3 x 3
  matrix per image (plus an offset for contrast) in one batched matmul; blur is one separable convolution
  of every image with a kernel of the largest radius the sigma range allows, each image's taps masked to
  its own radius (sigma 0 = the identity); flip is a select. Nothing reads a value back to the host (no
  `.item()`, no `nonzero`, constants made once per device), so the host can queue steps ahead of the GPU;
- on CPU, a fused per-image path on uint8 pixels in a thread pool (OpenCV's SIMD colour transform and
  separable filter, an in-place flip, and one vectorised numba pass that writes the normalised floats): the
  batched torch ops cost about 5 ms of a core per 224 px view here, this path about 0.2 ms.
The two paths apply the same draws; they differ only by the CPU path's rounding to uint8 after the colour
map and after the blur, as PIL-based pipelines do (tests compare them).

Choices that differ from torchvision's per-image PIL ops, on purpose:
- the four jitter factors are applied in a fixed order (brightness, contrast, saturation, hue) instead of a
  random permutation, and pixel values are clamped to [0, 1] once after the colour map instead of after each;
- hue is a rotation of the chroma plane in YIQ space (as DALI's colour twist), not an HSV shift;
- the Gaussian kernel has radius ceil(3 sigma) (PIL approximates it with box filters).
"""

from __future__ import annotations

import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import cv2
import numba
import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
# Inverted once here rather than per batch (a batched torch.linalg.inv per call).
_YIQ_TO_RGB = torch.from_numpy(np.linalg.inv(_RGB_TO_YIQ.double().numpy())).float()


@cache
def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """float32 luma weights (3,), RGB<->YIQ (3, 3) and ImageNet mean/std (1, 3, 1, 1) on `device`, copied
    there once: a host-to-device copy per call would make the host wait for the device."""
    return {
        "luma": torch.tensor(LUMA, device=device),
        "rgb_to_yiq": _RGB_TO_YIQ.to(device),
        "yiq_to_rgb": _YIQ_TO_RGB.to(device),
        "mean": torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
        "std": torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1),
    }


@dataclass(frozen=True)
class AugmentConfig:
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5  # 0 disables blur (the small-image recipe)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels at 224 px, scaled with the view size
    flip_p: float = 0.5


@dataclass(frozen=True)
class AugmentDraw:
    """One batch's random draws, on the generator's device.

    matrix (N, 3, 3) float32: jitter + grayscale as a map of [0, 1] RGB; offset_scale (N,): contrast's grey
    offset is offset_scale * the input's mean luminance; sigma (N,) float32: blur sigma in pixels, 0 = no
    blur; flip (N,) bool. max_sigma: the largest sigma the config can draw at this size (0 = blur off), a
    Python float known without looking at the draws: it fixes the blur kernel's size.
    """

    matrix: torch.Tensor
    offset_scale: torch.Tensor
    sigma: torch.Tensor
    flip: torch.Tensor
    max_sigma: float = 0.0


def colour_matrices(
    n: int, config: AugmentConfig, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image jitter+grayscale as (N, 3, 3) matrices and (N,) contrast offset scales.

    The image-dependent part of contrast (the mean luminance) is added by `apply`.
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

    constants = _constants(device)
    eye = torch.eye(3, device=device).expand(n, 3, 3)
    luma_rows = constants["luma"].expand(3, 3)  # every row = luma weights
    # brightness, then contrast (scales around the mean, offset added later), then saturation.
    sat = saturation.view(n, 1, 1) * eye + (1 - saturation).view(n, 1, 1) * luma_rows
    angle = hue * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(n, 3, 3, device=device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    # bmm, not (n, 3, 3) @ (3, 3): torch folds that into one BLAS gemm whose threads then spin ~11 ms of a
    # core after every call, time stolen from the loader's threads.
    hue_m = torch.bmm(constants["yiq_to_rgb"] @ rot, constants["rgb_to_yiq"].expand(n, 3, 3))
    matrix = hue_m @ sat @ ((brightness * contrast).view(n, 1, 1) * eye)
    matrix = torch.where(gray.view(n, 1, 1), luma_rows @ matrix, matrix)
    return matrix, torch.where(jitter, brightness * (1 - contrast), torch.zeros(n, device=device))


def draw(
    n: int, size: int, config: AugmentConfig, generator: torch.Generator, device: torch.device | None = None
) -> AugmentDraw:
    """The random draws for n views of size S (blur sigma scales with S / 224), on `device` (default: the
    generator's; a CPU generator also draws for the `meta` device, which has no generator of its own)."""
    device = generator.device if device is None else device
    matrix, offset_scale = colour_matrices(n, config, generator, device)
    sigma, max_sigma = torch.zeros(n, device=device), 0.0
    if config.blur_p > 0:
        blur = torch.rand(n, generator=generator, device=device) < config.blur_p
        low, high = config.blur_sigma
        drawn = (low + (high - low) * torch.rand(n, generator=generator, device=device)) * size / 224
        sigma, max_sigma = torch.where(blur, drawn, sigma), high * size / 224
    flip = torch.rand(n, generator=generator, device=device) < config.flip_p
    return AugmentDraw(matrix, offset_scale, sigma, flip, max_sigma)


def augment(views: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N, 3, S, S) views -> float32 (N, 3, S, S) aug+ views, normalised, channels_last.

    All randomness comes from `generator` (on the views' device, or a CPU one for `meta` views), so a seeded
    generator replays exactly.
    """
    return augment_with_draws(views, config, generator)[0]


def augment_with_draws(
    views: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, AugmentDraw]:
    """`augment`, also returning the draws it applied (e.g. `.flip`, (N,) bool, for boxes of flipped views)."""
    generator_device = None if views.device.type != "meta" else views.device
    params = draw(views.shape[0], views.shape[-1], config, generator, generator_device)
    return apply(views, params), params


def apply(views: torch.Tensor, params: AugmentDraw) -> torch.Tensor:
    """Apply one batch's draws to uint8 (N, 3, S, S) views; float32 normalised channels_last out."""
    if views.device.type == "cpu":
        return apply_cpu(views, params)
    return apply_batched(views, params)


def apply_batched(views: torch.Tensor, params: AugmentDraw) -> torch.Tensor:
    """`apply`'s path for CUDA (and any device): batched torch ops, no host synchronisation."""
    return normalize(apply_torch(views.float() / 255, params))


def normalize(views: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float (N, 3, S, S) -> float32 normalised with ImageNet mean/std, channels_last."""
    if views.device.type == "cpu" and views.dtype == torch.uint8:
        return apply_cpu(views, None)
    x = views.float()
    if views.dtype == torch.uint8:
        x = x / 255
    constants = _constants(x.device)
    return ((x - constants["mean"]) / constants["std"]).contiguous(memory_format=torch.channels_last)


# ---- batched torch (the CUDA path, and the reference the CPU path is tested against) ----


def apply_torch(x: torch.Tensor, params: AugmentDraw) -> torch.Tensor:
    """[0, 1] float (N, 3, S, S) -> colour, blur and flip applied, still in [0, 1] (not normalised)."""
    n = x.shape[0]
    x = colour_augment(x, params.matrix, params.offset_scale)
    if params.max_sigma > 0:  # every image, the unblurred ones through an identity kernel: no nonzero()
        x = gaussian_blur(x, params.sigma, params.max_sigma)
    return torch.where(params.flip.view(n, 1, 1, 1), x.flip(-1), x)


def colour_augment(x: torch.Tensor, matrix: torch.Tensor, offset_scale: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (N, 3, S, S) -> jittered/grayscaled by (N, 3, 3) matrices, clamped to [0, 1].

    Contrast pulls toward the brightened image's mean luminance: a grey offset that saturation, hue and
    grayscale all leave unchanged, so it is added after the matrix.
    """
    n = x.shape[0]
    mean_luma = torch.einsum("c,nchw->n", _constants(x.device)["luma"], x) / (x.shape[2] * x.shape[3])
    out = torch.einsum("nij,njhw->nihw", matrix, x) + (offset_scale * mean_luma).view(n, 1, 1, 1)
    return out.clamp_(0, 1)


def blur_radius(sigma: float, size: int) -> int:
    """Gaussian kernel radius: ceil(3 sigma), at least 1, less than the image side (reflect padding)."""
    return max(1, min(math.ceil(3 * sigma), size - 1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (M, 3, S, S) with a per-image sigma (M,) in pixels, each image's kernel
    cut at its own `blur_radius`; reflect padding. sigma 0 leaves an image as it is. The kernel has the
    radius of `max_sigma` (>= every sigma) for every image, so its size never depends on the draws' values."""
    m, c, height, width = x.shape
    size = min(height, width)
    radius = blur_radius(max_sigma, size)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    # blur_radius per image, as tensors (float64, as blur_radius computes it).
    radii = torch.ceil(3 * sigma.double()).clamp(1, size - 1).to(x.dtype)
    blurred = sigma > 0
    spread = torch.where(blurred, sigma, torch.ones_like(sigma)).to(x.dtype)  # no 0 / 0 for sigma 0
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / spread.view(-1, 1)) ** 2) * (taps.abs() <= radii.view(-1, 1))
    kernel = torch.where(blurred.view(-1, 1), kernel, (taps == 0).to(x.dtype))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (M*3, K)
    y = x.reshape(1, m * c, height, width)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(m * c, 1, 1, -1), groups=m * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(m * c, 1, -1, 1), groups=m * c)
    return y.view(m, c, height, width)


# ---- fused CPU path ----

_pools: dict[int, ThreadPoolExecutor] = {}


class _OutputBuffers:
    """Output arrays reused once nothing references the tensors made from them.

    A batch of 64 float views at 224 px is 38 MiB, above glibc's largest mmap threshold, so a fresh array per
    call got fresh pages and paid their page faults every time: normalising cost 0.21 ms of a core per view
    instead of 0.06 (measured on the 2-core dev machine). Making glibc keep such blocks (mallopt) fragmented
    its per-thread arenas next to FFCV's threads and RSS grew every epoch; this pool stays at the number of
    batches alive at once.
    """

    def __init__(self, keep: int = 8) -> None:
        self.free: dict[tuple[int, ...], list[np.ndarray]] = {}
        self.keep, self.lock = keep, threading.Lock()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        with self.lock:
            stack = self.free.get(shape)
            base = stack.pop() if stack else np.empty(shape, dtype=np.float32)
        view = base[...]  # handed out; when it (and every tensor on it) is gone, `base` comes back
        weakref.finalize(view, self._give_back, shape, base)
        return view

    def _give_back(self, shape: tuple[int, ...], base: np.ndarray) -> None:
        with self.lock:
            stack = self.free.setdefault(shape, [])
            if len(stack) < self.keep:
                stack.append(base)


_outputs = _OutputBuffers()


@numba.njit(nogil=True, fastmath=True, cache=True)
def _normalize_rows(src, scale, bias, out):  # pragma: no cover - compiled
    # uint8 (H, W*3) -> float32 (H, W*3); scale/bias are tiled over a row so the loop vectorises.
    height, row = src.shape
    for y in range(height):
        for j in range(row):
            out[y, j] = src[y, j] * scale[j] + bias[j]


def apply_cpu(views: torch.Tensor, params: AugmentDraw | None) -> torch.Tensor:
    n, _, height, width = views.shape
    pixels = views.permute(0, 2, 3, 1).contiguous().numpy()  # NHWC; no copy for channels_last input
    out = _outputs.take((n, height, width, 3))
    std = 255 * np.array(IMAGENET_STD, dtype=np.float32)
    scale = np.tile(1 / std, width)
    bias = np.tile(-255 * np.array(IMAGENET_MEAN, dtype=np.float32) / std, width)
    if params is not None:
        matrices, offset_scale, sigma, flip = (
            t.cpu().numpy() for t in (params.matrix, params.offset_scale, params.sigma, params.flip)
        )

    def one(i: int) -> None:
        image = pixels[i]
        if params is not None:
            mean_luma = float(np.dot(LUMA, cv2.mean(image)[:3]))
            affine = np.empty((3, 4), dtype=np.float32)
            affine[:, :3], affine[:, 3] = matrices[i], offset_scale[i] * mean_luma
            image = cv2.transform(image, affine)  # rounds and saturates to uint8: the clamp to [0, 1]
            if sigma[i] > 0:
                radius = blur_radius(float(sigma[i]), min(height, width))
                kernel = cv2.getGaussianKernel(2 * radius + 1, float(sigma[i]), cv2.CV_32F)
                image = cv2.sepFilter2D(image, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)
            if flip[i]:
                cv2.flip(image, 1, dst=image)
        _normalize_rows(image.reshape(height, width * 3), scale, bias, out[i].reshape(height, width * 3))

    def chunk(rows: range) -> None:
        for i in rows:
            one(i)

    workers = max(1, min(torch.get_num_threads(), n))
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="augment")
    list(_pools[workers].map(chunk, [range(k, n, workers) for k in range(workers)]))
    return torch.from_numpy(out).permute(0, 3, 1, 2)
