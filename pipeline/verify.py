"""Full decodes: which image files really decode, not only which have a sane header (the index pass).

`decode_error` decodes one file with PIL and, for a JPEG, strictly with libjpeg-turbo: PIL (the torchvision backend,
the converter) and DALI's CPU decoder decode a JPEG whose entropy-coded data is broken (cut short, overwritten:
"Corrupt JPEG data: premature end of data segment") as garbled pixels without an error, libjpeg-turbo only warns;
such a file counts as undecodable, so that --verify and the converter leave out the same files whichever backend
reads them.

`verify` (train.py --verify) decodes every file of a split before training, in threads (PIL and libjpeg-turbo
release the GIL while they decode), and remembers each file's result by path, size and mtime in a cache outside
the dataset's folder (which may be read-only): $LEOCLR_CACHE, else $XDG_CACHE_HOME/leoclr, else ~/.cache/leoclr,
one file `verify-<hash of the images' folder>.json` per folder. A later run decodes only the files that are new
or changed since (all of them again when `CHECK` changed: a cache of PIL's check alone does not count).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

CACHE_ENV = "LEOCLR_CACHE"
CHECK = "pil+libjpeg-turbo"  # what decode_error checks: a cache written by another check is decoded again


def decode_error(path: str) -> str | None:
    """None when PIL decodes the whole file and, for a JPEG, libjpeg-turbo decodes it without a warning (see the
    module's docstring); else why not (one line). A JPEG whose header and end marker are intact but whose
    compressed data is broken passes the index pass and fails here."""
    try:
        with Image.open(path) as image:
            image.load()
            jpeg = image.format == "JPEG"
    except Exception as error:  # PIL raises several unrelated types for broken data
        return f"does not decode ({type(error).__name__}: {error})"
    return jpeg_warning(path) if jpeg else None


_TJFLAG_STOPONWARNING, _TJPF_RGB, _TJPF_CMYK, _TJCS_CMYK, _TJCS_YCCK = 8192, 0, 11, 3, 4


@functools.cache
def _turbojpeg() -> ctypes.CDLL | None:
    """The TurboJPEG API of libjpeg-turbo (setup.sh installs it for FFCV's build), None where it is missing."""
    for name in (ctypes.util.find_library("turbojpeg"), "libturbojpeg.so.0", "libturbojpeg.dylib"):
        if not name:
            continue
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        library.tjInitDecompress.restype = ctypes.c_void_p
        library.tjGetErrorStr2.restype = ctypes.c_char_p
        library.tjDestroy.argtypes = [ctypes.c_void_p]
        return library
    return None


def strict_jpeg_available() -> bool:
    """Whether `jpeg_warning` can check JPEGs (libturbojpeg loads); without it they are checked by PIL only."""
    return _turbojpeg() is not None


def jpeg_warning(path: str) -> str | None:
    """Why libjpeg-turbo does not decode the JPEG at `path` cleanly (an error or a warning, one line), or None.
    The file is decoded at 1/8 scale (every coefficient is still entropy-decoded: that is where the data breaks),
    in one call that releases the GIL; None without libturbojpeg."""
    library = _turbojpeg()
    if library is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    handle = ctypes.c_void_p(library.tjInitDecompress())
    try:
        width, height, subsampling, colours = (ctypes.c_int() for _ in range(4))
        header = library.tjDecompressHeader3(
            handle, data, ctypes.c_ulong(len(data)), *map(ctypes.byref, (width, height, subsampling, colours))
        )
        if header == 0:
            cmyk = colours.value in (_TJCS_CMYK, _TJCS_YCCK)
            scaled_w, scaled_h = -(-width.value // 8), -(-height.value // 8)
            pixels = ctypes.create_string_buffer(scaled_w * scaled_h * 4)
            format_ = _TJPF_CMYK if cmyk else _TJPF_RGB
            flags = _TJFLAG_STOPONWARNING
            if (
                library.tjDecompress2(
                    handle, data, ctypes.c_ulong(len(data)), pixels, scaled_w, 0, scaled_h, format_, flags
                )
                == 0
            ):
                return None
        message = library.tjGetErrorStr2(handle).decode(errors="replace").strip()
    finally:
        library.tjDestroy(handle)
    return f"does not decode (libjpeg-turbo: {message})"


def cache_dir() -> Path:
    """Where verification results are kept: $LEOCLR_CACHE, else $XDG_CACHE_HOME/leoclr, else ~/.cache/leoclr."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "leoclr"


def images_root(paths: list[str]) -> str:
    """The folder every path is under (absolute): what names a dataset's cache file."""
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def cache_file(paths: list[str]) -> Path:
    digest = hashlib.sha1(images_root(paths).encode()).hexdigest()[:16]
    return cache_dir() / f"verify-{digest}.json"


def _stat(path: str) -> list[int]:
    """[size, mtime in ns]: a changed file gets decoded again. [-1, -1] for a file gone since the index pass."""
    try:
        stat = os.stat(path)
    except OSError:
        return [-1, -1]
    return [stat.st_size, stat.st_mtime_ns]


def _load(file: Path, root: str) -> dict[str, list]:
    """{path relative to root: [size, mtime_ns, reason or None]}; empty for a missing, foreign or broken file."""
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("root") != root or saved.get("check") != CHECK:
        return {}
    return saved.get("files", {})


def _save(file: Path, root: str, entries: dict[str, list]) -> None:
    """Write through a temporary file and a rename: concurrent runs never read half a cache."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"root": root, "check": CHECK, "files": entries}))
    os.replace(tmp, file)


def verify(
    paths: list[str],
    workers: int,
    file: Path | None = None,
    rank: int = 0,
    world: int = 1,
    exchange: Callable[[dict], list[dict]] = lambda part: [part],
) -> tuple[dict[str, str], int]:
    """Decode every file of `paths` that the cache `file` (default `cache_file(paths)`) does not hold unchanged,
    with `workers` threads; returns ({path: reason} of the files that do not decode, files decoded here and on
    the other ranks). With several ranks each decodes every `world`-th of those files from `rank` on and
    `exchange` (an all-gather of picklable objects) gives every rank all results; rank 0 writes the cache."""
    root = images_root(paths)
    file = cache_file(paths) if file is None else file
    cached = _load(file, root)
    names = [os.path.relpath(os.path.abspath(p), root) for p in paths]
    keys = [_stat(p) for p in paths]
    todo = [i for i, (name, key) in enumerate(zip(names, keys)) if cached.get(name, [None, None])[:2] != key]
    mine = todo[rank::world]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        decoded = tqdm(
            pool.map(decode_error, [paths[i] for i in mine]),
            total=len(mine),
            desc="verify",
            unit="img",
            leave=False,
            mininterval=1,
            disable=rank > 0,
        )
        found = {names[i]: [*keys[i], reason] for i, reason in zip(mine, decoded)}
    for part in exchange(found):
        cached.update(part)
    if todo and rank == 0:
        _save(file, root, cached)
    bad = {path: cached[name][2] for path, name in zip(paths, names) if cached[name][2] is not None}
    return bad, len(todo)
