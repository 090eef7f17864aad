"""Files -> batches on the training device: one batch contract for every loader backend."""

from __future__ import annotations

import importlib

import click

# No torch at import: the scripts' --help and one-line refusals import this package (train.py's choices).

# The optional libraries behind two backends (torchvision's needs nothing more), and how to install each.
BACKEND_LIBRARIES = {"ffcv": ("ffcv", "FFCV"), "dali": ("nvidia.dali", "NVIDIA DALI")}
INSTALL = {
    "ffcv": "pip install ffcv==1.0.2 (after the apt packages setup.sh installs: g++ pkg-config libopencv-dev "
    "libturbojpeg0-dev)",
    "dali": "pip install nvidia-dali-cuda130==2.4.0 (the CUDA 13 build, as torch's)",
}


class BackendUnavailable(click.ClickException):
    """A loader backend whose library cannot be imported here; the one-line message says how to install it."""


def missing_backend(backend: str) -> str | None:
    """None when `backend`'s library imports here (or it needs none); otherwise a one-line message naming
    the import error and how to install the library."""
    if backend not in BACKEND_LIBRARIES:
        return None
    import torch

    module, name = BACKEND_LIBRARIES[backend]
    # Importing FFCV sets torch to one thread (ffcv.pipeline.compiler calls torch.set_num_threads(1)), which
    # halves a CPU training step on two cores: everything here imports FFCV through this first, and it restores
    # the count (pipeline.backends.ffcv too, for a direct import).
    threads = torch.get_num_threads()
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as error:  # OSError: a compiled part that fails to load its shared libraries
        cause = str(error).splitlines()[0] if str(error) else ""
        return (
            f"{name} (--loader {backend}) cannot be imported here ({type(error).__name__}: {cause}); "
            f"install it with: {INSTALL[backend]}"
        )
    finally:
        torch.set_num_threads(threads)  # FFCV's import sets one thread
    return None


def require_backend(backend: str) -> None:
    """Raise BackendUnavailable (a one-line click error) when `backend`'s library cannot be imported here."""
    message = missing_backend(backend)
    if message is not None:
        raise BackendUnavailable(message)
