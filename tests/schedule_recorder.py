"""train.py with the schedule its training loaders apply written down, for tests/test_distributed.py.

`recorded_epoch(path)` is a replacement for `Loader.epoch` that appends one JSON line per training batch served
to PATH.<rank>: epoch, step, rank, the sample indices and each crop's per-sample pixel sum (the windows applied,
as decoded and resized). Run as a script (under torchrun) it records to $SCHEDULE_RECORD and runs train.py.
"""

import json
import os
from pathlib import Path

from pipeline.loader import Loader

EPOCH = Loader.epoch


def recorded_epoch(path: str):
    def epoch(self, epoch: int, skip: int = 0):
        for step, batch in enumerate(EPOCH(self, epoch, skip), start=skip):
            if self.train:
                crops = [view.sum((1, 2, 3)).tolist() for view in (batch.crop1, batch.crop2) if view is not None]
                line = {"epoch": epoch, "step": step, "rank": self.rank, "indices": batch.indices.tolist()}
                with open(f"{path}.{self.rank}", "a") as file:
                    file.write(json.dumps({**line, "crops": crops}) + "\n")
            yield batch

    return epoch


def global_batches(path: str) -> dict[tuple[int, int], tuple[list, list]]:
    """(epoch, step) -> (indices, crop sums) of the global batch: every rank's slice in rank order, from every
    PATH.<rank> file; a step recorded twice (by two runs) is an error."""
    parts: dict[tuple[int, int], dict[int, dict]] = {}
    for file in sorted(Path(path).parent.glob(f"{Path(path).name}.*")):
        for line in file.read_text().splitlines():
            record = json.loads(line)
            ranks = parts.setdefault((record["epoch"], record["step"]), {})
            assert record["rank"] not in ranks, f"{record['epoch']}, {record['step']} recorded twice"
            ranks[record["rank"]] = record
    batches = {}
    for key, ranks in parts.items():
        slices = [ranks[r] for r in sorted(ranks)]
        indices = [i for part in slices for i in part["indices"]]
        crops = [[s for part in slices for s in part["crops"][c]] for c in range(len(slices[0]["crops"]))]
        batches[key] = (indices, crops)
    return batches


if __name__ == "__main__":
    Loader.epoch = recorded_epoch(os.environ["SCHEDULE_RECORD"])
    import train

    train.main()
