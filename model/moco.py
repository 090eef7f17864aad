"""Query encoder, momentum key encoder and the queue of negative keys (MoCo), shared by every method."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model import distributed
from model.backbone import resnet


class Encoder(nn.Module):
    """Backbone + MLP head: (N, 3, S, S) -> L2-normalised float32 (N, out_dim); `features` = backbone output."""

    def __init__(self, arch: str, image_size: int, out_dim: int = 128, bn_splits: int = 1) -> None:
        super().__init__()
        self.backbone, dim = resnet(arch, image_size, bn_splits)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv stage's output before pooling: (N, 3, S, S) -> (N, D, h, w)."""
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def forward(self, x: torch.Tensor, with_map: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (N, out_dim); with `with_map` also the last stage's map (N, D, h, w) they are pooled from
        (the backbone's own operations: its classifier is nn.Identity)."""
        maps = self.feature_map(x)
        features = self.backbone.fc(torch.flatten(self.backbone.avgpool(maps), 1))
        embeddings = F.normalize(self.head(features).float(), dim=1)  # float32 embeddings under autocast
        return (embeddings, maps) if with_map else embeddings


class MomentumContrast(nn.Module):
    """f_q trained by SGD, f_k its momentum copy (no grad), and a FIFO queue (K, out_dim) of past keys."""

    def __init__(
        self,
        arch: str,
        image_size: int,
        out_dim: int = 128,
        queue_size: int = 4096,
        momentum: float = 0.99,
        bn_splits: int = 8,
    ) -> None:
        super().__init__()
        self.query_encoder = Encoder(arch, image_size, out_dim, bn_splits)
        self.key_encoder = copy.deepcopy(self.query_encoder)
        self.key_encoder.requires_grad_(False)
        self.momentum, self.bn_splits = momentum, bn_splits
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def query(self, x: torch.Tensor, with_map: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """f_q(x) (and with `with_map` its last-stage map, as `Encoder.forward`): through DistributedDataParallel
        when `distribute` set it up (gradients averaged over ranks)."""
        wrapped = self.__dict__.get("_ddp")
        encoder = self.query_encoder if wrapped is None else wrapped
        return encoder(x, with_map=True) if with_map else encoder(x)

    def query_mixed(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """f_q(x) (N, out_dim) for a batch that stacks several views of the same images (view v of image i at
        row v * B + i), computed in a random order over every batch-norm group and returned in x's order.

        In a BN group, samples are normalised with statistics they share; views of one image scored against
        each other (in-batch negatives) must not share a group more often than an image's view and a
        negative do, or the statistics say which is the positive (SimCLR's reason for global BN). Split BN's
        groups are contiguous blocks, which would put rows i and B + i together whenever a block is longer
        than B (LeOCLR-e2e's 3B rows in 2 groups) and never otherwise (SimCLR's 2B rows in any even number):
        a fixed pattern either way. After a uniform permutation every pair of rows shares a group with the
        same probability. Under torchrun the global batch is permuted across the ranks (MoCo's key shuffle,
        with gradients routed back to the ranks that computed each row), so a rank's plain-BN group is a random
        part of the global batch rather than its own images' views. One BN group in one process: nothing to mix.
        """
        if distributed.active():
            mine, inverse = distributed.shuffle_across_ranks(x, generator)  # images: no gradient needed
            return distributed.unshuffle_with_grad(self.query(mine), inverse)
        if self.bn_splits == 1:
            return self.query(x)
        order = torch.randperm(len(x), device=x.device, generator=generator)
        return self.query(x[order])[torch.argsort(order)]

    def distribute(self, device_ids: list[int] | None = None) -> None:
        """Wrap f_q in DistributedDataParallel (kept out of the module tree: checkpoints keep their keys)."""
        self.__dict__["_ddp"] = nn.parallel.DistributedDataParallel(self.query_encoder, device_ids=device_ids)

    @torch.no_grad()
    def update_key_encoder(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q for parameters; f_k keeps its own BN statistics (as MoCo)."""
        q_params = list(self.query_encoder.parameters())
        k_params = list(self.key_encoder.parameters())
        torch._foreach_mul_(k_params, self.momentum)
        torch._foreach_add_(k_params, q_params, alpha=1 - self.momentum)

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Key embeddings (N, out_dim) of x (N, 3, S, S), computed on a shuffled batch and restored to x's order.

        Shuffle BN on one device: split BN groups samples by position, so without the shuffle query i and
        key i would share their BN group and the statistics would leak which key is the positive. With several
        ranks the global batch is shuffled across them, as in the official MoCo code.
        """
        if distributed.active():
            mine, inverse = distributed.shuffle_across_ranks(x, generator)
            return distributed.unshuffle(self.key_encoder(mine), inverse)
        order = torch.randperm(len(x), device=x.device, generator=generator)
        keys = self.key_encoder(x[order])
        return keys[torch.argsort(order)]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (M, out_dim) over the oldest entries, wrapping around; M need not divide K. With several
        ranks every rank's keys are written, in rank order, so all queues stay identical."""
        if len(keys) == 0:  # end-to-end methods keep no queue
            return
        size = self.queue.shape[0]
        keys = distributed.gather(keys.detach())[-size:].to(self.queue.dtype)
        slots = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[slots] = keys
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)
