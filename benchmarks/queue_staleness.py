"""Why a run's training loss rises again as the cosine lr nears zero: the loss against the run's own queue (keys
made by the key encoder over the last K / keys-per-step steps) beside the loss of the same queries and
positives against a freshly built queue (K keys of other images' training crops from the current key encoder):

    python -m benchmarks.queue_staleness --epochs 30 --json runs/staleness.json   # the default run, 30 epochs
    python -m benchmarks.queue_staleness --epochs 12 --method mocov2

It trains as train.py does with the same options (same seed: the same epoch losses as train.py's
metrics.jsonl) and after every epoch scores a fixed probe set of training batches (augmented once, the same
every epoch) both ways, with the model's state (both encoders, BN statistics, queue) restored after. While the
lr is high the query encoder moves away from the keys in the queue, which makes its negatives easier than a
fresh queue's (own < fresh); as the lr goes to zero the queue catches up with the encoder and the gap closes:
the loss against the own queue rises toward the fresh-queue loss while the fresh-queue loss (and the kNN)
stays flat: the rise is the negatives getting fresher, not the features getting worse.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import click
import torch

from model.config import Config, inherited, option, resolve
from model.methods import method_for
from model.precision import autocast
from pipeline.backends import load_splits
from run.parts import augment_config, build_model, make_loaders, optimizer_and_scaler, settle_amp
from run.state import augmentation_seed
from run.step import augment_views, learning_rate, training_step

PROBE_EPOCH, FRESH_EPOCH = 1_000_000, 2_000_000  # loader epochs no training run reaches: their own orders and crops


@torch.no_grad()
def probe_losses(model, method, cfg: Config, probes: list[dict], fresh: torch.Tensor) -> tuple[float, float]:
    """The method's loss (as training computes it: train-mode BN, the key shuffle, --loss-terms) on the probe
    views against the model's own queue and against `fresh` (K, D); the model's state is restored after."""
    saved = copy.deepcopy(model.state_dict())
    losses = []
    for queue in (model.queue.clone(), fresh):
        total = 0.0
        for i, views in enumerate(probes):
            model.load_state_dict(saved)
            model.queue.copy_(queue)
            generator = torch.Generator(device=queue.device).manual_seed(i)  # the same key shuffle both ways
            with autocast(queue.device, cfg.optimisation.amp):
                loss, _ = method.step(model, views, cfg.method.temperature, generator)
            total += loss.item() / (method.terms if cfg.method.loss_terms == "mean" else 1)
        losses.append(total / len(probes))
    model.load_state_dict(saved)
    return losses[0], losses[1]


@torch.no_grad()
def fresh_queue(model, method, loader, cfg: Config, epoch: int, probe_ids: torch.Tensor) -> torch.Tensor:
    """K keys (K, D) from the current key encoder, of the crops the method enqueues, from other training
    batches (as a queue that had been filled by a key encoder that stopped moving). The probe images' own
    crops are left out: a run's queue holds none of an image's keys when its K is under an epoch's keys, and
    a crop of the query's own image among the negatives would make the fresh queue harder for that reason."""
    size = model.queue.shape[0]
    generator = torch.Generator(device=model.queue.device).manual_seed(FRESH_EPOCH + epoch)
    aug, keys, count = augment_config(cfg), [], 0
    saved = copy.deepcopy(model.key_encoder.state_dict())  # train-mode BN moves its statistics
    passes = (loader.epoch(FRESH_EPOCH + 100 * epoch + again) for again in range(100))  # more crops if need be
    for batch in (batch for one in passes for batch in one):
        views, _ = augment_views(batch, method, aug, generator)
        crops = [views["crop1"], views["crop2"]] if "original" in method.views else [views["crop2"]]
        with autocast(model.queue.device, cfg.optimisation.amp):
            made = model.encode_keys(torch.cat(crops), generator).float()  # the whole batch: BN as in training
        made = made[~torch.isin(batch.indices.to(probe_ids.device), probe_ids).repeat(len(crops)).to(made.device)]
        keys.append(made)
        count += len(made)
        if count >= size:
            break
    model.key_encoder.load_state_dict(saved)
    return torch.cat(keys)[:size].to(model.queue.dtype)


def run(cfg: Config, probe_batches: int, echo) -> list[dict]:
    """Train `cfg` as train.py does; after each epoch its loss, lr and the probe set's own- and fresh-queue loss."""
    device = torch.device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    method = method_for(cfg.method.method, cfg.method.symmetric, cfg.method.attract_all)
    train_images, _ = load_splits(cfg.data.data, cfg.data.loader, cfg.data.train_limit, 0, cfg.run.seed)
    loaders = make_loaders(cfg, method, None, train_images, None, device)
    loader = loaders.train
    model = build_model(cfg, device)
    settle_amp(cfg, device, model.query_encoder.backbone)
    optimizer, scaler = optimizer_and_scaler(cfg, model, device)
    aug = augment_config(cfg)
    probe_generator = torch.Generator(device=device).manual_seed(PROBE_EPOCH)
    probes, probe_ids = [], []
    for batch in loader.epoch(PROBE_EPOCH):
        probes.append(augment_views(batch, method, aug, probe_generator)[0])
        probe_ids.append(batch.indices.cpu())
        if len(probes) == probe_batches:
            break
    probe_ids = torch.cat(probe_ids)
    records = []
    epochs = cfg.optimisation.epochs
    for epoch in range(epochs):
        generator = torch.Generator(device=device).manual_seed(augmentation_seed(cfg.run.seed, epoch, 0))
        model.train()
        total, seen = 0.0, 0
        for step, batch in enumerate(loader.epoch(epoch)):
            lr = learning_rate(cfg, epoch, (step + 1) / len(loader))
            for group in optimizer.param_groups:
                group["lr"] = lr
            views, _ = augment_views(batch, method, aug, generator)
            loss = training_step(model, method, optimizer, scaler, views, cfg, generator)
            total += loss.item() * len(batch.labels)
            seen += len(batch.labels)
        own, fresh = probe_losses(model, method, cfg, probes, fresh_queue(model, method, loader, cfg, epoch, probe_ids))
        record = dict(epoch=epoch + 1, lr=lr, loss=total / seen, own_queue=own, fresh_queue=fresh, gap=fresh - own)
        records.append(record)
        echo(
            f"epoch {epoch + 1:3d}/{epochs}: lr {lr:.4f}, training loss {record['loss']:.4f}; probe loss against "
            f"its own queue {own:.4f}, a fresh queue {fresh:.4f} (gap {fresh - own:+.4f})"
        )
    loaders.close()
    return records


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@option("data", help="As train.py --data.")
@option("loader", help=None)
@option("method", help="A momentum-encoder method of train.py (leoclr, mocov2, ...).")
@option("epochs", default=30)
@inherited("lr", source="train.py's")
@inherited("loss_terms", source="train.py's")
@inherited("moco_momentum", source="train.py's")
@inherited("queue_size", source="train.py's")
@inherited("image_size", source="train.py's")
@inherited("train_limit", source="train.py's")
@inherited("batch_size", source="train.py's")
@inherited("bn_splits", source="train.py's")
@option("amp", type=click.Choice(["auto", "bf16", "off"]), help=None)
@option("workers", help=None)
@option("seed")
@click.option("--probe-batches", type=click.IntRange(min=1), default=4, help="Training batches in the probe set.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(probe_batches: int, json_out: Path | None, **options) -> None:
    """Train as train.py (its defaults, these options changed) and print per epoch the probe set's loss against
    the run's own queue and against a fresh one."""
    given = {k: v for k, v in options.items() if v is not None}
    cfg = resolve({**Config().to_dict(), "tensorboard": False, **given})
    if method_for(cfg.method.method).end_to_end:
        raise click.ClickException(f"--method {cfg.method.method} keeps no queue")
    records = run(cfg, probe_batches, click.echo)
    late = [r for r in records if r["epoch"] > math.ceil(0.8 * len(records))]
    if late:
        rise = late[-1]["own_queue"] - min(r["own_queue"] for r in records)
        click.echo(f"own-queue loss {rise:+.4f} above its lowest by the end; the gap to a fresh queue closes to "
                   f"{late[-1]['gap']:+.4f} (largest {max(r['gap'] for r in records):+.4f})")  # fmt: skip
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"config": cfg.to_dict(), "epochs": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
