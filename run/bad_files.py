"""Files found undecodable during a run (RUN_DIR/bad_files.txt, shared over the ranks) and --verify's full
decode before training."""

from __future__ import annotations

from pathlib import Path

import click

from model.config import Config
from model.distributed import gather_objects
from pipeline.data import ImageList, select
from pipeline.loader import BadFiles, machine_workers
from pipeline.verify import cache_file, verify


class BadFileLog:
    """The run's files found undecodable mid-run (`files`, shared by its loaders). `share` makes them the same on
    every rank and has rank 0 append the new ones to RUN_DIR/bad_files.txt, one line each: the path, a tab, the
    reason. Checkpoints hold them; a resumed run starts with the checkpoint's and the file's (a fresh run in
    the same folder starts a new file)."""

    NAME = "bad_files.txt"

    def __init__(self, out: Path, resume: dict | None, main_rank: bool) -> None:
        self.path, self.main_rank = out / self.NAME, main_rank
        listed = []
        if resume is not None and self.path.exists():
            listed = [tuple(line.rsplit("\t", 1)) for line in self.path.read_text().splitlines() if "\t" in line]
        elif resume is None and main_rank:
            self.path.unlink(missing_ok=True)
        self.written = {path for path, _ in listed}
        self.files = BadFiles([*(tuple(entry) for entry in (resume or {}).get("bad_files", [])), *listed])

    def share(self) -> None:
        """Every rank's new finds to every rank (one all-gather of objects; none with one process) and the file
        brought up to date. A collective: every rank calls it at the same point."""
        for found in gather_objects(self.files.take_pending()):
            for path, reason in found:
                self.files.add(path, reason, found_here=False)
        new = [(path, reason) for path, reason in self.files.reasons.items() if path not in self.written]
        if self.main_rank and new:
            with self.path.open("a") as file:
                file.writelines(f"{path}\t{reason}\n" for path, reason in new)
        self.written.update(path for path, _ in new)

    def entries(self) -> list[tuple[str, str]]:
        return list(self.files.reasons.items())


def verify_splits(
    cfg: Config, splits: tuple[ImageList, ImageList | None], rank: int = 0, world: int = 1, echo=click.echo
) -> tuple[ImageList, ImageList | None]:
    """--verify: every image of the folder splits fully decoded before training (`pipeline.verify.verify`, its
    cache, the ranks sharing the work); files that fail stop the run with their list, or with --skip-bad are
    left out and listed on stderr. A .beton was decoded by the converter when it was written: nothing to do."""
    verified = []
    for name, images in zip(("train", "val"), splits):
        if images is None or images.beton is not None:
            if images is not None:
                echo(f"--verify: {images.beton} was fully decoded when pipeline.convert wrote it")
            verified.append(images)
            continue
        workers = cfg.data.workers or machine_workers()
        file = cache_file(images.paths)
        bad, decoded = verify(images.paths, workers, file, rank, world, gather_objects)
        echo(f"verify {name}: {decoded} of {len(images)} images decoded, the others known from {file}")
        if bad and not cfg.data.skip_bad:
            listed = "\n".join(f"  {path}: {reason}" for path, reason in bad.items())
            raise click.ClickException(
                f"{len(bad)} of {len(images)} {name} images do not decode (nothing was trained; --skip-bad leaves "
                f"them out):\n{listed}"
            )
        for path, reason in bad.items():
            echo(f"skipped {path}: {reason}", err=True)
        keep = [i for i, path in enumerate(images.paths) if path not in bad]
        verified.append(select(images, keep) if bad else images)
    return verified[0], verified[1]
