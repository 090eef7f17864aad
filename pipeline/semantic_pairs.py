"""SePP-ID's semantic positive pairs, the parts that need no model: the blockwise band search over cosine
similarities, the embedded fraction, the pairs' accuracy, and the reader of a pairs file for the loaders.

The pairs are mined by `python -m model.pairs` (model/pairs.py), which embeds the images with a checkpoint's
query encoder and writes them as int64 (P, 2) indices into the training split, with a JSON report beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


def band_pairs(embeddings: torch.Tensor, low: float, high: float, block: int = 1024) -> torch.Tensor:
    """Ordered pairs (P, 2) int64 (i, j), i != j, with low <= cos(e_i, e_j) <= high, sorted by (i, j), for
    L2-normalised embeddings (n, d); one (block, n) similarity block at a time."""
    found = []
    for start in tqdm(range(0, len(embeddings), block), desc="  similarities", leave=False, unit="block"):
        sim = embeddings[start : start + block].float() @ embeddings.float().t()
        rows, columns = torch.nonzero((sim >= low) & (sim <= high), as_tuple=True)
        rows = rows + start
        keep = rows != columns
        found.append(torch.stack([rows[keep], columns[keep]], dim=1).cpu())
    return torch.cat(found) if found else torch.zeros((0, 2), dtype=torch.int64)


def pair_accuracy(pairs: np.ndarray, labels: np.ndarray) -> float | None:
    """Fraction of pairs whose two images share a label (SePP-ID's Table 1 metric); None without pairs, or without
    labels (unlabelled images are all -1)."""
    if len(pairs) == 0 or (np.asarray(labels) < 0).any():
        return None
    return float(np.mean(labels[pairs[:, 0]] == labels[pairs[:, 1]]))


def sample_fraction(count: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random `fraction` of `count` images (at least two)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}")
    size = min(count, max(2, round(fraction * count)))
    return np.sort(np.random.default_rng([seed, 11]).choice(count, size=size, replace=False))


def read_pairs(path: str | Path, train_images: int) -> np.ndarray:
    """Pairs written by this module, checked against the training split they index: (P, 2) int64."""
    path = Path(path)
    try:
        pairs = np.load(path)
    except Exception as error:  # numpy raises several types for foreign files
        raise ValueError(f"cannot read {path} as a pairs .npy file: {error}") from error
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(f"{path} holds an array of shape {pairs.shape} ({pairs.dtype}), not (P, 2) integers")
    report = path.with_suffix(".json")
    if report.is_file():
        mined = json.loads(report.read_text()).get("train_images")
        if mined is not None and mined != train_images:
            raise ValueError(
                f"{path} indexes a training split of {mined} images, this run has {train_images}: "
                "mine the pairs with the same --data, --train-limit and --seed"
            )
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= train_images):
        raise ValueError(f"{path} has indices outside the {train_images} training images")
    return pairs.astype(np.int64)
