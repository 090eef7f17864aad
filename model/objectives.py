"""Contrastive objectives as small functions of L2-normalised embeddings and the queue of negatives.

Shapes: embeddings (N, D) float, queue (K, D) float, all rows L2-normalised. They know nothing of loaders
or encoders; `model.methods` decides which view goes through which encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import distributed


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo InfoNCE: mean over i of -log softmax([q_i.k_i, q_i.queue] / T)[0]. Returns a float32 scalar.

    Computed in float32 even under autocast: bf16 similarities carry ~1e-2 error, which at T = 0.1 blurs
    the gap between the positive and the hardest negatives.
    """
    query, key, queue = query.float(), key.float(), queue.float()
    with torch.autocast(query.device.type, enabled=False):
        positive = (query * key).sum(1, keepdim=True)
        negative = query @ queue.t()
        logits = torch.cat([positive, negative], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def mocov2_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Official (asymmetric) MoCo-v2: one view's query against the other view's key."""
    return info_nce(query, key, queue, temperature)


def leoclr_loss(
    original: torch.Tensor, key1: torch.Tensor, key2: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """LeOCLR Eq. 3: the original's query u pulled toward each crop's key, l(u, v1) + l(u, v2).

    The two crops are never compared with each other. Each term is a batch mean, so the loss is twice a
    MoCo-v2 loss in scale (the paper's sum over i only rescales the learning rate).
    """
    return info_nce(original, key1, queue, temperature) + info_nce(original, key2, queue, temperature)


def symmetric_mocov2_loss(
    query1: torch.Tensor,
    query2: torch.Tensor,
    key1: torch.Tensor,
    key2: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Symmetric MoCo-v2: both directions, l(q1, k2) + l(q2, k1)."""
    return info_nce(query1, key2, queue, temperature) + info_nce(query2, key1, queue, temperature)


def leoclr_attract_all_loss(
    original: torch.Tensor,
    query1: torch.Tensor,
    key1: torch.Tensor,
    key2: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """LeOCLR Table 8 "attract all crops": every pair of the three views attracted once,
    l(u, v1) + l(u, v2) + l(q1, v2), where q1 is crop 1's query."""
    return leoclr_loss(original, key1, key2, queue, temperature) + info_nce(query1, key2, queue, temperature)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent with in-batch negatives for views a, b (N, D): each of the 2N embeddings has its
    partner as the positive and the other 2N - 2 as negatives; mean over the 2N. Float32 scalar.

    Under torchrun the negatives are every rank's embeddings (W ranks: 2WN - 2 of them, as SimCLR's
    cross-replica concatenation), gathered with their gradient: this rank's rows also get the gradient they
    have as other ranks' negatives, so with DDP's average the step is the one of the whole global batch.
    """
    a, b = a.float(), b.float()
    with torch.autocast(a.device.type, enabled=False):
        mine = torch.cat([a, b])  # (2N, D), the anchors
        everyone = distributed.gather_with_grad(mine)  # (W * 2N, D), rank-major: this rank's rows at `offset`
        n, offset = len(a), distributed.rank() * len(mine)
        logits = (mine @ everyone.t()) / temperature
        rows = torch.arange(2 * n, device=a.device)
        itself = torch.arange(len(everyone), device=a.device) == (offset + rows)[:, None]
        logits = logits.masked_fill(itself, float("-inf"))  # an embedding is never its own negative
        partner = offset + torch.cat([rows[n:], rows[:n]])
        return F.cross_entropy(logits, partner)


def leoclr_e2e_loss(original: torch.Tensor, crop1: torch.Tensor, crop2: torch.Tensor, temperature: float):
    """LeOCLR end to end (Table 5): each crop pulled toward the original with in-batch negatives,
    NT-Xent(u, v1) + NT-Xent(u, v2); the crops are never compared with each other."""
    return nt_xent(original, crop1, temperature) + nt_xent(original, crop2, temperature)
