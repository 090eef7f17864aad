"""Split batch norm: the statistics of each group against a slow reference, and no layout copies in a
training-mode ResNet-50 (every convolution sees channels_last input)."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model.backbone import SplitBatchNorm, resnet

COPIES = {"clone", "copy_", "_to_copy", "contiguous"}


class CopyBytes(TorchDispatchMode):
    """Output bytes of every copy op, split into 4-D tensors (activations, where a layout change would show)
    and the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.activations = self.other = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in COPIES:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if t.dim() == 4:
                    self.activations += t.numel() * t.element_size()
                else:
                    self.other += t.numel() * t.element_size()
        return out


def slow_split_batch_norm(x, weight, bias, splits, eps):
    """Group j = the j-th block of N/s samples, each normalised with its own mean and biased variance."""
    out = []
    for group in x.split(x.shape[0] // splits):
        mean = group.mean(dim=(0, 2, 3), keepdim=True)
        var = ((group - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        out.append((group - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    return torch.cat(out)


@pytest.mark.parametrize("channels_last", [True, False])
def test_split_batch_norm_matches_a_slow_reference_with_gradients_and_running_stats(channels_last):
    g = torch.Generator().manual_seed(0)
    x = 3 + 2 * torch.randn(12, 5, 3, 4, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = SplitBatchNorm(5, num_splits=3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(5, generator=g))
        bn.running_mean.copy_(torch.randn(5, generator=g))
        bn.running_var.copy_(torch.rand(5, generator=g) + 0.5)
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    weight, bias = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()

    out = bn(xa)
    reference = slow_split_batch_norm(xb, weight, bias, 3, bn.eps)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last  # the input's layout kept
    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream)
    reference.backward(upstream)
    for got, want in ((xa.grad, xb.grad), (bn.weight.grad, weight.grad), (bn.bias.grad, bias.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Running statistics: the average of what each group's own BN records (unbiased variance).
    groups = x.split(4)
    means = torch.stack([group.mean((0, 2, 3)) for group in groups])
    variances = torch.stack([group.transpose(0, 1).reshape(5, -1).var(1) for group in groups])
    torch.testing.assert_close(bn.running_mean, 0.7 * before_mean + 0.3 * means.mean(0))
    torch.testing.assert_close(bn.running_var, 0.7 * before_var + 0.3 * variances.mean(0))
    bn.eval()
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


def test_split_batch_norm_rejects_a_batch_it_cannot_split():
    with pytest.raises(ValueError, match="does not split into 4"):
        SplitBatchNorm(3, num_splits=4)(torch.randn(6, 3, 2, 2))


def training_resnet50(bn_splits: int) -> nn.Module:
    torch.manual_seed(0)
    net, _ = resnet("resnet50", 32, bn_splits)
    return net.to(memory_format=torch.channels_last).train()


def test_every_convolution_of_a_split_bn_resnet50_gets_channels_last_input():
    net = training_resnet50(bn_splits=8)
    seen = []

    def note(module, args):
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last))

    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_pre_hook(note)
    net(torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert len(seen) == 53 and all(seen), f"{seen.count(False)} of {len(seen)} convolutions got another layout"


def test_split_bn_resnet50_forward_backward_copies_no_activations():
    """The issue's count: the output bytes of clone/copy_/_to_copy/contiguous over one forward + backward
    (batch 16, 32 px). Reshaping to (N/s, s*C, H, W) copied 1,319 MB here; plain BN copies only the pooled
    features' gradient (N, 2048), which split BN must not add to."""
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    counts = {}
    for splits in (1, 8):
        net = training_resnet50(splits)
        with CopyBytes() as counted:
            net(x).sum().backward()
        counts[splits] = counted
    assert counts[8].activations == 0
    assert counts[8].other == counts[1].other
