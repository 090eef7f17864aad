"""The training step never makes the host wait for the device, except for one look every CHECK_EVERY steps.

On the CPU nothing waits, so the test counts what would: `aten._local_scalar_dense` (`.item()`, `float(t)`,
`if t`) and `aten.nonzero`, over train.py's own loop with the batched (CUDA) augmentation.
"""

from collections import Counter

from click.testing import CliRunner
from conftest import TINY_TRAIN
from torch.utils._python_dispatch import TorchDispatchMode

import pipeline.augment
import train
from run import step as run_step
from run import stop as run_stop

SYNCS = ("_local_scalar_dense", "nonzero")


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.names = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.total += 1
            self.names[name] += 1
        return func(*args, **(kwargs or {}))


def test_only_every_kth_step_reads_from_the_device(tiny_data, tmp_path, monkeypatch):
    reads, marks, looks, gathers = HostReads(), [], [], []
    learning_rate, poll, gather = run_step.learning_rate, run_stop.poll, run_stop.gather

    def step_starts(*args):  # called once at the start of every step
        marks.append(reads.total)
        return learning_rate(*args)

    def counted_poll(*args):
        looks.append(len(marks) - 1)  # the step that looks
        return poll(*args)

    def counted_gather(x):
        gathers.append(len(marks) - 1)
        return gather(x)

    monkeypatch.setattr(pipeline.augment, "apply", pipeline.augment.apply_batched)  # CUDA's path, on the CPU
    monkeypatch.setattr(run_step, "learning_rate", step_starts)
    monkeypatch.setattr(run_stop, "poll", counted_poll)
    monkeypatch.setattr(run_stop, "gather", counted_gather)
    monkeypatch.setattr(run_stop, "CHECK_EVERY", 3)
    args = [
        *TINY_TRAIN,
        "--batch-size",
        4,
        "--queue-size",
        16,
        "--method",
        "leoclr",
        "--blur",
        "--amp",
        "off",
        "--data",
        tiny_data,
        "--out",
        tmp_path / "run",
    ]
    with reads:
        result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
        marks.append(reads.total)
    assert result.exit_code == 0, result.output
    steps = len(marks) - 1
    assert steps == 6  # 24 images, batch 4
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    # Steps 3 and 6 look (once: the poll's read, a host copy on CUDA, is no dispatch op on the CPU);
    # the others read nothing, the augmentation with blur on included.
    assert looks == [2, 5] and gathers[:2] == [2, 5]
    assert per_step[:2] == [0, 0] and per_step[3:5] == [0, 0], (per_step, reads.names)
    assert per_step[2] <= 1, (per_step, reads.names)
