import math

import torch
import torch.nn.functional as F

from model.objectives import (
    info_nce,
    leoclr_attract_all_loss,
    leoclr_e2e_loss,
    leoclr_loss,
    mocov2_loss,
    nt_xent,
    symmetric_mocov2_loss,
)


def slow_info_nce(q, k, queue, t):
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ queue[j]) / t) for j in range(len(queue)))
        total += -math.log(pos / (pos + neg))
    return total / len(q)


def embeddings(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def test_info_nce_matches_reference():
    q, k, queue = embeddings(6, 16, seed=0), embeddings(6, 16, seed=1), embeddings(20, 16, seed=2)
    for t in (0.1, 0.2, 1.0):
        assert math.isclose(info_nce(q, k, queue, t).item(), slow_info_nce(q, k, queue, t), rel_tol=1e-6)


def test_info_nce_prefers_aligned_keys():
    q, queue = embeddings(8, 16, seed=3), embeddings(32, 16, seed=4)
    assert info_nce(q, q, queue, 0.2) < info_nce(q, embeddings(8, 16, seed=5), queue, 0.2)


def test_mocov2_is_one_term():
    q, k, queue = embeddings(5, 8, seed=6), embeddings(5, 8, seed=7), embeddings(10, 8, seed=8)
    assert math.isclose(mocov2_loss(q, k, queue, 0.2).item(), slow_info_nce(q, k, queue, 0.2), rel_tol=1e-6)


def test_leoclr_pulls_both_crops_to_the_original_only():
    u, v1, v2, queue = (embeddings(5, 8, seed=s) for s in (9, 10, 11, 12))
    expected = slow_info_nce(u, v1, queue, 0.2) + slow_info_nce(u, v2, queue, 0.2)
    assert math.isclose(leoclr_loss(u, v1, v2, queue, 0.2).item(), expected, rel_tol=1e-6)
    assert math.isclose(leoclr_loss(u, v2, v1, queue, 0.2).item(), expected, rel_tol=1e-6)  # crops symmetric


def test_leoclr_gradient_reaches_only_the_query():
    u = embeddings(4, 8, seed=13).requires_grad_()
    v1, v2 = embeddings(4, 8, seed=14).requires_grad_(), embeddings(4, 8, seed=15)
    leoclr_loss(u, v1.detach(), v2, embeddings(6, 8, seed=16), 0.2).backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
    assert v1.grad is None


def slow_nt_xent(a, b, t):
    z = torch.cat([a, b])
    n, total = len(a), 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = [math.exp(float(z[i] @ z[j]) / t) for j in range(2 * n) if j != i]
        total += -math.log(math.exp(float(z[i] @ z[partner]) / t) / sum(others))
    return total / (2 * n)


def test_nt_xent_matches_reference():
    a, b = embeddings(6, 16, seed=20), embeddings(6, 16, seed=21)
    for t in (0.1, 0.5):
        assert math.isclose(nt_xent(a, b, t).item(), slow_nt_xent(a, b, t), rel_tol=1e-6)
    assert math.isclose(nt_xent(a, b, 0.2).item(), nt_xent(b, a, 0.2).item(), rel_tol=1e-6)


def test_leoclr_e2e_pulls_each_crop_to_the_original_only():
    u, v1, v2 = embeddings(5, 8, seed=22), embeddings(5, 8, seed=23), embeddings(5, 8, seed=24)
    expected = slow_nt_xent(u, v1, 0.2) + slow_nt_xent(u, v2, 0.2)
    assert math.isclose(leoclr_e2e_loss(u, v1, v2, 0.2).item(), expected, rel_tol=1e-6)
    # No crop-crop term: gradients reach v1 only through its comparisons with u (and itself).
    v1 = v1.clone().requires_grad_()
    leoclr_e2e_loss(u, v1, v2, 0.2).backward()
    reference = v1.detach().clone().requires_grad_()
    nt_xent(u, reference, 0.2).backward()
    assert torch.allclose(v1.grad, reference.grad)


def test_symmetric_mocov2_and_attract_all_against_references():
    q1, q2, k1, k2, queue = (embeddings(5, 8, seed=s) for s in (25, 26, 27, 28, 29))
    expected = slow_info_nce(q1, k2, queue, 0.2) + slow_info_nce(q2, k1, queue, 0.2)
    assert math.isclose(symmetric_mocov2_loss(q1, q2, k1, k2, queue, 0.2).item(), expected, rel_tol=1e-6)
    u = embeddings(5, 8, seed=30)
    expected = sum(slow_info_nce(a, b, queue, 0.2) for a, b in ((u, k1), (u, k2), (q1, k2)))
    assert math.isclose(leoclr_attract_all_loss(u, q1, k1, k2, queue, 0.2).item(), expected, rel_tol=1e-6)
