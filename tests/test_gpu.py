"""What only a CUDA device can check: DALI's GPU decode and resize against its CPU ones (each against the bound
its documentation supports), the loaders' batches on CUDA, the batched augmentation on CUDA against the CPU
path, a training run on CUDA, and a SIGTERM + mid-epoch resume on CUDA. Every test is marked `gpu` (skipped,
with the reason, where torch sees no CUDA device)."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN, signalled_after_first_epoch, tiny_loader
from PIL import Image

import train
from pipeline.augment import IMAGENET_STD, AugmentConfig, AugmentDraw, apply, apply_cpu, draw
from pipeline.backends import load_splits, make_loader
from pipeline.crop_plan import crop_plan
from pipeline.data import scan_split
from pipeline.loader import LoaderSpec

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")

# nvJPEG (DALI's "mixed" decoder) and libjpeg-turbo (its "cpu" one) upsample subsampled chroma differently:
# libjpeg-turbo's "fancy" (triangular) filter is nvJPEG's only with `jpeg_fancy_upsampling` ("Make the mixed
# backend use the same chroma upsampling approach as the cpu one", docs.nvidia.com/deeplearning/dali/user-guide/
# docs/operations/nvidia.dali.fn.decoders.image.html; NVIDIA/DALI#3610). DALI's own suite bounds the per-image
# mean |cpu - mixed| of JPEG decodes by 4 levels, and by 1 with fancy upsampling on
# (dali/test/python/decoder/test_image.py: test_image_decoder_consistency, test_fancy_upsampling). Without
# chroma subsampling (4:4:4) only the IDCTs differ: the fancy-upsampling bound applies to the default decoder.
DECODE_MEAN_TOLERANCE, MATCHED_DECODE_MEAN_TOLERANCE = 4.0, 1.0
# DALI checks its cpu and its gpu fn.resize each against PIL: mean |difference| <= 0.4 and max <= 10 away from
# the border (dali/test/python/operator_2/test_resize.py, _test_ND): so <= 0.8 and <= 20 between the two.
RESIZE_MEAN_TOLERANCE, RESIZE_MAX_TOLERANCE = 0.8, 20
# The loader on CUDA decodes with nvJPEG and resizes on the GPU: both differences at once.
LOADER_MEAN_TOLERANCE = DECODE_MEAN_TOLERANCE + RESIZE_MEAN_TOLERANCE
SIZE = 32


def write_photo_like(folder: Path, count: int = 8, subsampling: int = 2, seed: int = 0) -> list[str]:
    """Smooth 96 x 128 JPEGs (colour gradients, soft blobs, mild noise; quality 90): the decoders' documented
    bounds were measured on photographs, not per-pixel noise. subsampling: PIL's 0 = 4:4:4, 2 = 4:2:0."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    paths = []
    for i in range(count):
        image = rng.uniform(60, 140, size=3) + (x / 128)[..., None] * rng.uniform(-40, 40, size=3)
        image = image + (y / 96)[..., None] * rng.uniform(-40, 40, size=3)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 96), rng.uniform(0, 128), rng.uniform(8, 30)
            image = image + np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-60, 60, 3)
        image = image + rng.normal(0, 3, size=image.shape)
        paths.append(str(folder / f"{i:03d}.jpg"))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90, subsampling=subsampling)
    return paths


def dali_run(pipeline) -> list[list[np.ndarray]]:
    """Each output of one run of a DALI pipeline, as a list of HWC numpy arrays."""
    pipeline.build()
    outputs = [out.as_cpu() if hasattr(out, "as_cpu") else out for out in pipeline.run()]
    return [[np.array(out.at(i)) for i in range(len(out))] for out in outputs]


def dali_decodes(paths: list[str], device: str, fancy: bool = False) -> list[np.ndarray]:
    """The files decoded by DALI on "cpu" (libjpeg-turbo) or "mixed" (nvJPEG), as the loader decodes them."""
    from nvidia.dali import fn, pipeline_def, types

    batch = [np.fromfile(path, dtype=np.uint8) for path in paths]

    @pipeline_def(
        batch_size=len(paths), num_threads=1, device_id=0 if device != "cpu" else None, prefetch_queue_depth=1
    )
    def decode():
        jpegs = fn.external_source(source=[batch], cycle=True)
        return fn.decoders.image(
            jpegs, device=device, output_type=types.RGB, adjust_orientation=False, jpeg_fancy_upsampling=fancy
        )

    return dali_run(decode())[0]


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def test_dali_gpu_decode_matches_cpu_decode(tmp_path):
    import nvidia.dali.backend

    subsampled = write_photo_like(tmp_path / "420", subsampling=2)
    full_chroma = write_photo_like(tmp_path / "444", subsampling=0, seed=1)
    for paths, tolerance in ((subsampled, DECODE_MEAN_TOLERANCE), (full_chroma, MATCHED_DECODE_MEAN_TOLERANCE)):
        for cpu, gpu in zip(dali_decodes(paths, "cpu"), dali_decodes(paths, "mixed"), strict=True):
            assert mean_difference(cpu, gpu) <= tolerance
    if nvidia.dali.backend.GetNvjpegVersion() >= 12010:  # nvJPEG's fancy upsampling came with CUDA 12.1
        for cpu, gpu in zip(dali_decodes(subsampled, "cpu"), dali_decodes(subsampled, "mixed", fancy=True)):
            assert mean_difference(cpu, gpu) <= MATCHED_DECODE_MEAN_TOLERANCE


def dali_resizes(paths: list[str], windows: np.ndarray, device: str) -> list[np.ndarray]:
    """Each file decoded on the CPU, then its window (top, left, h, w) resized to SIZE x SIZE on `device`
    ("cpu" or "gpu") with pipeline/backends/dali.py's resize: linear, antialiased, an absolute ROI."""
    from nvidia.dali import fn, pipeline_def, types

    batch = [np.fromfile(path, dtype=np.uint8) for path in paths]
    starts = [w[:2].astype(np.float32) for w in windows]
    ends = [(w[:2] + w[2:]).astype(np.float32) for w in windows]

    @pipeline_def(
        batch_size=len(paths), num_threads=1, device_id=0 if device != "cpu" else None, prefetch_queue_depth=1
    )
    def resize():
        jpegs = fn.external_source(source=[batch], cycle=True)
        start, end = fn.external_source(source=[starts], cycle=True), fn.external_source(source=[ends], cycle=True)
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, adjust_orientation=False)
        images = images.gpu() if device == "gpu" else images
        return fn.resize(
            images,
            size=[SIZE, SIZE],
            interp_type=types.INTERP_LINEAR,
            antialias=True,
            roi_start=start,
            roi_end=end,
            roi_relative=False,
        )

    return dali_run(resize())[0]


def test_dali_gpu_resize_matches_cpu_resize(tmp_path):
    paths = write_photo_like(tmp_path / "photos", count=8)
    windows = crop_plan(np.full(8, 96), np.full(8, 128), seed=0, epoch=0)[:, 0]  # RandomResizedCrop windows
    for cpu, gpu in zip(dali_resizes(paths, windows, "cpu"), dali_resizes(paths, windows, "gpu"), strict=True):
        interior = (slice(1, -1), slice(1, -1))  # as DALI's test: border taps are placed differently
        difference = np.abs(cpu[interior].astype(np.int32) - gpu[interior].astype(np.int32))
        assert difference.mean() <= RESIZE_MEAN_TOLERANCE and difference.max() <= RESIZE_MAX_TOLERANCE


def test_dali_mixed_loader_batches_on_cuda(tmp_path):
    for label in range(2):  # photo-like images: on per-pixel noise nvJPEG's chroma differs by ~3.5 levels alone
        write_photo_like(tmp_path / "train" / f"class{label}", seed=label)
    images = scan_split(tmp_path / "train")
    gpu = make_loader(LoaderSpec("dali", SIZE, 8, CUDA, train=True, workers=1), images)
    cpu = tiny_loader("dali", images, size=SIZE)
    for a, b in zip(gpu.epoch(0), cpu.epoch(0), strict=True):
        assert torch.equal(a.indices.cpu(), b.indices) and torch.equal(a.labels.cpu(), b.labels)
        for view_a, view_b in zip(a[:3], b[:3]):
            assert view_a.device.type == "cuda" and view_a.dtype == torch.uint8 and view_a.shape == (8, 3, SIZE, SIZE)
            assert view_a.is_contiguous(memory_format=torch.channels_last)
            assert (view_a.cpu().int() - view_b.int()).abs().float().mean() <= LOADER_MEAN_TOLERANCE
    gpu.close()


@pytest.mark.ffcv
def test_ffcv_batches_to_cuda_are_the_cpu_batches(tiny_beton):
    images = load_splits(tiny_beton, "ffcv")[0]
    gpu = make_loader(LoaderSpec("ffcv", 16, 8, CUDA, train=True, workers=1), images)
    cpu = tiny_loader("ffcv", images)
    for epoch in (0, 1):  # FFCV reuses its CUDA buffers: the second epoch checks nothing was overwritten
        batches = list(gpu.epoch(epoch))
        for a, b in zip(batches, cpu.epoch(epoch), strict=True):
            assert torch.equal(a.indices.cpu(), b.indices)
            for view_a, view_b in zip(a[:3], b[:3]):
                assert view_a.device.type == "cuda" and view_a.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(view_a.cpu(), view_b)  # the same CPU decode, copied to the device
    gpu.close()


def test_batched_augmentation_on_cuda_matches_the_cpu_path(monkeypatch):
    # cuDNN's convolutions (the blur) may use TF32 (10-bit mantissa): off, to compare float32 with float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = torch.randint(0, 256, (24, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    x = x.permute(0, 3, 1, 2)  # channels_last, as loaders give them
    params = draw(24, 32, AugmentConfig(blur_p=0.7), torch.Generator().manual_seed(4))
    assert (params.sigma > 0).any() and params.flip.any() and not params.flip.all()
    on_cuda = apply(x.to(CUDA), AugmentDraw(**{f.name: getattr(params, f.name).to(CUDA) for f in fields(params)}))
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.float32
    assert on_cuda.is_contiguous(memory_format=torch.channels_last)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # The CPU path rounds to uint8 after the colour map and after the blur (pipeline/augment.py): within 1.5
    # levels, 0.5 on average, as tests/test_augment.py bounds it against the batched path on the CPU.
    error = (on_cuda.cpu() - apply_cpu(x, params)).abs() * std
    assert error.max() <= 1.5 / 255 and error.mean() <= 0.5 / 255


CUDA_DALI = [*TINY_TRAIN, *"--loader dali --workers 1 --device cuda".split()]  # tiny runs on the GPU


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_on_cuda(tiny_data, tmp_path, amp):
    out = tmp_path / "run"
    args = [*CUDA_DALI, "--amp", amp, "--data", tiny_data, "--out", out, "--epochs", 2]
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "device cuda" in result.output and "float16 on cuda" in result.output  # the kNN bank on the GPU
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2] and all(0 <= r["knn_top1"] <= 1 for r in records)
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records[1:])
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["config"]["device"] == "cuda" and state["epoch"] == 2


def test_sigterm_mid_epoch_then_resume_on_cuda(tmp_path):
    from conftest import write_tiny_dataset

    data, run = write_tiny_dataset(tmp_path / "data", per_class=40), tmp_path / "run"  # 15 steps per epoch
    args = [*CUDA_DALI, "--method", "mocov2", "--data", data, "--out", run, "--epochs", 4, "--val-limit", 6]
    done = signalled_after_first_epoch([sys.executable, "train.py", *args], run, signal.SIGTERM)
    out, err = done.stdout, done.stderr
    assert done.returncode == 128 + signal.SIGTERM and "SIGTERM: checkpoint written" in err, out + err
    assert "Traceback" not in out + err
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    # A CUDA generator's state is a CPU ByteTensor (torch takes nothing else to restore it).
    assert state["step"] > 0 and state["generators"].device.type == "cpu" and state["generators"].dtype == torch.uint8
    done = subprocess.run(
        [sys.executable, "train.py", "--resume", str(run / "checkpoint.pt")],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed after epoch {state['epoch']}, step {state['step']}" in done.stdout
    final = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert final["epoch"] == 4 and "step" not in final
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3, 4]
