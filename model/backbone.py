"""torchvision ResNets as feature extractors, with the small-image stem and split batch norm."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision import models

ARCHS = ("resnet18", "resnet50")


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over `num_splits` groups of the batch
    (group j = samples j, j + s, j + 2s, ...).

    On one device this stands in for MoCo's shuffle BN: a query and its positive key fall in different
    statistics groups less often than not, so BN cannot leak which samples belong together.
    Evaluation uses the running statistics as usual.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if n % self.num_splits:
            raise ValueError(f"batch of {n} does not split into {self.num_splits} batch-norm groups")
        running_mean = self.running_mean.repeat(self.num_splits)
        running_var = self.running_var.repeat(self.num_splits)
        # (N, C, H, W) -> (N/s, s*C, H, W): each split's channels get their own statistics.
        out = nn.functional.batch_norm(
            x.reshape(n // self.num_splits, self.num_splits * c, h, w),
            running_mean,
            running_var,
            self.weight.repeat(self.num_splits),
            self.bias.repeat(self.num_splits),
            True,
            self.momentum,
            self.eps,
        ).view(n, c, h, w)
        self.running_mean.copy_(running_mean.view(self.num_splits, c).mean(0))
        self.running_var.copy_(running_var.view(self.num_splits, c).mean(0))
        return out


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
