import torch
from torch import nn

from model.backbone import SplitBatchNorm, resnet
from model.moco import MomentumContrast


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return MomentumContrast("resnet18", 16, out_dim=8, queue_size=kwargs.pop("queue_size", 10), **kwargs)


def test_key_encoder_starts_as_copy_and_has_no_grad():
    model = tiny_model()
    for q, k in zip(model.query_encoder.parameters(), model.key_encoder.parameters()):
        assert torch.equal(q, k) and not k.requires_grad


def test_momentum_update_formula():
    model = tiny_model(momentum=0.9)
    with torch.no_grad():
        for p in model.query_encoder.parameters():
            p.add_(1.0)
    before = [k.clone() for k in model.key_encoder.parameters()]
    model.update_key_encoder()
    for k0, k1, q in zip(before, model.key_encoder.parameters(), model.query_encoder.parameters()):
        torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * q)


def test_queue_is_fifo_and_wraps():
    model = tiny_model(queue_size=10)
    first, second = torch.full((4, 8), 1.0), torch.full((8, 8), 2.0)
    model.enqueue(first)
    assert torch.equal(model.queue[:4], first) and model.queue_ptr.item() == 4
    model.enqueue(second)  # fills slots 4..9, then wraps over 0..1
    assert torch.equal(model.queue[4:], second[:6]) and torch.equal(model.queue[:2], second[6:])
    assert torch.equal(model.queue[2:4], first[2:]) and model.queue_ptr.item() == 2


def test_split_batch_norm_matches_per_split_reference():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 4, 4)
    split = SplitBatchNorm(3, num_splits=4)
    out = split(x)
    # Split j holds the j-th block of N/4 samples.
    groups = [x[2 * j : 2 * j + 2] for j in range(4)]
    reference = torch.empty_like(x)
    for j, group in enumerate(groups):
        reference[2 * j : 2 * j + 2] = nn.functional.batch_norm(group, None, None, training=True)
    torch.testing.assert_close(out, reference)
    # Running statistics: the average of what each split's own BN would have recorded.
    means = torch.stack([c.mean((0, 2, 3)) for c in groups])
    variances = torch.stack([c.transpose(0, 1).reshape(3, -1).var(1) for c in groups])
    torch.testing.assert_close(split.running_mean, 0.1 * means.mean(0))
    torch.testing.assert_close(split.running_var, 0.9 + 0.1 * variances.mean(0))
    split.eval()
    torch.testing.assert_close(split(x), nn.functional.batch_norm(x, split.running_mean, split.running_var))


def test_small_stem_keeps_resolution():
    net, dim = resnet("resnet18", 32)
    assert dim == 512 and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
    big, _ = resnet("resnet18", 224)
    assert big.conv1.stride == (2, 2)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_encode_keys_restores_order_and_shuffles_bn_groups():
    model = tiny_model(bn_splits=2)
    x = torch.randn(8, 3, 16, 16)
    model.key_encoder.eval()  # eval BN: the shuffle must not change any key
    torch.testing.assert_close(model.encode_keys(x, torch.Generator().manual_seed(0)), model.key_encoder(x))
    model.key_encoder.train()  # train BN: keys depend on which samples share a group
    seen = {tuple(model.encode_keys(x, torch.Generator().manual_seed(s))[0].tolist()) for s in range(4)}
    assert len(seen) > 1
