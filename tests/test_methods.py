"""Batch norm and the methods' views: which views of one image share a BN group, in one process and over ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from model import methods
from model.backbone import SplitBatchNorm
from model.methods import METHODS, VARIANTS
from model.moco import MomentumContrast
from model.objectives import leoclr_e2e_loss, nt_xent

# Each method whose f_q forward stacks views: its objective in model.methods, and which of the objective's
# arguments are f_q's outputs, named by their view.
STACKED = {
    "simclr": (METHODS["simclr"], "nt_xent", {0: "crop1", 1: "crop2"}),
    "leoclr-e2e": (METHODS["leoclr-e2e"], "leoclr_e2e_loss", {0: "original", 1: "crop1", 2: "crop2"}),
    "mocov2 --symmetric": (VARIANTS["mocov2", "symmetric"], "symmetric_mocov2_loss", {0: "crop1", 1: "crop2"}),
    "leoclr --attract-all": (VARIANTS["leoclr", "attract_all"], "leoclr_attract_all_loss", {0: "original", 1: "crop1"}),
}
END_TO_END = ("simclr", "leoclr-e2e")


class BatchNormProbe(nn.Module):
    """An encoder that is one split batch norm over (N, C, 1, 1) -> (N, C). Fed one-hot rows (row k hot in
    channel k), it says who shares a BN group: in train mode channel k of a row's output is nonzero exactly
    when row k is in that row's group (a channel that is zero over the whole group stays 0)."""

    def __init__(self, channels: int, splits: int) -> None:
        super().__init__()
        self.norm = SplitBatchNorm(channels, splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x).flatten(1)


@pytest.fixture(scope="module")
def model() -> MomentumContrast:
    """A MomentumContrast (queue, momentum) whose encoders each test replaces with probes."""
    return MomentumContrast("resnet18", 16, queue_size=16)


def sharing_rates(monkeypatch, model, name: str, splits: int, batch: int = 8, trials: int = 150) -> tuple[float, float]:
    """How often two f_q outputs of `name`'s step share a BN group when they are views of one image (positives)
    and when they are views of different images (negatives), over `trials` seeded steps."""
    method, objective, positions = STACKED[name]
    names = ["original", "crop1", "crop2"]  # one-hot codes for every view; the step takes those it uses
    rows = len(names) * batch
    model.query_encoder, model.key_encoder = BatchNormProbe(rows, splits), BatchNormProbe(rows, splits)
    model.bn_splits = splits
    code = torch.eye(rows).view(rows, rows, 1, 1)
    views = {view: code[v * batch : (v + 1) * batch] for v, view in enumerate(names)}
    seen = {}
    monkeypatch.setattr(methods, objective, lambda *args: seen.update({v: args[k] for k, v in positions.items()}))
    same = torch.eye(batch, dtype=torch.bool)
    counts = torch.zeros(2, 2)  # [positives, negatives] x [shared, pairs]
    for seed in range(trials):
        method.step(model.train(), views, 0.1, torch.Generator().manual_seed(seed))
        for view, out in seen.items():
            for other in seen:
                columns = slice(names.index(other) * batch, (names.index(other) + 1) * batch)
                together = out[:, columns] != 0  # (i, j): view's image i and other's image j in one group
                if view != other:
                    counts[0] += torch.tensor([together[same].sum(), batch])
                counts[1] += torch.tensor([together[~same].sum(), batch * (batch - 1)])
    return (counts[0, 0] / counts[0, 1]).item(), (counts[1, 0] / counts[1, 1]).item()


@pytest.mark.parametrize("splits", [1, 2, 4, 8])  # every split count resolve() allows for a batch of 8
@pytest.mark.parametrize("name", list(STACKED))
def test_views_of_one_image_share_a_bn_group_no_more_than_their_negatives(monkeypatch, model, name, splits):
    positives, negatives = sharing_rates(monkeypatch, model, name, splits)
    if splits == 1:  # one group: everything shares it (global BN)
        assert positives == negatives == 1.0
    elif name in END_TO_END:
        # Scored against each other in the batch: mixed over the groups, a positive shares its anchor's group
        # as often as a negative does (the contiguous blocks gave 0, or more than the negatives for 3 views).
        expected = (3 * 8 // splits - 1) / (3 * 8 - 1) if name == "leoclr-e2e" else (2 * 8 // splits - 1) / 15
        assert negatives == pytest.approx(expected, abs=0.02)
        assert positives == pytest.approx(negatives, abs=0.04), (positives, negatives)
    else:
        # f_q's outputs are scored only against f_k's keys: the stacked views never share a group.
        assert positives == 0.0 and positives <= negatives


# ---- over processes: the mixing and NT-Xent's negatives across ranks equal one process's global batch ----

WORLD, PER_RANK = 2, 4


def global_views(method: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    names = METHODS[method].views
    return {name: torch.randn(WORLD * PER_RANK, 3, 16, 16, generator=generator) for name in names}


def model_for_test() -> MomentumContrast:
    torch.manual_seed(0)
    return MomentumContrast("resnet18", 16, queue_size=16, bn_splits=1)


def _rank(rank: int, method: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    model = model_for_test()
    model.distribute()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    views = {name: view[mine] for name, view in global_views(method).items()}
    loss, _ = METHODS[method].step(model, views, 0.2, torch.Generator().manual_seed(5))
    loss.backward()
    grads = {name: p.grad for name, p in model.query_encoder.named_parameters()}
    torch.save({"loss": loss.item(), "grads": grads}, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def one_process_reference(method: str) -> tuple[float, dict[str, torch.Tensor]]:
    """What two ranks with plain BN should compute, slowly: the global batch in the order the ranks gather it,
    permuted with rank 0's draw, each half a separate forward (its own BN statistics), put back, and the
    objective over all images with every other image as a negative."""
    model = model_for_test()
    views = global_views(method)
    names = METHODS[method].views
    # Rank r's stacked batch is its slice of every view; gathered in rank order.
    gathered = torch.cat([torch.cat([views[n][r * PER_RANK : (r + 1) * PER_RANK] for n in names]) for r in range(2)])
    order = torch.randperm(len(gathered), generator=torch.Generator().manual_seed(5))
    halves = [model.query_encoder(gathered[part]) for part in order.view(WORLD, -1)]
    out = torch.cat(halves)[torch.argsort(order)]
    per_rank = [out[r * len(names) * PER_RANK : (r + 1) * len(names) * PER_RANK].chunk(len(names)) for r in range(2)]
    z = [torch.cat([per_rank[r][v] for r in range(WORLD)]) for v in range(len(names))]
    loss = nt_xent(z[0], z[1], 0.2) if method == "simclr" else leoclr_e2e_loss(z[0], z[1], z[2], 0.2)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.query_encoder.named_parameters()}


@pytest.mark.parametrize("method", END_TO_END)
def test_two_processes_compute_the_global_batchs_loss_and_gradient(tmp_path, method):
    mp.start_processes(_rank, args=(method, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    loss, grads = one_process_reference(method)
    # Each rank's loss: its own anchors against every rank's embeddings; their mean is the global batch's.
    assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():  # DDP's average of the ranks' gradients: the global batch's gradient
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ranks[1]["grads"][name], grad, rtol=1e-4, atol=1e-6)
