import math

import pytest
import torch
import torch.nn.functional as F

from model.knn import knn_predict, knn_scores, knn_top1


def slow_knn(features, bank, labels, classes, k, t):
    out = []
    for f in features:
        sims = sorted(((float(f @ b), int(y)) for b, y in zip(bank, labels)), reverse=True)[:k]
        scores = [0.0] * classes
        for s, y in sims:
            scores[y] += math.exp(s / t)
        out.append(max(range(classes), key=lambda c: scores[c]))
    return out


def test_knn_matches_reference():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(60, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (60,), generator=g)
    queries = F.normalize(torch.randn(25, 8, generator=g, dtype=torch.float64), dim=1)
    for k in (1, 7, 200):
        got = knn_predict(queries, bank, labels, 4, k=k, temperature=0.1, chunk=10).tolist()
        assert got == slow_knn(queries, bank, labels, 4, k, 0.1)


def test_knn_top1_separable_and_shuffled():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 16, generator=g) * 5
    labels = torch.randint(0, 5, (500,), generator=g)
    feats = centres[labels] + torch.randn(500, 16, generator=g)
    assert knn_top1(feats[:400], labels[:400], feats[400:], labels[400:], 5, k=20) > 0.95
    shuffled = labels[:400][torch.randperm(400, generator=g)]
    assert knn_top1(feats[:400], shuffled, feats[400:], labels[400:], 5, k=20) < 0.45


def test_float16_bank_votes_like_the_float64_reference():
    """The monitor's CUDA bank is float16: neighbours and votes match the float64 reference but for near-ties."""
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(6, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (400,), generator=g)
    features = F.normalize(centres[labels] + 0.8 * torch.randn(400, 32, generator=g, dtype=torch.float64), dim=1)
    bank, queries = features[:300], features[300:]
    reference = torch.tensor(slow_knn(queries, bank, labels[:300], 6, 20, 0.07))
    half = knn_predict(queries.half(), bank.half(), labels[:300], 6, k=20, temperature=0.07, chunk=32)
    assert (half == reference).float().mean() >= 0.97
    assert knn_top1(bank.half(), labels[:300], queries.half(), labels[300:], 6, k=20) == pytest.approx(
        knn_top1(bank, labels[:300], queries, labels[300:], 6, k=20), abs=0.03
    )


def test_float16_votes_do_not_overflow():
    # exp(sim / T) with sim ~ 1 and T = 0.05 is ~5e8, beyond float16 (65504): every class would score inf.
    a = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=1)
    b = F.normalize(torch.tensor([[1.0, 0.15, 0.0]]), dim=1)
    bank = torch.cat([a.repeat(10, 1), b.repeat(10, 1)]).half()
    labels = torch.tensor([1] * 10 + [0] * 10)
    scores = knn_scores(a.half(), bank, labels, 2, k=20, temperature=0.05)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert knn_predict(a.half(), bank, labels, 2, k=20, temperature=0.05).item() == 1
