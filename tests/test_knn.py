import math

import torch
import torch.nn.functional as F

from model.knn import knn_predict, knn_top1


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
