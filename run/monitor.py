"""The kNN monitor of a run: weighted kNN top-1 of the query backbone (and of raw pixels) on the bank and
val loaders, when it is due, and `Monitor`, the run's monitor with what it says (its bank, its cost, the
raw-pixel and random-network scores beside it)."""

from __future__ import annotations

from functools import partial

import torch

from model.config import Config
from model.distributed import gather_to_main
from model.evaluation import extract_features, pixel_features
from model.knn import knn_top1
from run.clock import RunClock, duration
from run.stop import StopSignals, stoppable_passes

KNN_COST_SAID = 60.0  # seconds: the kNN monitor's passes of a run said when they add up to this much


def knn_monitor(model, bank_loader, val_loader, cfg: Config, signals: StopSignals | None = None) -> float | None:
    """Weighted kNN top-1 of the query backbone: the bank subset's features vote for each val image. Computed on
    rank 0 (None on the others, and without a val split); on CUDA the bank is unit-length float16. With `signals`
    a stop signal cuts the passes short: `Stopped` on every rank (`stoppable_passes`)."""
    if val_loader is None:
        return None
    net = model.query_encoder.backbone
    half = bank_loader.device.type == "cuda"  # CPU matmuls in float16 are slow: float32 there, as before
    embed = partial(
        extract_features,
        net,
        amp=cfg.optimisation.amp,
        dtype=torch.float16 if half else torch.float32,
        l2_normalize=half,
    )
    bank, val = stoppable_passes(
        signals,
        bank_loader.device,
        lambda stop: embed(bank_loader, desc="kNN bank", stop=stop),
        lambda stop: embed(val_loader, desc="kNN val", stop=stop),
    )
    # Each rank embeds its part of the files; gathered in rank order on rank 0 they are the files in order.
    (bank, bank_labels), (val, val_labels) = map(gather_to_main, bank), map(gather_to_main, val)
    if bank is None:
        return None
    classes = len(bank_loader.images.classes)
    return knn_top1(bank, bank_labels, val, val_labels, classes, cfg.run.knn_k, cfg.run.knn_temperature)


def pixel_knn(bank_loader, val_loader, cfg: Config, signals: StopSignals | None = None) -> float | None:
    """The kNN monitor's score (its k, T, bank and queries) of raw pixels (`pixel_features`): what the trained
    features are measured against. On rank 0 (None on the others, and without a val split). `signals` as
    `knn_monitor`."""
    if val_loader is None:
        return None
    bank, val = stoppable_passes(
        signals,
        bank_loader.device,
        lambda stop: pixel_features(bank_loader, stop=stop),
        lambda stop: pixel_features(val_loader, stop=stop),
    )
    (bank, bank_labels), (val, val_labels) = map(gather_to_main, bank), map(gather_to_main, val)
    if bank is None:
        return None
    classes = len(bank_loader.images.classes)
    return knn_top1(bank, bank_labels, val, val_labels, classes, cfg.run.knn_k, cfg.run.knn_temperature)


def knn_due(cfg: Config, epoch: int) -> bool:
    """Whether the kNN monitor runs after `epoch` epochs (0 = before training): every --knn-every, and the last."""
    return epoch % cfg.run.knn_every == 0 or epoch == cfg.optimisation.epochs


def describe_monitor(
    cfg: Config, loaders, device: torch.device, train_images, bank_images, val_images, knn_off: str
) -> str:
    """The line saying what the kNN monitor reads (its bank, where from, its precision, when it runs, its
    queries), or why it is off."""
    if not val_images:
        return f"kNN monitor off: {knn_off}"
    source, pool = ("training", train_images) if bank_images is None else (f"{cfg.data.val_data} train", bank_images)
    return (
        f"kNN monitor: a bank of {len(loaders.bank.images)} of the {len(pool)} {source} "
        f"images (--knn-bank), {'float16' if device.type == 'cuda' else 'float32'} on {device}, after every "
        f"{cfg.run.knn_every} epoch(s) and the last; {len(val_images)} val images as queries"
    )


class Monitor:
    """The run's kNN monitor over `loaders` (bank and val; off without val): `monitor(epoch)` scores the query
    backbone when --knn-every makes it due (timed on `clock` for the run's estimate; `bad_files` shared after
    its passes), `measure_pixels` scores raw pixels once, and it says what it costs where that is large and,
    beside its scores, the raw pixels' and the random network's (epoch 0). A stop signal cuts its passes short:
    `Stopped` on every rank."""

    def __init__(self, cfg: Config, model, loaders, clock: RunClock, bad_files, signals: StopSignals, echo) -> None:
        self.cfg, self.model, self.bank, self.val = cfg, model, loaders.bank, loaders.val
        self.clock, self.bad_files, self.signals, self.echo = clock, bad_files, signals, echo
        self.pixels: float | None = None  # raw pixels' top-1 (rank 0; None without a val split)
        self.random_network: float | None = None  # epoch 0's top-1, the network before training (rank 0)

    def __call__(self, epoch: int) -> float | None:
        """kNN top-1 after `epoch` epochs when --knn-every makes it due then, else None."""
        if not knn_due(self.cfg, epoch):
            return None
        first = self.clock.knn_s is None
        with self.clock.timing_knn():
            knn = knn_monitor(self.model, self.bank, self.val, self.cfg, self.signals)
        self.bad_files.share()  # what its passes found (every rank calls the monitor)
        passes = sum(knn_due(self.cfg, e) for e in range(epoch, self.cfg.optimisation.epochs + 1))
        if first and self.clock.knn_s * passes >= KNN_COST_SAID:  # the monitor's cost, where it is large
            images = f"{len(self.bank.images)} bank + {len(self.val.images)} query images"
            self.echo(
                f"  kNN monitor: {duration(self.clock.knn_s)} a pass ({images}), {passes} passes in this run: about "
                f"{duration(self.clock.knn_s * passes)}; --knn-every, --knn-bank or --val-limit spend less"
            )
        return knn

    def measure_pixels(self) -> None:
        """Raw pixels' score, once: what "learning" is measured against."""
        self.pixels = pixel_knn(self.bank, self.val, self.cfg, self.signals)

    def say_beside(self, random_network: float | None) -> None:
        """After epoch 0's line: raw pixels' and the random network's (`random_network`, epoch 0) top-1."""
        self.random_network = random_network
        if self.pixels is not None:
            self.echo(
                f"  beside it, on the same bank and queries: raw pixels {100 * self.pixels:.2f}%, the random network "
                f"{self._random()} (epoch 0)"
            )

    def say_final(self, history: list[dict]) -> None:
        """After the last epoch: its top-1 against raw pixels' and the random network's."""
        if self.pixels is None or not history or history[-1]["knn_top1"] is None:
            return
        epochs, final = self.cfg.optimisation.epochs, history[-1]["knn_top1"]
        gain = final - self.pixels
        against = "level with" if gain == 0 else f"{100 * abs(gain):.2f} points {'above' if gain > 0 else 'below'}"
        self.echo(
            f"kNN top-1 {100 * final:.2f}% after {epochs} epoch{'s' * (epochs != 1)}: {against} "
            f"raw pixels ({100 * self.pixels:.2f}%); the random network {self._random()}"
        )

    def _random(self) -> str:
        return "n/a" if self.random_network is None else f"{100 * self.random_network:.2f}%"
