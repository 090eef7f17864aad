"""--ccrop-boxes forward: ContrastiveCrop boxes refreshed from LeOCLR's own training forward (f_q's map of each
sample's whole original), on the device, with no host read in the step; kept by checkpoints; refused where f_q
never sees a whole original."""

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN, tiny_loader
from torch.utils._python_dispatch import TorchDispatchMode

import pipeline.augment
import train
from model.config import Config
from model.localize import ForwardBoxes
from model.methods import method_for
from model.moco import MomentumContrast
from pipeline.backends import load_splits
from pipeline.ccrop import heatmap_boxes
from run import step as run_step
from run import stop as run_stop
from run.parts import augment_config, optimizer_and_scaler
from run.step import augment_views, training_step


def invoke(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


K = 0.7  # above the default 0.1: random weights' maps then give boxes smaller than the image


@pytest.mark.parametrize("attract_all", [False, True])
def test_a_step_boxes_each_sample_as_heatmap_boxes_of_its_originals_map(tiny_data, one_torch_thread, attract_all):
    torch.manual_seed(0)
    images, _ = load_splits(tiny_data, "torchvision", 0, 0, 0)
    batch = next(iter(tiny_loader("torchvision", images, size=32, batch=8).epoch(0)))
    cfg = Config.from_dict(
        {"image_size": 32, "amp": "off", "bn_splits": 2, "queue_size": 32, "attract_all": attract_all}
    )
    method = method_for("leoclr", attract_all=attract_all)
    model = MomentumContrast("resnet18", 32, queue_size=32, bn_splits=2)
    before = copy.deepcopy(model)  # the weights the step's forward sees
    optimizer, scaler = optimizer_and_scaler(cfg, model, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    views, flipped = augment_views(batch, method, augment_config(cfg), generator)
    assert flipped.any() and not flipped.all()  # both kinds in the batch: the mirroring is checked
    boxes = ForwardBoxes(len(images), 32, K, torch.device("cpu"), start=0)
    maps = {}
    training_step(model, method, optimizer, scaler, views, cfg, generator, maps)
    boxes.record(batch.indices, maps["original"], flipped, stamp=7)

    # The reference: f_q's map of each original as the step augmented it, in train mode (the step's batch
    # statistics; the attract-all batch stacks the originals over crop 1), the map mirrored back where the
    # original was flipped, then the box rule image by image.
    query_batch = views["original"] if not attract_all else torch.cat([views["original"], views["crop1"]])
    reference_maps = before.train().query_encoder.feature_map(query_batch)[: len(batch.indices)].detach()
    for row, index in enumerate(batch.indices.tolist()):
        own = reference_maps[row : row + 1]
        expected = heatmap_boxes(own.flip(-1) if flipped[row] else own, (32, 32), K)[0]
        assert torch.allclose(boxes.boxes[index], expected, atol=1e-6), (row, boxes.boxes[index], expected)
    trained = torch.zeros(len(images), dtype=torch.bool)
    trained[batch.indices] = True
    assert (boxes.stamps[trained] == 7).all() and (boxes.stamps[~trained] == 0).all()
    assert (boxes.boxes[~trained] == torch.tensor([0.0, 0.0, 1.0, 1.0])).all()  # untouched: the whole image
    assert (boxes.boxes[trained] != torch.tensor([0.0, 0.0, 1.0, 1.0])).any()  # the maps did box something

    # The map comes with the very embeddings the plain forward gives.
    before.eval()
    plain = before.query(views["original"])
    with_map, feature_map = before.query(views["original"], with_map=True)
    assert torch.equal(plain, with_map) and torch.equal(
        feature_map, before.query_encoder.feature_map(views["original"])
    )


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.total, self.names = 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero"):
            self.total += 1
            self.names[name] += 1
        return func(*args, **(kwargs or {}))


FORWARD = ["--crop", "ccrop", "--ccrop-boxes", "forward", "--ccrop-warmup", 1, "--ccrop-interval", 1]


def test_steps_that_refresh_boxes_read_nothing_back(tiny_data, tmp_path, monkeypatch, one_torch_thread):
    reads, marks, records = HostReads(), [], []
    learning_rate, record = run_step.learning_rate, ForwardBoxes.record

    def step_starts(*args):
        marks.append(reads.total)
        return learning_rate(*args)

    def counted_record(self, *args, **kwargs):
        records.append(len(marks) - 1)
        return record(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.augment, "apply", pipeline.augment.apply_batched)  # CUDA's path, on the CPU
    monkeypatch.setattr(run_step, "learning_rate", step_starts)
    monkeypatch.setattr(ForwardBoxes, "record", counted_record)
    monkeypatch.setattr(run_stop, "CHECK_EVERY", 3)
    # DALI: the torchvision backend reads its CPU batches' failure flags on the host (not the step's doing)
    args = [*TINY_TRAIN, "--loader", "dali", "--workers", 1, "--batch-size", 4, "--queue-size", 16, "--epochs", 2]
    args += FORWARD
    with reads:
        result = invoke(*args, "--data", tiny_data, "--out", tmp_path / "run")
        marks.append(reads.total)
    assert result.exit_code == 0, result.output
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    assert len(per_step) == 12 and records == list(range(6, 12))  # epoch 2's steps refresh (epoch 1: random weights)
    # Steps 3 and 6 of each epoch look at the loss; the others, box refreshes included, read nothing.
    assert [per_step[i] for i in (6, 7, 9, 10)] == [0, 0, 0, 0], (per_step, reads.names)


def test_resumed_runs_keep_the_refreshed_boxes(tiny_data, tmp_path, one_torch_thread):
    # k 0.7: boxes well inside the image (at k 0.1 a 4x4 map often boxes the whole image, whatever the weights).
    # A learning-rate warm-up over all 3 epochs makes the rate independent of --epochs: the 2-epoch run trains
    # as the first 2 of the 3.
    args = [*TINY_TRAIN, "--image-size", 32, *FORWARD, "--ccrop-k", 0.7, "--warmup-epochs", 3, "--data", tiny_data]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert invoke(*args, "--epochs", 3, "--out", straight).exit_code == 0
    result = invoke(*args, "--epochs", 2, "--out", resumed)
    assert result.exit_code == 0, result.output
    saved = torch.load(resumed / "checkpoint.pt", weights_only=False)["forward_boxes"]
    assert (saved["stamps"] > 0).all()  # every image was refreshed in epoch 2
    assert (saved["boxes"] != np.array([0, 0, 1, 1], dtype=np.float32)).any()
    result = invoke("--resume", resumed / "checkpoint.pt", "--epochs", 3)
    assert result.exit_code == 0, result.output
    assert "boxes updated before epoch 3" in result.output
    # The boxes epoch 3 crops around are epoch 2's refreshes, as in the run that never stopped.
    assert np.array_equal(np.load(resumed / "boxes.npy"), saved["boxes"])
    assert np.array_equal(np.load(straight / "boxes.npy"), saved["boxes"])
    ends = [torch.load(run / "checkpoint.pt", weights_only=False)["forward_boxes"] for run in (straight, resumed)]
    assert all(np.array_equal(ends[0][key], ends[1][key]) for key in ("boxes", "stamps"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "mocov2"], "needs --method leoclr (f_q's forward of each whole original), not --method mocov2"),
        (
            ["--method", "leoclr-e2e"],
            "needs --method leoclr (f_q's forward of each whole original), not --method leoclr-e2e",
        ),
        (["--original", "random-crop"], "needs the whole original view, not --original random-crop"),
        (["--crop", "random"], "needs --crop ccrop"),
    ],
)
def test_forward_boxes_are_refused_without_a_whole_original_through_f_q(tiny_data, tmp_path, args, message):
    result = invoke(*TINY_TRAIN, *FORWARD, *args, "--data", tiny_data, "--out", tmp_path / "run")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert "Invalid value for --ccrop-boxes forward: " + message in result.output
    assert not (tmp_path / "run").exists()


def merge_on_rank(rank: int, store_path: str, results: str) -> None:
    """One gloo rank of `test_ranks_share_their_refreshes`: rank r refreshes images r, r + 2, ... (rank 1 also
    image 0, later than rank 0), then merges."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    boxes = ForwardBoxes(6, 16, 0.1, torch.device("cpu"), start=0)
    indices = torch.arange(rank, 6, 2)
    boxes.boxes.index_copy_(0, indices, torch.tensor([[0.1 * rank, 0.2, 0.5, 0.6]]).expand(len(indices), 4))
    boxes.stamps.index_fill_(0, indices, 3 + rank)
    if rank == 1:
        boxes.boxes[0], boxes.stamps[0] = torch.tensor([0.25, 0.25, 0.75, 0.75]), 9
    state = boxes.merge()
    np.savez(f"{results}{rank}.npz", host=boxes.host, **state)
    torch.distributed.destroy_process_group()


def test_ranks_share_their_refreshes(tmp_path):
    args = (str(tmp_path / "store"), str(tmp_path / "rank"))
    torch.multiprocessing.start_processes(
        merge_on_rank, args=args, nprocs=2, start_method="spawn"
    )  # fork could inherit locked threads
    ranks = [np.load(tmp_path / f"rank{rank}.npz") for rank in (0, 1)]
    expected = np.array([[0.25, 0.25, 0.75, 0.75], *[[0.1 * (i % 2), 0.2, 0.5, 0.6] for i in range(1, 6)]])
    for each in ranks:  # every rank: the other's images, and image 0 from its latest refresh (rank 1's)
        assert np.allclose(each["boxes"], expected) and np.array_equal(each["host"], each["boxes"])
        assert each["stamps"].tolist() == [9, 4, 3, 4, 3, 4]
