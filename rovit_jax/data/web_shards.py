"""Web image-text pairs stored as TFRecord shards (the img2dataset "tfrecord" output layout).

Each record is a serialized `tf.train.Example` with bytes features "jpg" (encoded image), "txt"
(caption, UTF-8), "key" and a few others (sizes, status, ...). `WebShardsImageTextSource` indexes
every shard once — the TFRecord framing is scanned in Python, recording where each record's
bytes start — and then reads any record with one seek, so the deterministic batchers of
`image_text` get random access without TensorFlow (the Example is parsed by a small protobuf
reader here, too).

Shards may be local files or objects in a bucket (`gs://bucket/shards/*.tfrecord`), read through
`rovit_jax.paths`: indexing streams each shard once, and each record is then one ranged read.

TFRecord framing, per record: uint64 length (little endian), uint32 masked CRC-32C of those 8
bytes, `length` data bytes, uint32 masked CRC-32C of the data. Indexing checks every length CRC
(so a corrupt or compressed file fails loudly instead of yielding garbage offsets); the data CRC
is not checked (it would mean hashing every image byte in Python).
"""

from __future__ import annotations

import glob
import os
import re
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rovit_jax import paths
from rovit_jax.data.image_text import CorruptImageError

SHARD_EXTENSIONS = (".tfrecord", ".tfrecords", ".tfrec")

# ----------------------------------------------------------------------------------------------
# TFRecord framing.


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as used by TFRecord. Pure Python: for short inputs."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def index_tfrecord(path: str | os.PathLike) -> np.ndarray:
    """Scans an uncompressed TFRecord file: int64 [num_records, 2] of (data offset, data length).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the framing is broken (bad length CRC — also what a GZIP-compressed file
        gives — or a truncated record), naming the file and the byte offset.
    """
    path = os.fspath(path)
    if not paths.isfile(path):
        raise FileNotFoundError(f"TFRecord shard not found: {path}")
    size = paths.size(path)
    entries: list[tuple[int, int]] = []
    pos = 0
    # A sequential scan: a file object on a URL buffers ahead, so the headers of the following
    # records arrive with few requests (about one per buffer of the file).
    with paths.open_file(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            header = f.read(12)
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header at byte {pos}")
            (length,) = struct.unpack("<Q", header[:8])
            (length_crc,) = struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != length_crc:
                hint = " (the file looks GZIP-compressed)" if header[:2] == b"\x1f\x8b" else ""
                raise ValueError(f"{path}: corrupt record length at byte {pos}{hint}")
            end = pos + 12 + length + 4
            if end > size:
                raise ValueError(
                    f"{path}: record at byte {pos} of length {length} runs past the end of the "
                    f"file ({size} bytes)"
                )
            entries.append((pos + 12, length))
            pos = end
    return np.asarray(entries, np.int64).reshape(-1, 2)


def read_record(path: str, offset: int, length: int) -> bytes:
    """The `length` data bytes at `offset` of a TFRecord file (from `index_tfrecord`).

    One ranged read of exactly these bytes (one request for a URL): examples are read in random
    order, so buffering ahead, or keeping files open, would fetch bytes no one asked for.
    """
    data = paths.read_range(path, offset, length)
    if len(data) != length:
        raise ValueError(f"{path}: short read at byte {offset} ({len(data)} of {length} bytes)")
    return data


# ----------------------------------------------------------------------------------------------
# A minimal tf.train.Example reader (protobuf wire format).


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes):
    """Yields (field number, wire type, value) of a message; LEN values as bytes slices."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf field")
        yield field, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature_values(buf: bytes) -> list[Any]:
    """Values of one `tf.train.Feature` (bytes_list=1, float_list=2, int64_list=3)."""
    values: list[Any] = []
    for kind, wire, payload in _fields(buf):
        if wire != 2:
            continue
        for field, vwire, v in _fields(payload):
            if field != 1:
                continue
            if kind == 1:  # BytesList.value: repeated bytes
                values.append(bytes(v))
            elif kind == 2:  # FloatList.value: packed (LEN) or not (I32)
                raw = v if vwire in (2, 5) else b""
                values.extend(struct.unpack(f"<{len(raw) // 4}f", raw))
            elif kind == 3:  # Int64List.value: packed (LEN) or not (VARINT)
                if vwire == 0:
                    values.append(_signed64(v))
                else:
                    p = 0
                    while p < len(v):
                        x, p = _varint(v, p)
                        values.append(_signed64(x))
    return values


def parse_example(data: bytes) -> dict[str, list[Any]]:
    """A serialized `tf.train.Example` -> {feature name: list of values (bytes, float or int)}.

    Raises ValueError on malformed input.
    """
    out: dict[str, list[Any]] = {}
    for field, wire, features in _fields(data):
        if field != 1 or wire != 2:
            continue
        for entry_field, entry_wire, entry in _fields(features):
            if entry_field != 1 or entry_wire != 2:
                continue
            key, value = None, b""
            for f, w, v in _fields(entry):
                if f == 1 and w == 2:
                    key = bytes(v).decode("utf-8")
                elif f == 2 and w == 2:
                    value = v
            if key is not None:
                out[key] = _feature_values(value)
    return out


# ----------------------------------------------------------------------------------------------
# Shard lists.


def _expand_ranges(pattern: str) -> list[str]:
    """Expands "{000..099}" numeric ranges (zero padding kept), as webdataset / img2dataset do."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(_expand_ranges(f"{head}{i:0{width}d}{tail}"))
    return out


def expand_shards(pattern_or_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths, sorted and deduplicated.

    Accepts a folder (its *.tfrecord / *.tfrecords / *.tfrec files), a glob pattern, a pattern
    with "{000..099}" ranges, or a list of paths; local or URLs (`gs://bucket/shards/*.tfrecord`,
    wildcards in the last component only). FileNotFoundError names what matched nothing.
    """
    if isinstance(pattern_or_files, (str, os.PathLike)):
        pattern = os.fspath(pattern_or_files)
        if paths.isdir(pattern):
            return _folder_shards(pattern)
        files = []
        for p in _expand_ranges(pattern):
            if glob.has_magic(p):
                files.extend(_glob_shards(p, pattern))
            elif paths.isfile(p):
                files.append(p)
            elif p != pattern:
                raise FileNotFoundError(f"TFRecord shard not found: {p} (from {pattern})")
        if not files:
            raise FileNotFoundError(f"no TFRecord shards match {pattern}")
        return sorted(set(files))
    files = [os.fspath(p) for p in pattern_or_files]
    for p in files:
        if not paths.isfile(p):
            raise FileNotFoundError(f"TFRecord shard not found: {p}")
    if not files:
        raise ValueError("the list of TFRecord shards is empty")
    return sorted(set(files))


def _folder_shards(folder: str) -> list[str]:
    """The *.tfrecord / *.tfrecords / *.tfrec files of `folder`, sorted."""
    files = [
        os.path.join(folder, n)
        for n in paths.listdir(folder)
        if n.endswith(SHARD_EXTENSIONS) and paths.isfile(os.path.join(folder, n))
    ]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(SHARD_EXTENSIONS)} shards in {folder}")
    return sorted(set(files))


def _glob_shards(pattern: str, given: str) -> list[str]:
    """Files matching glob `pattern` (one expansion of the `given` pattern).

    Object stores have no folders to walk, so a URL may have wildcards in its last component
    only; elsewhere they would silently match nothing, hence the error.
    """
    if paths.is_remote(pattern) and glob.has_magic(os.path.dirname(pattern)):
        raise ValueError(
            f"shard pattern {given}: a URL may have wildcards in its last path component only"
        )
    return paths.glob(pattern)


def host_shard_files(files: Sequence[str], process_index: int, process_count: int) -> list[str]:
    """The shard files of one host: every `process_count`-th file from `process_index`.

    Deterministic for a given sorted list, disjoint across hosts and covering all files; sizes
    differ by at most one file. Raises ValueError if a host would get no file.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if len(files) < process_count:
        raise ValueError(f"{len(files)} shard files cannot feed {process_count} hosts")
    return list(files[process_index::process_count])


# ----------------------------------------------------------------------------------------------
# The source.


class WebShardsImageTextSource:
    """ImageTextSource over img2dataset-style TFRecord shards: `source[i] -> {"image", "caption"}`.

    Example i is record i of the concatenation of the shards in sorted file-name order. The
    image stays encoded ("image": bytes); the caption is decoded as UTF-8, with undecodable
    bytes replaced (U+FFFD) — such examples are counted in `undecodable_captions` (distinct
    indices). "key" is passed through as str when present. A record without the image or
    caption feature, or that cannot be read or parsed, raises CorruptImageError naming the
    shard and record, so the batchers substitute it.

    Every host indexes all shards: the batchers already give each host its slice of every
    global batch. `host_shard` is for pipelines that instead give each host its own files
    (`WebShardsImageTextSource(source.host_shard(i, n))`).
    """

    def __init__(
        self,
        pattern_or_files: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        image_key: str = "jpg",
        caption_key: str = "txt",
        num_workers: int = 1,
    ):
        """Lists and indexes the shards (with `num_workers` threads when > 1).

        Raises:
          FileNotFoundError: a shard or the pattern's matches are missing.
          ValueError: a shard's framing is broken (see `index_tfrecord`).
        """
        self.files = expand_shards(pattern_or_files)
        self.image_key, self.caption_key = image_key, caption_key
        if num_workers > 1:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                indices = list(pool.map(index_tfrecord, self.files))
        else:
            indices = [index_tfrecord(f) for f in self.files]
        self.shard_sizes = [len(ix) for ix in indices]
        self._ends = np.cumsum(self.shard_sizes, dtype=np.int64)
        self._index = np.concatenate(indices) if indices else np.zeros((0, 2), np.int64)
        self._bad_captions: set[int] = set()

    @property
    def undecodable_captions(self) -> int:
        """Number of distinct examples read so far whose caption was not valid UTF-8."""
        return len(self._bad_captions)

    def host_shard(self, process_index: int, process_count: int) -> list[str]:
        """This source's shard files for one host (see `host_shard_files`)."""
        return host_shard_files(self.files, process_index, process_count)

    def __len__(self) -> int:
        return len(self._index)

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, record number within the shard) of example `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        shard = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[shard - 1]) if shard else 0
        return self.files[shard], index - start

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        path, record = self.locate(index)
        offset, length = (int(v) for v in self._index[index])
        where = f"{path} record {record}"
        try:
            features = parse_example(read_record(path, offset, length))
        except (OSError, ValueError) as e:
            raise CorruptImageError(f"{where}: unreadable record ({e})") from e
        for key in (self.image_key, self.caption_key):
            values = features.get(key)
            if not values or not isinstance(values[0], bytes):
                raise CorruptImageError(
                    f"{where}: no bytes feature {key!r} (has {sorted(features)})"
                )
        raw_caption = features[self.caption_key][0]
        try:
            caption = raw_caption.decode("utf-8")
        except UnicodeDecodeError:
            caption = raw_caption.decode("utf-8", errors="replace")
            self._bad_captions.add(index)
        example = {"image": features[self.image_key][0], "caption": caption}
        key = features.get("key")
        if key and isinstance(key[0], bytes):
            example["key"] = key[0].decode("utf-8", errors="replace")
        return example
