"""torchvision ResNets as feature extractors, with the small-image stem and split batch norm."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision import models

from model.options import ARCHS


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over `num_splits` groups of the batch: group j is
    the j-th contiguous block of N/s samples. The running statistics are the average of what each group's
    own BN would record; evaluation uses them as usual.

    On one device this stands in for MoCo's shuffle BN: keys are encoded in a shuffled order, so a query
    and its positive key fall in different statistics groups more often than not and BN cannot leak which
    samples belong together.
    Each block of a channels_last batch is itself channels_last, so every group runs the backend's own
    batch-norm kernel in the input's layout; the only extra memory traffic is joining the blocks (a cat
    forward, a split backward), where reshaping to (N/s, s*C, H, W) copied the activations to NCHW and back
    around every convolution.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, s = x.shape[0], self.num_splits
        if n % s:
            raise ValueError(f"batch of {n} does not split into {s} batch-norm groups")
        tracked = self.running_mean is not None
        # One row of running statistics per group, updated in place by batch_norm, then averaged back.
        means, variances = (
            (self.running_mean.repeat(s, 1), self.running_var.repeat(s, 1)) if tracked else ([None] * s,) * 2
        )
        groups = [
            nn.functional.batch_norm(group, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
            for group, mean, var in zip(x.split(n // s), means, variances)
        ]
        if tracked:
            with torch.no_grad():
                torch.mean(means, 0, out=self.running_mean)
                torch.mean(variances, 0, out=self.running_var)
        return torch.cat(groups)


def resnet(arch: str, image_size: int, bn_splits: int = 1) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier: (N, 3, S, S) -> pooled features (N, D). Returns (net, D).

    For S <= 64 the stem is a 3x3 stride-1 conv with no max-pool (the CIFAR recipe), so small images are not
    reduced to a few pixels before the first stage.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    norm = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    net = getattr(models, arch)(weights=None, norm_layer=norm)
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim
