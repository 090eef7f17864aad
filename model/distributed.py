"""Several processes (torchrun): the process group from torchrun's environment, gathers, and MoCo's shuffle BN
across ranks, all with torch.distributed's own collectives. With one process every function is the identity."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def init_from_env(cuda: bool) -> tuple[int, int, int]:
    """(rank, world size, local rank). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl on CUDA,
    gloo on CPU; otherwise (0, 1, 0) and nothing is initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (same shape on each) concatenated in rank order along dim 0; no gradient."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """As `gather`, for parts whose first dimension differs between ranks (an evaluation pass's shards)."""
    if not active():
        return x
    sizes = gather(torch.tensor([len(x)], device=x.device)).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = gather(padded).split(max(sizes))
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@torch.no_grad()
def gather_to_main(x: torch.Tensor) -> torch.Tensor | None:
    """As `gather_uneven`, but only rank 0 receives the whole (and the other ranks get None): a kNN bank of
    1.28M x 2048 float16 is 5 GB, which every rank holding a copy of would waste."""
    if not active():
        return x
    sizes = gather(torch.tensor([len(x)], device=x.device)).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes] if dist.get_rank() == 0 else None
    dist.gather(padded, parts, dst=0)
    if parts is None:
        return None
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def gather_objects(value: object) -> list:
    """Every rank's picklable `value`, in rank order ([value] with one process)."""
    if not active():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def sum_arrays(array: np.ndarray) -> np.ndarray:
    """The element-wise sum of a numpy array over ranks (rows each rank filled, zeros elsewhere, combine)."""
    if not active():
        return array
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    dist.all_reduce(total)
    return total.cpu().numpy()


@torch.no_grad()
def shuffle_across_ranks(x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffle BN over ranks: gather every rank's x (B, ...), permute the global batch with rank 0's
    draw (broadcast), and return this rank's slice of it plus the permutation's inverse for `unshuffle`."""
    gathered = gather(x)
    order = torch.randperm(len(gathered), device=x.device, generator=generator)
    dist.broadcast(order, src=0)
    mine = order.view(dist.get_world_size(), -1)[dist.get_rank()]
    return gathered[mine], torch.argsort(order)


@torch.no_grad()
def unshuffle(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """This rank's rows, in its original order, of the outputs `y` each rank computed on its shuffled slice."""
    return gather(y)[inverse.view(dist.get_world_size(), -1)[dist.get_rank()]]


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered whole and hands each rank its part:
    a loss on one rank reaches the rows another rank computed (gloo and nccl both have all_reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """As `gather`, differentiable: each rank's part gets the gradient of the sum of every rank's loss (so with
    DDP's average the step is that of the mean loss over all ranks). The identity with one process."""
    return _GatherWithGradient.apply(x) if active() else x


def unshuffle_with_grad(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """As `unshuffle`, differentiable (`gather_with_grad`): the rows this rank's loss uses flow back to the
    ranks that computed them."""
    return gather_with_grad(y)[inverse.view(dist.get_world_size(), -1)[dist.get_rank()]]
