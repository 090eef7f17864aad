"""The reference backend: a plain torch DataLoader with PIL decode (JPEG, PNG, WebP), one decode per image for all
views."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.data import to_rgb
from pipeline.loader import Batch, Loader, to_batch


class _Views(Dataset):
    """Item p -> (views as uint8 HWC arrays: [original], crops...), label, index of the p-th scheduled sample.
    A pair sample's last crop comes from its second image, decoded once too."""

    def __init__(self, loader: Loader, order: np.ndarray, windows: np.ndarray | None, second: np.ndarray | None):
        self.paths, self.labels = loader.images.paths, loader.images.labels
        self.size, self.order, self.windows, self.original = loader.image_size, order, windows, loader.original
        self.second = order if second is None else second
        self.original_crop = loader.original_crop

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int):
        index = int(self.order[position])
        with Image.open(self.paths[index]) as file:
            image = to_rgb(file)
        size = (self.size, self.size)
        windows = [] if self.windows is None else list(self.windows[position])
        views = []
        if self.original:
            top, left, h, w = windows.pop(0) if self.original_crop else (0, 0, image.height, image.width)
            box = (int(left), int(top), int(left + w), int(top + h))
            views.append(np.array(image.resize(size, Image.BILINEAR, box=box)))
        if windows:
            sources = [image] * len(windows)
            if self.second[position] != index:
                with Image.open(self.paths[int(self.second[position])]) as file:
                    sources[-1] = to_rgb(file)
            for (top, left, h, w), source in zip(windows, sources):
                box = (int(left), int(top), int(left + w), int(top + h))
                views.append(np.array(source.resize(size, Image.BILINEAR, box=box)))
        return tuple(views), self.labels[index], index


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
        for views, labels, indices in data:
            yield to_batch(self, views, labels, indices)
