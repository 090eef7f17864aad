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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)  # float32 embeddings under autocast


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
        self.momentum = momentum
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """f_q(x): through DistributedDataParallel when `distribute` set it up (gradients averaged over ranks)."""
        wrapped = self.__dict__.get("_ddp")
        return self.query_encoder(x) if wrapped is None else wrapped(x)

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
