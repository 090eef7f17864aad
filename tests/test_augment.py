import dataclasses
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    apply_batched,
    apply_cpu,
    apply_torch,
    augment,
    colour_augment,
    colour_matrices,
    draw,
    gaussian_blur,
    normalize,
)

OFF = AugmentConfig(jitter_p=0, grayscale_p=0, blur_p=0, flip_p=0)


def views(n=16, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return x.permute(0, 3, 1, 2)  # channels_last, as loaders give them


def denormalize(x):
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


@pytest.mark.parametrize("config", [AugmentConfig(), AugmentConfig(blur_p=0), OFF])
def test_shapes_dtype_range_layout(config):
    x = views()
    out = augment(x, config, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    pixels = denormalize(out)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_everything_off_is_plain_normalisation():
    x = views()
    torch.testing.assert_close(augment(x, OFF, torch.Generator()), normalize(x))


def test_grayscale_always_gives_equal_channels():
    out = denormalize(augment(views(), AugmentConfig(jitter_p=0, grayscale_p=1, blur_p=0), torch.Generator()))
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 1], out[:, 2], atol=1e-5, rtol=0)


def test_flip_always_mirrors():
    x = views()
    out = augment(x, AugmentConfig(jitter_p=0, grayscale_p=0, blur_p=0, flip_p=1), torch.Generator())
    torch.testing.assert_close(out, normalize(x).flip(-1))


def slow_jitter(image, b, c, s, h):
    """Brightness, contrast, saturation, hue (YIQ rotation) one after the other, no clamping."""
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    x = image * b
    x = (x - (x * luma).sum(0).mean()) * c + (x * luma).sum(0).mean()
    grey = (x * luma).sum(0, keepdim=True)
    x = grey + s * (x - grey)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    a = 2 * math.pi * h
    rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    return torch.einsum("ij,jhw->ihw", torch.linalg.inv(yiq) @ rot @ yiq, x)


def test_fused_colour_matrix_matches_sequential_reference():
    # Mid-grey-ish inputs and mild factors so no value clips: then fused == sequential exactly.
    x = 0.35 + 0.3 * torch.rand(8, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    config = AugmentConfig(jitter=(0.2, 0.2, 0.2, 0.05), jitter_p=1, grayscale_p=0)
    g = torch.Generator().manual_seed(5)
    out = colour_augment(x, *colour_matrices(8, config, g, torch.device("cpu")))
    g = torch.Generator().manual_seed(5)
    u = [torch.rand(8, generator=g) for _ in range(5)]  # jitter coin, then b, c, s, h in colour_matrices' order
    b, c, s = (0.8 + 0.4 * v for v in u[1:4])
    h = -0.05 + 0.1 * u[4]
    for i in range(8):
        reference = slow_jitter(x[i], b[i], c[i], s[i], h[i])
        assert 0 < reference.min() and reference.max() < 1
        torch.testing.assert_close(out[i], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_sigma", [2.0, 5.0])
def test_blur_matches_reference_conv(max_sigma):
    # Each image's taps stop at its own radius whatever the shared kernel's size (max_sigma); sigma 0 is the
    # identity.
    x = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.5, 1.0, 2.0, 0.0])
    out = gaussian_blur(x, sigma, max_sigma)
    torch.testing.assert_close(out[3], x[3], rtol=0, atol=0)
    for i in range(3):
        radius = math.ceil(3 * sigma[i])  # the kernel is cut at 3 sigma
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k1 = torch.exp(-0.5 * (taps / sigma[i]) ** 2)
        k2 = torch.outer(k1, k1) / k1.sum() ** 2
        padded = F.pad(x[i : i + 1], (radius,) * 4, mode="reflect")
        reference = F.conv2d(padded, k2.expand(3, 1, -1, -1), groups=3)
        torch.testing.assert_close(out[i : i + 1], reference, atol=1e-5, rtol=1e-5)


def test_same_generator_seed_replays():
    x = views()
    a = augment(x, AugmentConfig(), torch.Generator().manual_seed(7))
    b = augment(x, AugmentConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, augment(x, AugmentConfig(), torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("size", [7, 32, 224])
def test_cpu_path_matches_batched_torch_path(size):
    """The fused CPU path and the batched torch path (CUDA's) apply the same draws; they differ only by the
    CPU path's rounding to uint8 after the colour map and after the blur."""
    x = views(n=24, size=size, seed=3)
    params = draw(24, size, AugmentConfig(blur_p=0.7), torch.Generator().manual_seed(4))
    assert (params.sigma > 0).any() and params.flip.any() and not params.flip.all()
    fused = denormalize(apply_cpu(x, params))
    reference = apply_torch(x.float() / 255, params)
    error = (fused - reference).abs()
    assert error.max() <= 1.5 / 255 and error.mean() <= 0.5 / 255


def test_cpu_path_is_not_fooled_by_a_wrong_draw():
    # The comparison above can fail: one image's flip changed gives a large error.
    x = views(n=8, size=32, seed=3)
    params = draw(8, 32, AugmentConfig(blur_p=0), torch.Generator().manual_seed(4))
    wrong = dataclasses.replace(params, flip=params.flip ^ (torch.arange(8) == 0))
    error = (denormalize(apply_cpu(x, wrong)) - apply_torch(x.float() / 255, params)).abs()
    assert error[0].mean() > 20 / 255 and error[1:].max() <= 1.5 / 255


def test_cpu_output_memory_is_reused_only_after_every_tensor_on_it_is_gone():
    x, y = views(n=4, size=8, seed=1), views(n=4, size=8, seed=2)
    a = normalize(x)
    b = normalize(x)[:, :2]  # a slice keeps its batch's memory alive too
    assert a.data_ptr() != b.data_ptr()
    first, kept = a.data_ptr(), b.clone()
    del a
    c = normalize(y)
    assert c.data_ptr() == first  # a's memory came back
    torch.testing.assert_close(b, kept, rtol=0, atol=0)  # b's was not touched
    torch.testing.assert_close(c, normalize(y))


class HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: reading a value (`.item()`, `float(t)`,
    `int(t)`, `if t`) and `nonzero` (its output size depends on the values)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "nonzero"):
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_batched_path_reads_nothing_back_to_the_host():
    x = views(n=32, size=32, seed=5)
    params = draw(32, 32, AugmentConfig(blur_p=0.5), torch.Generator().manual_seed(6))
    assert (params.sigma > 0).any() and (params.sigma == 0).any()
    with HostReads() as reads:
        out = apply_batched(x, params)
    assert reads.counts == Counter() and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, normalize(apply_torch(x.float() / 255, params)))


@pytest.mark.parametrize("config", [AugmentConfig(), AugmentConfig(blur_p=0), OFF])
def test_batched_augmentation_runs_on_the_meta_device(config):
    # Meta tensors have shapes but no values: any op that needs a value (a sync on CUDA) fails here.
    x = torch.empty(8, 32, 32, 3, dtype=torch.uint8, device="meta").permute(0, 3, 1, 2)
    out = augment(x, config, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == x.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    params = draw(8, 32, config, torch.Generator(), device=torch.device("meta"))
    assert apply_torch(x.float() / 255, params).device.type == "meta"
