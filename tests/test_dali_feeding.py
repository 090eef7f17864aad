"""How the DALI loader is fed: files read by its reader threads ahead of the batch DALI asks for, every
scheduled file once, threads and queue depth from the machine, NVIDIA's decoder settings by their names."""

import threading
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tiny_loader as loader
from nvidia.dali import backend

import pipeline.backends.dali as dali_loader
import pipeline.loader as contract
from pipeline.data import scan_split
from pipeline.loader import LoaderSpec

PAIRS = np.array([[0, 5], [3, 20], [10, 2], [17, 9]])


@pytest.fixture(scope="module")
def images(tiny_data):
    return scan_split(tiny_data / "train")


@pytest.mark.parametrize("pairs", [None, PAIRS])
def test_reader_threads_read_every_scheduled_file_once_ahead_of_its_batch(images, monkeypatch, pairs):
    reads, read = [], dali_loader._read

    def recorded(path):
        reads.append((threading.current_thread().name, path))
        return read(path)

    monkeypatch.setattr(dali_loader, "_read", recorded)
    data = loader("dali", images, view_count=2, pairs=pairs, seed=2)
    for epoch in (0, 1):
        reads.clear()
        order, _, second = data.schedule(epoch)
        batches = list(data.epoch(epoch))
        assert len(batches) == len(data)
        assert all(name.startswith("dali-read") for name, _ in reads)  # never the thread asking for batches
        expected = [images.paths[i] for i in order]
        if pairs is not None:
            expected += [images.paths[b] if a != b else None for a, b in zip(order, second)]
        assert Counter(path for _, path in reads) == Counter(expected)
        assert [int(i) for b in batches for i in b.indices] == order.tolist()  # the schedule, in order
    data.close()


def test_a_batch_waits_only_for_its_own_files(images, monkeypatch):
    """Call k of the source submits batches k+1 .. k+READ_AHEAD before it waits for batch k's files."""
    data = loader("dali", images, view_count=2)
    source = data._source
    order, windows, _ = data.schedule(0)
    source.start(order, windows)
    assert sorted(source._reads) == list(range(dali_loader.READ_AHEAD))
    source()
    assert sorted(source._reads) == list(range(1, 1 + dali_loader.READ_AHEAD))
    data.close()


def test_threads_and_queue_depth_come_from_the_cores_per_process(monkeypatch):
    assert dali_loader.machine_threads(3) == (3, 2)  # --workers given: as asked
    monkeypatch.setattr(contract.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert dali_loader.machine_threads(None) == (15, 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes share the node's 16 cores
    assert dali_loader.machine_threads(None) == (3, 2)
    monkeypatch.setattr(contract.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert dali_loader.machine_threads(None) == (1, 2)


def test_a_loader_without_workers_uses_the_machines_count(images):
    data = dali_loader.DaliLoader(images, LoaderSpec("dali", 16, 8, torch.device("cpu"), workers=None))
    threads, depth = dali_loader.machine_threads(None)
    assert (data.workers, data._pipe.num_threads, data._pipe.prefetch_queue_depth) == (threads, threads, depth)
    assert len(next(iter(data.epoch(0))).labels) == 8
    data.close()


def test_mixed_decoder_settings_are_arguments_of_the_decoder():
    schema = backend.GetSchema("decoders__Image")
    for name in dali_loader.MIXED_DECODER:
        assert schema.HasArgument(name), name
