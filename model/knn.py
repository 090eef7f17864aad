"""Weighted kNN monitor (InstDisc / MoCo demo protocol): k nearest cosine neighbours vote with exp(sim / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_scores(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (M, num_classes) for L2-normalised features (M, D) against a normalised bank (N, D), both in
    one dtype (float16 keeps a large bank small on the GPU); the scores are float32 (float64 for float64 inputs).

    Each of the min(k, N) most similar bank entries adds exp(sim / T) to its label's score.
    Works in chunks of queries so memory stays O(chunk x N).
    """
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(features), chunk):
        sim = features[start : start + chunk] @ bank.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        # exp(1 / 0.07) overflows float16 and 200 votes add up: weights and votes in float32 at least.
        weights = (top_sim.to(torch.promote_types(top_sim.dtype, torch.float32)) / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=sim.device, dtype=weights.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[top_idx], weights))
    return torch.cat(scores)


def knn_predict(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels (M,) int64: the class with the largest `knn_scores`."""
    return knn_scores(features, bank, bank_labels, num_classes, k, temperature, chunk).argmax(1)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy (fraction 0-1) of `knn_predict` on the validation features (M, D) against the bank (N, D);
    features need not be normalised. A float16 bank (normalise it before casting: squared norms overflow
    float16) is used as it is, in float16; anything else in float32."""
    dtype = torch.float16 if train_features.dtype == torch.float16 else torch.float32
    bank, queries = F.normalize(train_features.to(dtype), dim=1), F.normalize(val_features.to(dtype), dim=1)
    predicted = knn_predict(queries, bank, train_labels, num_classes, k, temperature)
    return (predicted == val_labels).float().mean().item()
