"""Shards: the files a sharded dataset is made of, where they are, how many rows each holds, and
how to read a range of their rows, at any fsspec URL, with retries.

A shard list (`ShardSet`) comes from, in this order:
  1. ``manifest.json`` at the dataset's root (written by ``fcmae data pack``): per split, every
     shard's name, row count, size, sha256 and, for parquet, its row groups: nothing else is read;
  2. the parquet footers of the files (one small read per shard, in threads), or the headers of
     webdataset .tar files;
  3. for a Hub dataset (``--dataset-name``), datasets' data files of the split (``hf://`` parquet URLs).

Reading: parquet through pyarrow on an fsspec file object, reading the footer (exactly its bytes)
and only the row groups a range needs; the row group that straddles two ranges is kept, so a reader
walking a shard reads each row group once. Webdataset tars through ``tarfile``: records are the
members that share a key (``0001.jpg`` + ``0001.cls``); a range that starts inside a shard skips to
its first record by reading only the 512-byte member headers. Opening and reading are retried with
backoff on OSError / timeouts (`TRIES`, `RETRY_DELAY`); then the shard is unreadable, and its rows
count as bad images (fcmae.data.stream).

Counting reads (tests, benchmarks): with ``FCMAE_COUNT_READS=DIR`` in the environment, every shard
file is opened through `CountingFile`, which appends ``name<TAB>bytes`` to ``DIR/reads-<pid>.tsv``
when it is closed: DataLoader workers and other processes included (`read_counts(DIR)` sums them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features
from datasets import Image as ImageFeature
from fsspec.implementations.local import LocalFileSystem

from .listing import local_files, split_files

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fcmae-shards"
SHARD_EXTENSIONS = {".parquet": "parquet", ".tar": "webdataset"}
TRIES, RETRY_DELAY = 4, 0.5  # attempts per open/read, first backoff in seconds (doubled each time)
RETRIABLE = (OSError, TimeoutError)  # ConnectionError and fsspec's timeouts are among them
READS_ENV = "FCMAE_COUNT_READS"
IMAGE_MEMBERS = None  # set lazily: the member extensions that hold a sample (images, .npy)


class ShardError(OSError):
    """A shard that cannot be opened or read, after retries; its message names the shard."""


@dataclass
class Shard:
    url: str  # an fsspec URL or local path
    name: str  # the path relative to the dataset's root, for messages and fingerprints
    num_rows: int
    bytes: int | None = None
    sha256: str | None = None
    row_groups: list[int] | None = None  # parquet: rows of each row group
    row_group_bytes: list[int] | None = None  # parquet: compressed bytes of each row group


@dataclass
class ShardSet:
    """The shards of one split, in their stored order, and how to read a sample out of them."""

    shards: list[Shard]
    format: str  # parquet | webdataset
    image_column: str = "image"  # parquet column, or the record's sample member (webdataset: any image/.npy)
    source: str = ""
    label_names: list[str] | None = None
    columns: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def num_bytes(self) -> int | None:
        sizes = [s.bytes for s in self.shards]
        return None if None in sizes else sum(sizes)

    def fingerprint(self) -> str:
        """What a checkpoint's position must match: the shards' names and row counts, in order."""
        data = json.dumps([[s.name, s.num_rows] for s in self.shards])
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def reader(self, index: int) -> ShardReader:
        shard = self.shards[index]
        if self.format == "parquet":
            return ParquetReader(shard, self.image_column)
        return TarReader(shard)


# ----------------------------------------------------------------------------- opening, retries, counting


def retrying(fn, what: str, tries: int | None = None):
    """``fn()``, tried up to `TRIES` times with exponential backoff on OSError / timeouts; then a
    `ShardError` naming ``what``. Other exceptions (a corrupt file) pass through at once."""
    tries = tries or TRIES
    for attempt in range(tries):
        try:
            return fn()
        except ShardError:
            raise
        except RETRIABLE as e:
            if attempt + 1 == tries:
                raise ShardError(f"{what}: {type(e).__name__}: {e} (after {tries} tries)") from e
            time.sleep(RETRY_DELAY * 2**attempt)


def url_to_fs(url: str):
    """(filesystem, path) of a local path or any fsspec URL (s3://, gs://, hf://, memory://, file://)."""
    return fsspec.core.url_to_fs(os.path.expanduser(url) if "://" not in url else url)


def is_url(source: str) -> bool:
    return "://" in os.fspath(source)


def open_shard(url: str, name: str | None = None):
    """A binary file object of ``url``, unbuffered on remote filesystems (pyarrow and tarfile ask for
    exactly the bytes they need; a read-ahead cache would read more), counted under `READS_ENV`."""
    fs, path = url_to_fs(url)
    kwargs = {} if isinstance(fs, LocalFileSystem) else {"cache_type": "none"}
    f = fs.open(path, "rb", **kwargs)
    folder = os.environ.get(READS_ENV)
    return CountingFile(f, name or url, folder) if folder else f


class CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes read through it, and appends ``name<TAB>bytes`` to
    ``folder/reads-<pid>.tsv`` when closed."""

    def __init__(self, f, name: str, folder: str):
        super().__init__()
        self.f, self.name_, self.folder, self.count = f, name, folder, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def read(self, n=-1):
        data = self.f.read(n)
        self.count += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    @property
    def size(self):
        return getattr(self.f, "size", None)

    def close(self):
        if not self.closed:
            self.f.close()
            os.makedirs(self.folder, exist_ok=True)
            with open(os.path.join(self.folder, f"reads-{os.getpid()}.tsv"), "a") as out:
                out.write(f"{self.name_}\t{self.count}\n")
        super().close()


def read_counts(folder: str) -> dict[str, int]:
    """{shard name: bytes read} summed over every process that counted into ``folder``."""
    counts: dict[str, int] = {}
    if not os.path.isdir(folder):
        return counts
    for entry in os.listdir(folder):
        if entry.startswith("reads-"):
            with open(os.path.join(folder, entry)) as f:
                for line in f:
                    name, n = line.rstrip("\n").rsplit("\t", 1)
                    counts[name] = counts.get(name, 0) + int(n)
    return counts


def file_size(f) -> int:
    size = getattr(f, "size", None)
    if isinstance(size, int):
        return size
    here = f.tell()
    end = f.seek(0, 2)
    f.seek(here)
    return end


# ----------------------------------------------------------------------------- readers


class ShardReader:
    """``rows(start, end)``: the sample values ({'bytes', 'path'} dicts) of rows [start, end) of one
    shard; ``close()``. Opening and every read are retried; a `ShardError` names the shard."""

    def __init__(self, shard: Shard):
        self.shard, self.f = shard, None

    def _open(self):
        if self.f is None:
            self.f = retrying(
                lambda: open_shard(self.shard.url, self.shard.name), f"cannot open shard {self.shard.url}"
            )
        return self.f

    def _reopen(self):
        self.close()
        return self._open()

    def close(self):
        if self.f is not None:
            try:
                self.f.close()
            except Exception:  # noqa: BLE001 - closing a broken remote file must not hide the real error
                pass
            self.f = None


class ParquetReader(ShardReader):
    """Rows of a parquet shard, reading its footer once and only the row groups a range needs. Each
    caller (``owner``, a partition) keeps its last row group, so walking a range block by block reads
    each row group once; `share` names the ranges of several owners, and the row groups two of them
    need are kept until the shard is closed, so those are read once too."""

    def __init__(self, shard: Shard, column: str):
        super().__init__(shard)
        self.column, self.meta, self.bounds = column, None, None
        self.last, self.kept, self.keep, self.ranges = {}, {}, set(), []

    def share(self, ranges: list[tuple]) -> None:
        """(owner, first row, end row) of every caller that will read this shard."""
        self.ranges = list(ranges)

    def _metadata(self):
        if self.meta is None:
            self.meta = retrying(
                lambda: read_footer(self._reopen(), self.shard.bytes),
                f"cannot read the parquet footer of shard {self.shard.url}",
            )
            self.bounds = [0]
            for i in range(self.meta.num_row_groups):
                self.bounds.append(self.bounds[-1] + self.meta.row_group(i).num_rows)
            if self.bounds[-1] != self.shard.num_rows:
                raise ShardError(
                    f"shard {self.shard.url} holds {self.bounds[-1]} rows, but {self.shard.num_rows} "
                    "were expected (the manifest or the file changed)"
                )
            owners: dict = {}
            for owner, a, b in self.ranges:
                for g in range(len(self.bounds) - 1):
                    if self.bounds[g] < b and self.bounds[g + 1] > a:
                        owners.setdefault(g, set()).add(owner)
            self.keep = {g for g, who in owners.items() if len(who) > 1}
        return self.meta

    def _group(self, g: int, owner) -> list:
        if g in self.kept:
            return self.kept[g]
        if self.last.get(owner, (None,))[0] == g:
            return self.last[owner][1]

        def read():
            pf = pq.ParquetFile(self._open(), metadata=self.meta)
            return pf.read_row_group(g, columns=[self.column], use_threads=False).column(0)

        try:
            column = read()
        except RETRIABLE:
            column = retrying(
                lambda: (self._reopen(), read())[1], f"cannot read row group {g} of shard {self.shard.url}", TRIES - 1
            )
        values = [normalise(v, f"{self.shard.name}#{self.bounds[g] + i}") for i, v in enumerate(column.to_pylist())]
        if g in self.keep:
            self.kept[g] = values
        self.last[owner] = (g, values)
        return values

    def rows(self, start: int, end: int, owner=None) -> list:
        self._metadata()
        out, g = [], 0
        while g < len(self.bounds) - 1 and self.bounds[g + 1] <= start:
            g += 1
        while start < end:
            values = self._group(g, owner)
            lo, hi = start - self.bounds[g], min(end, self.bounds[g + 1]) - self.bounds[g]
            out.extend(values[lo:hi])
            start, g = self.bounds[g] + hi, g + 1
        return out

    def close(self):
        self.last, self.kept = {}, {}
        super().close()


def read_footer(f, size: int | None = None) -> pq.FileMetaData:
    """The parquet metadata of ``f``, reading exactly the footer (pyarrow alone reads the last 64 KiB)."""
    size = size or file_size(f)
    if size < 12:
        raise ValueError(f"a file of {size} bytes is not a parquet file")
    f.seek(size - 8)
    tail = f.read(8)
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise ValueError("not a parquet file (no PAR1 magic at its end: truncated?)")
    n = int.from_bytes(tail[:4], "little")
    if n + 12 > size:
        raise ValueError(f"a parquet footer of {n} bytes in a file of {size}")
    f.seek(size - 8 - n)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + f.read(n) + tail))


def normalise(value, name: str) -> dict:
    """A {'bytes', 'path'} dict from an Image struct, raw bytes or a path; ``name`` when it has none."""
    if isinstance(value, dict):
        return {"bytes": value.get("bytes"), "path": value.get("path") or name}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": name}
    return {"bytes": None, "path": value}


def _sample_extensions() -> set[str]:
    global IMAGE_MEMBERS
    if IMAGE_MEMBERS is None:
        from .listing import SAMPLE_EXTENSIONS

        IMAGE_MEMBERS = {e.lstrip(".") for e in SAMPLE_EXTENSIONS}
    return IMAGE_MEMBERS


def split_member(name: str) -> tuple[str | None, str]:
    """(key, extension) of a tar member, as webdataset splits them: the key is the path up to the
    first dot of the file name."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None, ""
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext


class TarReader(ShardReader):
    """Records of a webdataset tar, in order; reads forward, re-opening only to go back."""

    def __init__(self, shard: Shard):
        super().__init__(shard)
        self.tar, self.next_row, self.pending = None, 0, None

    def _start(self):
        self.tar = tarfile.open(fileobj=self._open(), mode="r:")  # noqa: SIM115 - read on, closed in close()
        self.next_row, self.pending = 0, None

    def _records(self, skip: bool):
        """The next record as (key, {ext: member}), reading member data only if not ``skip``."""
        members, key = {}, None
        while True:
            member = self.pending or self.tar.next()
            self.pending = None
            if member is None:
                break
            if not member.isfile():
                continue
            k, ext = split_member(member.name)
            if k is None:
                continue
            if key is not None and k != key:
                self.pending = member
                break
            key = k
            members[ext.lower()] = None if skip else self.tar.extractfile(member).read()
        return (key, members) if key is not None else None

    def rows(self, start: int, end: int, owner=None) -> list:
        def read():
            if self.tar is None or start < self.next_row:
                self._reopen()
                self._start()
            out = []
            while self.next_row < end:
                record = self._records(skip=self.next_row < start)
                if record is None:
                    raise ValueError(
                        f"shard {self.shard.url} ends after {self.next_row} records, {self.shard.num_rows} expected"
                    )
                if self.next_row >= start:
                    out.append(self._value(*record))
                self.next_row += 1
            return out

        try:
            return read()
        except RETRIABLE:
            self.tar = None
            return retrying(
                lambda: (setattr(self, "tar", None), read())[1], f"cannot read shard {self.shard.url}", TRIES - 1
            )
        except tarfile.TarError as e:
            raise ValueError(f"shard {self.shard.url} is not a readable tar ({e})") from None

    def _value(self, key, members):
        wanted = _sample_extensions()
        ext = next((e for e in members if e in wanted), None)
        if ext is None:
            return {"bytes": None, "path": f"{self.shard.name}#{key} (no image member among {sorted(members)})"}
        return {"bytes": members[ext], "path": f"{self.shard.name}#{key}.{ext}"}

    def close(self):
        self.tar = None
        super().close()


def count_tar_records(f) -> int:
    """The number of samples (runs of members with the same key) of the tar file object ``f``."""
    keys, last = 0, None
    with tarfile.open(fileobj=f, mode="r:") as tar:  # closes the tar view only: ``f`` stays the caller's
        for member in iter(tar.next, None):
            k, _ = split_member(member.name) if member.isfile() else (None, "")
            if k is not None and k != last:
                keys, last = keys + 1, k
    return keys


# ----------------------------------------------------------------------------- shard lists


def discover(source: str, split: str = "train", image_column: str | None = None) -> ShardSet | None:
    """The shards of ``split`` of ``source`` (a folder with manifest.json, a folder / file / glob of
    .parquet or .tar files, local or at an fsspec URL), or None for other sources (image folders,
    .arrow files), which the datasets stream reads."""
    source = os.fspath(source)
    fs, root = url_to_fs(source)
    local = isinstance(fs, LocalFileSystem)
    if fs.isdir(root) and fs.isfile(posixpath.join(root, MANIFEST)):
        return from_manifest(fs, root, split, image_column)
    if local:
        try:
            _, files = local_files(root, split)
        except FileNotFoundError:
            return None
        files = [f for f in files if os.path.splitext(f)[1].lower() in SHARD_EXTENSIONS]
    else:
        if fs.isdir(root):
            found = [f for f in fs.find(root) if os.path.splitext(f)[1].lower() in SHARD_EXTENSIONS]
            by_split = split_files(root, found)
            if by_split and split not in by_split:
                raise ValueError(
                    f"{source!r} has no split {split!r} (found: {sorted(by_split)}); choose one with --split."
                )
            files = by_split.get(split, [])
        else:
            files = sorted(fs.glob(root)) if any(c in root for c in "*?[") else [root] if fs.isfile(root) else []
        if not files:
            raise FileNotFoundError(f"No .parquet or .tar shards found at {source!r} (split {split!r}).")
    kinds = {SHARD_EXTENSIONS.get(os.path.splitext(f)[1].lower()) for f in files} - {None}
    if not kinds:
        return None
    if len(kinds) > 1:
        raise ValueError(f"{source!r} mixes .parquet and .tar shards; keep one kind per dataset.")
    base = root if fs.isdir(root) else posixpath.dirname(root)
    shards = [Shard(fs.unstrip_protocol(f) if not local else f, posixpath.relpath(f, base), 0) for f in files]
    return (_from_parquet if kinds == {"parquet"} else _from_tars)(shards, source, image_column)


def from_manifest(fs, root: str, split: str, image_column: str | None = None) -> ShardSet:
    path = posixpath.join(root, MANIFEST)
    manifest = json.loads(retrying(lambda: fs.cat_file(path), f"cannot read {path}"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an fcmae shard manifest (format {manifest.get('format')!r}).")
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(
            f"{root!r} has no split {split!r} (its manifest lists {sorted(splits)}); choose one with --split."
        )
    column = manifest.get("image_column", "image")
    if image_column not in (None, column) and manifest["shard_format"] == "parquet":
        raise ValueError(
            f"{root!r}: --image-column {image_column!r}, but its manifest says the images are in column {column!r}."
        )
    local = isinstance(fs, LocalFileSystem)
    shards = [
        Shard(
            posixpath.join(root, s["name"]) if local else fs.unstrip_protocol(posixpath.join(root, s["name"])),
            s["name"],
            s["num_rows"],
            s.get("bytes"),
            s.get("sha256"),
            s.get("row_groups"),
            s.get("row_group_bytes"),
        )
        for s in splits[split]["shards"]
    ]
    if not shards or not sum(s.num_rows for s in shards):
        raise ValueError(f"{root!r}: split {split!r} has no rows.")
    return ShardSet(
        shards, manifest["shard_format"], column, root, manifest.get("label_names"), manifest.get("columns", {})
    )


def _footer_info(shard: Shard):
    def read():
        f = open_shard(shard.url, shard.name)
        try:
            size = file_size(f)
            return size, read_footer(f, size)
        finally:
            f.close()

    try:
        size, meta = retrying(read, f"cannot open shard {shard.url}")
    except ValueError as e:
        raise ValueError(f"shard {shard.url}: {e}") from None
    return size, meta


def _from_parquet(shards: list[Shard], source: str, image_column: str | None) -> ShardSet:
    with ThreadPoolExecutor(min(16, len(shards))) as pool:
        infos = list(pool.map(_footer_info, shards))
    column = None
    for shard, (size, meta) in zip(shards, infos):
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
        shard.num_rows, shard.bytes = meta.num_rows, size
        shard.row_groups = [g.num_rows for g in groups]
        shard.row_group_bytes = [
            g.total_compressed_size
            if hasattr(g, "total_compressed_size")
            else sum(g.column(c).total_compressed_size for c in range(g.num_columns))
            for g in groups
        ]
        found = _image_column(meta.schema.to_arrow_schema(), image_column, shard.url)
        if column not in (None, found):
            raise ValueError(
                f"{source!r}: shards name their image column differently ({column!r}, {found!r}); "
                "name it with --image-column."
            )
        column = found
    if not sum(s.num_rows for s in shards):
        raise ValueError(f"The dataset {source!r} has no rows.")
    return ShardSet(shards, "parquet", column, source)


def _image_column(schema: pa.Schema, requested: str | None, where: str) -> str:
    names = list(schema.names)
    if requested is not None:
        if requested not in names:
            raise ValueError(
                f"{where} has no column {requested!r}. Available columns: {names}. Name the image column "
                "with --image-column."
            )
        return requested
    typed = []
    try:
        typed = [c for c, f in Features.from_arrow_schema(schema).items() if isinstance(f, ImageFeature)]
    except Exception:  # noqa: BLE001 - a schema datasets cannot type: fall back to the names
        pass
    column = (typed + [c for c in ("image", "img") if c in names] + [None])[0]
    if column is None:
        raise ValueError(
            f"{where} has no column of datasets Image type or named 'image'/'img'. Available columns: "
            f"{names}. Name the image column with --image-column."
        )
    return column


def _from_tars(shards: list[Shard], source: str, image_column: str | None) -> ShardSet:
    def count(shard):
        def read():
            f = open_shard(shard.url, shard.name)
            try:
                return file_size(f), count_tar_records(f)
            finally:
                f.close()

        return retrying(read, f"cannot open shard {shard.url}")

    with ThreadPoolExecutor(min(16, len(shards))) as pool:
        for shard, (size, n) in zip(shards, pool.map(count, shards)):
            shard.bytes, shard.num_rows = size, n
    if not sum(s.num_rows for s in shards):
        raise ValueError(f"The dataset {source!r} has no records.")
    return ShardSet(shards, "webdataset", "image", source)


def hub_shards(
    name: str, config_name: str | None, split: str, image_column: str | None, cache_dir: str | None = None
) -> ShardSet | None:
    """A Hub dataset's parquet data files of ``split`` (``hf://datasets/...`` URLs) as shards, or None
    when the dataset is not stored as parquet (the datasets stream reads it). Needs the network."""
    import datasets

    builder = datasets.load_dataset_builder(name, config_name, cache_dir=cache_dir)
    files = (builder.config.data_files or {}).get(split)
    if not files or not all(str(f).endswith(".parquet") for f in files):
        return None
    shards = [Shard(str(f), str(f).split("/", 4)[-1] if str(f).startswith("hf://") else str(f), 0) for f in files]
    return _from_parquet(shards, name, image_column)
