"""ContrastiveCrop's boxes as a run gets them: the reference localisation pass, or LeOCLR's training forward
(--ccrop-boxes forward)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from model.config import Config
from model.distributed import sum_arrays
from model.localize import ForwardBoxes, localize
from model.precision import autocast
from pipeline.ccrop import forward_refresh_start
from run.stop import StopSignals, stoppable_passes


def forward_boxes(
    cfg: Config, count: int, device: torch.device, box_updates: list[int], resume: dict | None
) -> ForwardBoxes | None:
    """--ccrop-boxes forward: the `count` images' boxes on `device`, refreshed by the steps of the epochs from
    `forward_refresh_start` on (the checkpoint's when resuming); None otherwise (the reference pass)."""
    if cfg.method.crop != "ccrop" or cfg.method.ccrop_boxes != "forward":
        return None
    state = None if resume is None else resume.get("forward_boxes")
    start = forward_refresh_start(box_updates)
    return ForwardBoxes(count, cfg.data.image_size, cfg.method.ccrop_k, device, start, state)


def box_pass(model, loader, cfg: Config, device: torch.device, signals: StopSignals | None = None) -> np.ndarray:
    """ContrastiveCrop's reference localisation pass: every training image's box (N, 4) float32 from the query
    encoder, each rank boxing its part of the images (zeros elsewhere: the sum over ranks is every box).
    `signals` as `knn_monitor`."""
    context = partial(autocast, device, cfg.optimisation.amp)
    [boxes] = stoppable_passes(
        signals, device, lambda stop: localize(model.query_encoder, loader, cfg.method.ccrop_k, context, stop)
    )
    return sum_arrays(boxes)
