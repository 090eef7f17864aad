"""Mixed precision: the autocast context of a run, and `--amp auto`, which picks the precision from what the
hardware does rather than from a guess.

On CUDA bf16 where the GPU supports it, else fp16 with the gradient scaler. On a CPU bf16 is a win only where
the CPU computes it natively (AVX-512 BF16, AMX): elsewhere oneDNN emulates it and a ResNet step runs about 7x
slower than in fp32. So on a CPU `auto` times the model being trained, its stem and first stage at the training
resolution, forward + backward both ways, and keeps bf16 only when it is clearly faster (a stand-in network can
point the other way: at 32 px a standard-stem ResNet-18 was slower in bf16 on a CPU where the project's
small-stem one was 1.6x faster).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from model.backbone import resnet
from model.options import AMP_CHOICES  # noqa: F401 (--amp's choices: the scripts import them from here too)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 must beat fp32 by this factor on the probe: a tie is not worth bf16's coarser arithmetic.
BF16_MARGIN = 0.9
# The probe's largest image side: at 128 px a standard stem still leaves 32 x 32 maps for the first stage, and an
# emulated bf16 step of a 224 px ResNet-50 stage costs half a second of a core.
PROBE_MAX_SIZE = 128


def autocast(device: torch.device, amp: str):
    """torch.autocast for `amp` ("bf16", "fp16"; "off" = fp32) on the device's type."""
    dtype = DTYPES.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def probe_slice(backbone: nn.Module) -> nn.Module:
    """A copy of a torchvision ResNet's stem and first stage in training mode, with one batch-norm group (the
    probe's batch need not split): the probe's workload, which leaves the model's weights and statistics alone."""
    net = backbone
    part = copy.deepcopy(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)).cpu().float().train()
    for module in part.modules():
        if hasattr(module, "num_splits"):
            module.num_splits = 1
    return part.to(memory_format=torch.channels_last)


def time_precisions(net: nn.Module, image_size: int, budget_s: float = 0.3) -> tuple[float, float]:
    """CPU seconds of one forward + backward of `net`, fp32 and bf16 autocast, on one thread: the fastest of
    interleaved steps on 2 (32 / S)^2 images of S x S, at least one, channels_last (at 32 px one image is mostly
    overhead, and the ratio then understates what bf16 gains on a real batch).

    One thread and its own CPU time (not wall time) make the probe blind to other processes on the machine: a
    loaded machine slows both precisions' wall time unevenly, while whether bf16 runs natively or emulated is a
    property of each core. A first fp32 step builds oneDNN's primitives and is not counted (bf16's first step,
    which builds its own, loses to its second in the minimum). Steps alternate until `budget_s` of CPU time is
    spent, at least two of each; a ratio beyond 2x either way ends it after those two, so the emulated case,
    whose bf16 steps are the expensive ones, costs two of them.
    """

    def step(amp: str) -> float:
        started = time.thread_time()
        with autocast(x.device, amp):
            out = net(x)
        out.float().sum().backward()
        return time.thread_time() - started

    x = torch.randn(max(1, round(2 * (32 / image_size) ** 2)), 3, image_size, image_size)
    x = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step("off")
        times: dict[str, list[float]] = {"off": [], "bf16": []}
        spent = 0.0
        while True:
            for amp in times:
                times[amp].append(step(amp))
                spent += times[amp][-1]
            fp32, bf16 = min(times["off"]), min(times["bf16"])
            if len(times["off"]) >= 2 and (spent > budget_s or not 0.5 < bf16 / fp32 < 2) or len(times["off"]) >= 20:
                return fp32, bf16
    finally:
        torch.set_num_threads(threads)


def choose_amp(device: torch.device, arch: str, image_size: int, backbone: nn.Module | None = None) -> tuple[str, str]:
    """`--amp auto`: ("bf16" | "fp16" | "off", the reason in words) for `arch` trained at `image_size` here. A CPU
    probe times a copy of `backbone`'s first stage when given (else of a new `arch`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{name} computes bf16"
        return "fp16", f"{name} has no bf16: fp16 with the gradient scaler"
    if device.type != "cpu":
        return "off", f"no precision probe for {device.type}: fp32"
    capability = torch.backends.cpu.get_cpu_capability()
    started = time.perf_counter()
    backbone = resnet(arch, image_size)[0] if backbone is None else backbone
    size = min(image_size, PROBE_MAX_SIZE)
    fp32, bf16 = time_precisions(probe_slice(backbone), size)
    took = time.perf_counter() - started
    ratio = bf16 / fp32
    measured = f"a {took:.1f} s probe of the model's first stage at {size} px on this CPU ({capability})"
    if ratio < BF16_MARGIN:
        return "bf16", f"bf16 ran {1 / ratio:.1f}x as fast as fp32 in {measured}"
    if ratio < 1:
        return "off", f"bf16 ran only {1 / ratio:.2f}x as fast as fp32 in {measured}: fp32"
    emulated = " (no native bf16)" if ratio > 2 else ""
    return "off", f"bf16 ran {ratio:.1f}x slower than fp32 in {measured}{emulated}: fp32"


def amp_refusal(amp: str, device: str) -> str | None:
    """Why precision `amp` cannot run on `device` ("cpu", "cuda", "cuda:N"), for --amp's error; None when it can."""
    if amp == "fp16" and not device.startswith("cuda"):
        return "fp16 autocast needs CUDA; on a CPU use --amp auto, bf16 or off"
    return None


def resolve_amp(
    amp: str, device: torch.device, arch: str, image_size: int, backbone: nn.Module | None = None
) -> tuple[str, str | None]:
    """(precision, reason): `auto` decided by `choose_amp`; a forced precision is kept, with no reason."""
    if amp != "auto":
        return amp, None
    return choose_amp(device, arch, image_size, backbone)


def describe(amp: str, reason: str | None) -> str:
    """One line for the user: the precision and, when `auto` chose it, why."""
    name = {"bf16": "bf16 autocast", "fp16": "fp16 autocast + gradient scaler", "off": "fp32"}[amp]
    return f"precision: {name}" + (f" (--amp auto: {reason})" if reason else " (--amp)")
