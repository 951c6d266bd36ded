"""The one path layer: every file the project reads or writes, local or in a bucket, goes here.

Paths are strings; a string with a scheme (`gs://bucket/run`, any fsspec protocol) names an
object store, anything else the local file system. `os.path.join` and `os.path.basename` are
safe on both (they only split on "/"); `os.path.abspath`, `open`, `os.path.exists` and friends
are not, so the project calls the functions below instead.

Backends. `etils.epath` routes `gs://` through TensorFlow's `tf.io.gfile` whenever TensorFlow is
installed, and gfile always talks to the real GCS endpoint. This module switches epath to its
fsspec backend (`EPATH_USE_TF=false`, set before any remote path is used), so every `gs://` byte
goes through `gcsfs`: the same client in production and against a local emulator
(`STORAGE_EMULATOR_HOST=http://host:port`). Orbax writes its arrays through tensorstore, which
reads the emulator address from `TENSORSTORE_GCS_HTTP_URL`. Folder listings are not cached
(another process, or tensorstore, may have written since).

Atomic writes. A local file is written to a temporary name and renamed; an object in a bucket
only becomes visible when its upload completes, so a direct write is already all-or-nothing.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import io
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

os.environ["EPATH_USE_TF"] = "false"

from etils import epath  # noqa: E402  (the variable above must be set before epath decides)

try:  # epath caches its backend choice; forget one made before this module was imported
    from etils.epath import gpath as _gpath

    _gpath._is_tf_installed.cache_clear()
except (ImportError, AttributeError):  # pragma: no cover - other etils layouts
    pass

import fsspec  # noqa: E402

# gcsfs caches folder listings per process; another process (a relaunch, another host) or
# tensorstore (orbax's arrays) writes behind its back, so listings are always fetched anew.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

PathLike = str | os.PathLike

__all__ = [
    "absolute",
    "exists",
    "find",
    "glob",
    "is_remote",
    "isdir",
    "isfile",
    "listdir",
    "local_file",
    "local_output",
    "makedirs",
    "open_file",
    "path",
    "read_bytes",
    "read_json",
    "read_range",
    "read_text",
    "remove",
    "rename",
    "size",
    "version",
    "write_bytes",
    "write_json",
    "write_text",
]


def is_remote(p: PathLike) -> bool:
    """True for a URL with a scheme (`gs://...`), False for a local path."""
    return "://" in os.fspath(p)


def absolute(p: PathLike) -> str:
    """`p` as an absolute path string; URLs are returned as they are."""
    p = os.fspath(p)
    return p if is_remote(p) else os.path.abspath(os.path.expanduser(p))


def path(p: PathLike) -> epath.Path:
    """An `etils.epath.Path` for `p` (absolute if local), for APIs that take one (orbax)."""
    return epath.Path(absolute(p))


def exists(p: PathLike) -> bool:
    return path(p).exists()


def isfile(p: PathLike) -> bool:
    return path(p).is_file()


def isdir(p: PathLike) -> bool:
    return path(p).is_dir()


def listdir(p: PathLike) -> list[str]:
    """Sorted names (not paths) of the entries of folder `p`."""
    return sorted(q.name for q in path(p).iterdir())


def glob(pattern: PathLike) -> list[str]:
    """Sorted paths matching a glob `pattern` (wildcards in the last component for URLs)."""
    pattern = os.fspath(pattern)
    if not is_remote(pattern):
        return sorted(_glob.glob(os.path.expanduser(pattern)))
    folder, name = pattern.rsplit("/", 1)
    if not isdir(folder):
        return []
    return sorted(os.path.join(folder, q.name) for q in path(folder).glob(name))


def find(p: PathLike) -> list[str]:
    """Sorted paths of every file under folder `p`, at any depth."""
    p = absolute(p)
    if not is_remote(p):
        return sorted(os.path.join(d, n) for d, _, names in os.walk(p) for n in names)
    fs, key = fsspec.core.url_to_fs(p)
    protocol = p.split("://", 1)[0]
    return sorted(f"{protocol}://{k}" for k in fs.find(key))


def size(p: PathLike) -> int:
    """Size of file `p` in bytes."""
    return int(path(p).stat().length)


def version(p: PathLike) -> tuple[int, str]:
    """(size, a token that changes whenever file `p` is rewritten), for caches of its contents.

    Local: the modification time in nanoseconds. In a bucket: the object's generation (a new one
    per upload; epath's modification time has 1 s resolution, too coarse for a rewrite).
    """
    if not is_remote(p):
        st = os.stat(absolute(p))
        return st.st_size, str(st.st_mtime_ns)
    fs, key = fsspec.core.url_to_fs(os.fspath(p))
    info = fs.info(key)
    token = info.get("generation") or info.get("etag") or info.get("mtime")
    return int(info.get("size") or 0), str(token)


def makedirs(p: PathLike) -> None:
    """Creates folder `p` and its parents (a no-op on an object store's implicit folders)."""
    path(p).mkdir(parents=True, exist_ok=True)


def open_file(p: PathLike, mode: str = "r", encoding: str | None = None) -> IO[Any]:
    """A file object on `p` (text modes decode UTF-8 unless told otherwise)."""
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    if is_remote(p):
        f = path(p).open(mode.replace("t", "").replace("b", "") + "b")
        return f if "b" in mode else io.TextIOWrapper(f, encoding=encoding)
    return open(absolute(p), mode, encoding=encoding)


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_range(p: PathLike, offset: int, length: int) -> bytes:
    """The `length` bytes of file `p` from byte `offset` (fewer where the file ends first).

    A URL is read with one ranged request for exactly these bytes: a file object on a URL buffers
    megabytes ahead of each read, which random access (one record here, one there) pays for on
    every read.
    """
    if not is_remote(p):
        with open(absolute(p), "rb") as f:
            f.seek(offset)
            return f.read(length)
    fs, key = fsspec.core.url_to_fs(os.fspath(p))
    return fs.cat_file(key, start=offset, end=offset + length)


def read_text(p: PathLike) -> str:
    return path(p).read_text(encoding="utf-8")


def read_json(p: PathLike) -> Any:
    return json.loads(read_text(p))


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes `data` to `p` all-or-nothing (readers never see a partial file), making parents."""
    p = absolute(p)
    if is_remote(p):
        path(p).write_bytes(data)
        return
    folder = os.path.dirname(p)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(p) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any, **dump_kwargs: Any) -> None:
    write_text(p, json.dumps(obj, **dump_kwargs))


def rename(src: PathLike, dst: PathLike) -> None:
    """Moves file or folder `src` to `dst`.

    In a bucket there is no folder rename: objects are copied, then the originals deleted (an
    interruption leaves both, never neither). gcsfs's own move first tries a newer move API that
    not every server implements, retrying for seconds per object before falling back to this.
    """
    if not is_remote(src):
        os.rename(absolute(src), absolute(dst))
        return
    fs, src_key = fsspec.core.url_to_fs(os.fspath(src))
    _, dst_key = fsspec.core.url_to_fs(os.fspath(dst))
    fs.copy(src_key, dst_key, recursive=fs.isdir(src_key))
    fs.rm(src_key, recursive=True)


def remove(p: PathLike) -> None:
    """Deletes file or folder `p` (recursively)."""
    q = path(p)
    if q.is_dir():
        q.rmtree()
    else:
        q.unlink()


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
    """A local file name holding `p`'s bytes, for libraries that only open local files."""
    if not is_remote(p):
        yield absolute(p)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(os.fspath(p)))
        with open(local, "wb") as f:
            f.write(read_bytes(p))
        yield local


@contextlib.contextmanager
def local_output(p: PathLike) -> Iterator[str]:
    """A local name to write file or folder `p` at, for writers that only write local files.

    Local `p`: its absolute path (parent folders made). URL: a name in a temporary folder whose
    file, or folder tree, is uploaded to `p` when the block ends without an error (each file
    all-or-nothing; empty folders do not exist in a bucket). TensorFlow's own gs:// support is
    not used: it ignores the storage emulator.
    """
    if not is_remote(p):
        local = absolute(p)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        yield local
        return
    p = os.fspath(p).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(p))
        yield local
        fs, key = fsspec.core.url_to_fs(p)
        if os.path.isfile(local):
            fs.put_file(local, key)
            return
        for folder, _, names in os.walk(local):
            for name in names:
                rel = os.path.relpath(os.path.join(folder, name), local)
                fs.put_file(os.path.join(folder, name), f"{key}/{rel}")
