"""Behaviour unchanged? Fixed-seed tiny runs of train.py at a BASE commit and in this working tree, compared to
the digits the runs print (loss .4f, kNN top-1 .2f%, box area .3f):

    python benchmarks/same_results.py                  # BASE: where this branch meets main (git merge-base)
    python benchmarks/same_results.py --base dd41334 --loader torchvision

Each case trains 2 epochs, fp32 on the CPU, on a tiny generated dataset (96 train / 24 val JPEGs, 16 px, 12
steps an epoch), once per available loader: LeOCLR, MoCo-v2, LeOCLR with ContrastiveCrop (pass and forward
boxes), and LeOCLR stopped by SIGUSR1 early in epoch 2 (a mid-epoch checkpoint) and resumed. Then what BASE
wrote must still work here: BASE's mid-epoch checkpoint resumed by this tree (same metrics as BASE's own
resume); with the last loader (torchvision where it is), BASE's config.json trained again (`--config`, same
metrics) and BASE's final checkpoint scored by `eval.py knn` (same printed line). BASE is checked out with
`git worktree add` into a temporary folder and its results are cached by commit hash ($LEOCLR_CACHE, default
~/.cache/leoclr, under same-results/); the working tree is copied first, so edits made meanwhile do not count.
Prints one SAME or DIFF line per comparison; exits 1 on any DIFF or failed run. About 20 minutes on a loaded
2-core CPU with three loaders, half that with BASE cached.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
DATA_VERSION = 2  # bump when `write_data` changes: cached BASE results were made on the old data
TINY = (
    "--image-size 16 --batch-size 8 --bn-splits 2 --queue-size 32 --knn-k 5 --amp off --device cpu "
    "--train-limit 0 --val-limit 0 --no-tensorboard --epochs 2 --seed 0"
).split()
# name -> train.py options beyond TINY, --loader and --data
CASES = {
    "leoclr": ["--method", "leoclr"],
    "mocov2": ["--method", "mocov2"],
    "ccrop-pass": ["--method", "leoclr", "--crop", "ccrop", "--ccrop-k", "0.6"],  # k 0.1 boxes whole images
    "ccrop-forward": ["--method", "leoclr", "--crop", "ccrop", "--ccrop-k", "0.6", "--ccrop-boxes", "forward"],
}
RESUMED = ["--method", "leoclr"]  # the case stopped mid-epoch and resumed
# What is compared per epoch of metrics.jsonl: key -> how the run prints it.
PRINTED = {"loss": "{:.4f}", "knn_top1": "{:.2%}", "box_area": "{:.3f}"}


def printed(record: dict) -> dict:
    """An epoch record's compared values as the run prints them ("-" where None)."""
    return {key: "-" if record.get(key) is None else form.format(record[key]) for key, form in PRINTED.items()}


def compare(base: list[dict], tree: list[dict]) -> list[str]:
    """The differences between two runs' metrics.jsonl records (one dict per epoch line) to the printed digits:
    one line per differing epoch and key, or about the number of epochs; [] when they agree."""
    if len(base) != len(tree):
        return [f"{len(base)} epoch records at BASE, {len(tree)} here"]
    diffs = []
    for a, b in zip(base, tree):
        shown_a, shown_b = printed(a), printed(b)
        for key in PRINTED:
            if shown_a[key] != shown_b[key]:
                diffs.append(f"epoch {a.get('epoch')}: {key} {shown_a[key]} at BASE, {shown_b[key]} here")
    return diffs


def summary(records: list[dict]) -> str:
    """loss and kNN by epoch, as printed: '- 9.1234 9.0123 | 33.33% 41.67% 45.83%'."""
    shown = [printed(r) for r in records]
    line = f"loss {' '.join(s['loss'] for s in shown)} | kNN {' '.join(s['knn_top1'] for s in shown)}"
    areas = [s["box_area"] for s in shown if s["box_area"] != "-"]
    return line + (f" | box area {' '.join(areas)}" if areas else "")


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_data(root: Path) -> Path:
    """ImageNet-layout JPEGs of varied sizes, 3 classes of 32 train and 8 val images: noise with a faint blob
    in the class's colour channel, of random size and place (hard enough that kNN top-1 is no 100%)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("val", 8)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
                image = rng.integers(0, 140, size=(h, w, 3), dtype=np.uint8)
                bh, bw = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
                top, left = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
                image[top : top + bh, left : left + bw, c] += 40
                Image.fromarray(image).save(folder / f"{i:03d}.jpg", quality=95)
    return root


class Tree:
    """A checkout that runs train.py and eval.py in its own folder, importing its own modules."""

    def __init__(self, root: Path, log) -> None:
        self.root, self.log = root, log
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "PYTHONHASHSEED": "0"}

    def python(self, args: list, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        command = [sys.executable, *map(str, args)]
        result = subprocess.run(command, cwd=self.root, env=self.env, text=True, capture_output=True, **kwargs)
        if check and result.returncode:
            raise RunFailed(f"{' '.join(map(str, args))} in {self.root}: exit {result.returncode}\n{result.stderr}")
        return result

    def data_for(self, loader: str, data: Path, work: Path) -> Path:
        """The tiny folder, or for FFCV its .beton files written by this tree's converter."""
        if loader != "ffcv":
            return data
        beton = work / "ffcv-data"
        if not (beton / "train.beton").exists():
            self.python(["-m", "pipeline.convert", data, beton, "--workers", "1"])
        return beton

    def train(self, loader: str, data: Path, out: Path, extra: list) -> list[dict]:
        shutil.rmtree(out, ignore_errors=True)
        workers = "0" if loader == "torchvision" else "1"
        self.python(["train.py", *TINY, "--loader", loader, "--workers", workers, "--data", data, "--out", out, *extra])
        return read_metrics(out)

    def interrupted(self, loader: str, data: Path, out: Path) -> str:
        """A run sent SIGUSR1 once epoch 1 is logged: it stops at its next poll, within epoch 2 (step 10 of 12).
        Returns where it stopped, as it said."""
        shutil.rmtree(out, ignore_errors=True)
        workers = "0" if loader == "torchvision" else "1"
        args = ["train.py", *TINY, "--loader", loader, "--workers", workers, "--data", data, "--out", out, *RESUMED]
        process = subprocess.Popen(
            [sys.executable, *map(str, args)],
            cwd=self.root,
            env=self.env,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        metrics, deadline = out / "metrics.jsonl", time.time() + 600
        while process.poll() is None and time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                process.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.02)
        _, err = process.communicate(timeout=600)
        said = [line for line in err.splitlines() if "checkpoint written at" in line]
        if process.returncode != 128 + signal.SIGUSR1 or not said:
            raise RunFailed(f"{args} in {self.root} was not stopped mid-epoch (exit {process.returncode}):\n{err}")
        return said[0].split(": checkpoint written at ")[1].split(";")[0]

    def resume(self, run: Path) -> list[dict]:
        self.python(["train.py", "--resume", run / "checkpoint.pt", "--out", run])
        return read_metrics(run)

    def knn(self, checkpoint: Path, loader: str) -> str:
        """eval.py knn's printed result line for a checkpoint (its tiny data, fp32, on the CPU)."""
        args = ["eval.py", "knn", "--checkpoint", checkpoint, "--k", "5", "--amp", "off", "--device", "cpu"]
        out = self.python([*args, "--workers", "0" if loader == "torchvision" else "1"]).stdout
        return next(line for line in out.splitlines() if line.startswith("knn: top-1"))


def run_all(tree: Tree, loaders: list[str], data: Path, work: Path, store: dict) -> None:
    """Every case in `tree`, results into `store` (name -> metrics records, or a printed line); run folders under
    `work` (kept: BASE's checkpoints and config.json are read again by the working tree)."""
    for loader in loaders:
        folder = tree.data_for(loader, data, work)
        for name, extra in CASES.items():
            key = f"{name}-{loader}"
            tree.log(f"  {key}")
            store[key] = tree.train(loader, folder, work / key, extra)
        key = f"resumed-{loader}"
        tree.log(f"  {key}")
        run = work / key
        store[f"{key}-stopped"] = tree.interrupted(loader, folder, run)
        shutil.copytree(run, work / f"{key}-at-stop", dirs_exist_ok=True)  # for the working tree to resume
        store[key] = tree.resume(run)
        store[f"knn-{loader}"] = tree.knn(work / f"leoclr-{loader}" / "checkpoint.pt", loader)


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, text=True, capture_output=True).stdout.strip()


def snapshot(into: Path) -> Path:
    """A copy of the working tree's files (tracked and untracked, not ignored) as they are now: edits made while
    the cases run do not mix into them."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def base_results(commit: str, loaders: list[str], data: Path, cache: Path, log) -> tuple[dict, Path]:
    """BASE's results (cached by commit and loaders) and the folder of its runs."""
    folder = cache / f"base-{commit}"
    done = folder / f"results-{'-'.join(loaders)}.json"
    if done.exists():
        log(f"BASE {commit[:10]}: cached in {folder}")
        return json.loads(done.read_text()), folder / "runs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    checkout = Path(tempfile.mkdtemp(prefix="same-results-base-")) / "tree"
    git("worktree", "add", "--detach", str(checkout), commit)
    try:
        log(f"BASE {commit[:10]}: running in {checkout}")
        store: dict = {}
        run_all(Tree(checkout, log), loaders, data, folder / "runs", store)
    finally:
        git("worktree", "remove", "--force", str(checkout))
    done.write_text(json.dumps(store, indent=1))
    return store, folder / "runs"


def available_loaders() -> list[str]:
    """The backends whose library imports here, checked by this tree's own `pipeline.missing_backend`."""
    names = "('dali', 'ffcv', 'torchvision')"
    code = f"from pipeline import missing_backend as m; print(' '.join(b for b in {names} if m(b) is None))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        text=True,
        capture_output=True,
        check=True,
    )
    return result.stdout.split()


class RunFailed(Exception):
    pass


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--base", default=None, help="The commit to compare with. [default: git merge-base HEAD main]")
@click.option(
    "--loader", "loaders", multiple=True, help="Loaders to run (repeat). [default: every one that imports here]"
)
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Where BASE's results and the data are kept. [default: $LEOCLR_CACHE/same-results]",
)
def main(base: str | None, loaders: tuple[str, ...], cache: Path | None) -> None:
    """Train the tiny cases at BASE and here; print SAME or DIFF per comparison."""
    started = time.perf_counter()
    commit = git("rev-parse", base or git("merge-base", "HEAD", "main"))
    cache = cache or Path(os.environ.get("LEOCLR_CACHE", Path.home() / ".cache" / "leoclr")) / "same-results"
    data = cache / f"data-v{DATA_VERSION}"
    if not (data / "val").is_dir():
        shutil.rmtree(data, ignore_errors=True)
        write_data(data)
    chosen = sorted(loaders or available_loaders())
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    head = git("rev-parse", "--short", "HEAD")
    work = Path(tempfile.mkdtemp(prefix="same-results-tree-"))
    tree = Tree(snapshot(work / "tree"), log)  # now: BASE's runs take minutes
    try:
        base_store, base_runs = base_results(commit, chosen, data, cache, log)
        log(f"working tree {REPO} at {head}{dirty}: running a copy in {tree.root}")
        store: dict = {}
        run_all(tree, chosen, data, work, store)
        for loader in chosen:  # what BASE wrote, used here
            stopped = work / f"from-base-resumed-{loader}"
            shutil.copytree(base_runs / f"resumed-{loader}-at-stop", stopped)
            store[f"base-checkpoint-resumed-{loader}"] = tree.resume(stopped)
            base_store[f"base-checkpoint-resumed-{loader}"] = base_store[f"resumed-{loader}"]
            if loader != chosen[-1]:  # config.json and eval.py read the same for every loader: the last's
                continue
            config = base_runs / f"leoclr-{loader}" / "config.json"
            out = work / f"from-base-config-{loader}"
            tree.python(["train.py", "--config", config, "--out", out])
            store[f"base-config-{loader}"] = read_metrics(out)
            base_store[f"base-config-{loader}"] = base_store[f"leoclr-{loader}"]
            store[f"base-knn-{loader}"] = tree.knn(base_runs / f"leoclr-{loader}" / "checkpoint.pt", loader)
            base_store[f"base-knn-{loader}"] = base_store[f"knn-{loader}"]
    except RunFailed as error:
        click.echo(f"FAILED: {error}")
        raise SystemExit(1) from None
    click.echo(f"BASE {commit[:10]} vs working tree {head}{dirty}; loaders {', '.join(chosen)}")
    different = 0
    for key, ours in store.items():
        theirs = base_store.get(key)
        if isinstance(ours, list):
            diffs = compare(theirs, ours)
            shown = summary(ours)
        else:
            diffs = [] if ours == theirs else [f"{theirs!r} at BASE, {ours!r} here"]
            shown = ours
        different += bool(diffs)
        click.echo(f"{'DIFF' if diffs else 'SAME'} {key}: {shown}")
        for line in diffs:
            click.echo(f"    {line}")
    click.echo(f"{len(store) - different} SAME, {different} DIFF ({time.perf_counter() - started:.0f} s)")
    shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(1 if different else 0)


if __name__ == "__main__":
    main()
