"""The reference backend: a plain torch DataLoader with PIL decode (JPEG, PNG, WebP), one decode per image for all
views.

A file PIL cannot decode does not raise in the worker: its sample comes back as zeros, flagged with the image and
the reason, and the batch raises `Undecodable` naming them (the loader serves it again without them)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.data import to_rgb
from pipeline.loader import Batch, Loader, Undecodable, to_batch


def _decode(path: str) -> Image.Image:
    with Image.open(path) as file:
        return to_rgb(file)


RESAMPLING = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}  # PIL's, antialiased when reducing


class _Views(Dataset):
    """Item p -> (views as uint8 HWC arrays: [original], crops...), label, index of the p-th scheduled sample, and
    the image that failed to decode with why (-1, "" when none did). A pair sample's last crop comes from its
    second image, decoded once too."""

    def __init__(self, loader: Loader, order: np.ndarray, windows: np.ndarray | None, second: np.ndarray | None):
        self.paths, self.labels = loader.images.paths, loader.images.labels
        self.size, self.order, self.windows, self.original = loader.image_size, order, windows, loader.original
        self.second = order if second is None else second
        self.original_crop = loader.original_crop
        self.resample = RESAMPLING[loader.interpolation]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int):
        index, second = int(self.order[position]), int(self.second[position])
        decoded = {}
        for each in dict.fromkeys((index, second)):
            try:
                decoded[each] = _decode(self.paths[each])
            except Exception as error:  # PIL raises several unrelated types for broken data
                whole = int(self.original and not self.original_crop)  # a cropped original has its window
                count = whole + (0 if self.windows is None else self.windows.shape[1])
                blank = np.zeros((self.size, self.size, 3), dtype=np.uint8)
                return (
                    (blank,) * count,
                    self.labels[index],
                    index,
                    each,
                    f"does not decode ({type(error).__name__}: {error})",
                )
        image = decoded[index]
        size = (self.size, self.size)
        windows = [] if self.windows is None else list(self.windows[position])
        views = []
        if self.original:
            top, left, h, w = windows.pop(0) if self.original_crop else (0, 0, image.height, image.width)
            box = (int(left), int(top), int(left + w), int(top + h))
            views.append(np.array(image.resize(size, self.resample, box=box)))
        if windows:
            sources = [image] * (len(windows) - 1) + [decoded[second]]
            for (top, left, h, w), source in zip(windows, sources):
                box = (int(left), int(top), int(left + w), int(top + h))
                views.append(np.array(source.resize(size, self.resample, box=box)))
        return tuple(views), self.labels[index], index, -1, ""


class TorchvisionLoader(Loader):
    def _batches(self, order: np.ndarray, windows: np.ndarray | None, second: np.ndarray | None) -> Iterator[Batch]:
        # A fresh DataLoader per epoch: workers fork with this epoch's schedule.
        data = DataLoader(
            _Views(self, order, windows, second),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.worker_count,
            pin_memory=self.device.type == "cuda",
        )
        for views, labels, indices, failed, reasons in data:
            failed = failed.numpy()  # host data: checked in numpy, no tensor op a sync counter would see
            if (failed >= 0).any():
                raise Undecodable({int(i): r for i, r in zip(failed, reasons) if i >= 0})
            yield to_batch(self, views, labels, indices)
