"""Loader backends by name: the one module that knows them all.

A backend is one file here, pipeline/backends/<name>.py, with a subclass of the contract's `Loader`
(pipeline/loader.py) that applies the epoch's schedule; adding one is that file and one line in `CLASSES`.
DALI and FFCV are optional: a backend's file is imported only when that backend is asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import require_backend
from pipeline.data import ImageList, scan_split

if TYPE_CHECKING:  # torch: not imported for train.py's --help, which lists BACKENDS
    import numpy as np

    from pipeline.loader import BadFiles, Loader, LoaderSpec

# name -> the Loader subclass its file pipeline/backends/<name>.py defines
CLASSES = {"dali": "DaliLoader", "ffcv": "FfcvLoader", "torchvision": "TorchvisionLoader"}
BACKENDS = tuple(CLASSES)


def make_loader(
    spec: LoaderSpec, images: ImageList, pairs: np.ndarray | None = None, bad_files: BadFiles | None = None
) -> Loader:
    """The loader `spec` describes ("dali", "ffcv" or "torchvision" as `spec.backend`) over `images`, with
    `pairs` and the run's `bad_files` as `Loader`. BackendUnavailable when the backend's library (DALI, FFCV)
    cannot be imported here."""
    backend = spec.backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader {backend!r}; choose from {', '.join(BACKENDS)}")
    if images.beton is not None and backend != "ffcv":
        raise ValueError(f"{images.beton} is an FFCV .beton file, which only the ffcv loader reads")
    require_backend(backend)  # DALI and FFCV are optional: a one-line error saying how to install them
    module = importlib.import_module(f"{__name__}.{backend}")
    return getattr(module, CLASSES[backend])(images, spec, pairs, bad_files)


def load_splits(
    data: str | Path,
    backend: str,
    train_limit: int = 0,
    val_limit: int = 0,
    seed: int = 0,
    skip_bad: bool = False,
    labels: str = "auto",
) -> tuple[ImageList, ImageList | None]:
    """(train, val or None) for a loader backend. FFCV reads DATA/train.beton (+ DATA/val.beton) or one .beton
    file; the others read DATA/train/ (+ DATA/val/) when DATA has a train/ folder, else all of DATA as the
    training images (no val), each split as `scan_split` with `labels`. Errors say what to do instead (without
    FFCV installed, a .beton raises BackendUnavailable)."""
    data = Path(data)
    if backend == "ffcv":
        one_file = data.suffix == ".beton" or data.is_file()
        if not one_file and not (data / "train.beton").is_file():
            hint = f" (convert the folder first: python -m pipeline.convert {data} OUT_DIR)" if data.is_dir() else ""
            raise FileNotFoundError(f"{data}/train.beton not found{hint}")
        # FFCV is optional: imported only now that there is a .beton to read (BackendUnavailable otherwise).
        require_backend("ffcv")
        from pipeline.backends.ffcv import read_beton

        if one_file:
            return read_beton(data, train_limit, seed), None
        val = read_beton(data / "val.beton", val_limit, seed) if (data / "val.beton").is_file() else None
        return read_beton(data / "train.beton", train_limit, seed), val
    if data.suffix == ".beton" or (data / "train.beton").is_file() and not (data / "train").is_dir():
        raise ValueError(f"{data} holds FFCV .beton files, which only --loader ffcv reads")
    if not data.is_dir():
        raise FileNotFoundError(
            f"{data}/train not found: {data} is not a folder (--data takes a folder of images, flat or nested, "
            "or DATA/train/ with an optional DATA/val/)"
        )
    if not (data / "train").is_dir():  # one folder of images: all of it trains, nothing to validate on
        return scan_split(data, train_limit, seed, skip_bad, labels), None
    val = scan_split(data / "val", val_limit, seed, skip_bad, labels) if (data / "val").is_dir() else None
    return scan_split(data / "train", train_limit, seed, skip_bad, labels), val
