"""Pack an image folder into shards for streaming (and map-style) training:

    fcmae data pack SRC --out DIR [--shard-size 512MB] [--format parquet|webdataset] [--workers N]
                        [--seed 0] [--no-shuffle] [--row-group-size BYTES]
    fcmae data verify DIR

SRC is listed as fcmae lists a local folder (fcmae.data.listing: datasets' split folders train/,
val/ -> validation, test/, and class sub-folders as labels, by datasets' imagefolder rule); images,
.npy arrays and TIFFs are taken, other files are not. Each split's files are put in an order drawn
from --seed (sorted with --no-shuffle: a streaming shuffle works inside a window, so class-sorted
shards would give batches of one class) and cut into shards of about --shard-size bytes of files, a
cut that depends on nothing but the listing and the flags. Shards are written by --workers processes,
each atomically (a temporary name, then a rename), so the output does not depend on the number of
workers; a re-run skips every shard already written with the same contents plan (resume after a
crash). manifest.json, written last, lists per split every shard's name, row count, size and sha256
(and parquet row groups), the label names and the columns' encodings: streaming needs no
--num-examples, and `verify` names a damaged shard.

Layout: DIR/<split>/shard-00000.parquet (or .tar) and DIR/manifest.json, so that ``--data DIR`` reads
it map-style (datasets' parquet / webdataset loaders through fcmae's listing), streamed
(fcmae.data.stream), for fine-tuning and for --knn-data.

Parquet columns (`COLUMNS`): ``image``, datasets' Image struct {bytes: the file's bytes as they are,
path: its path relative to SRC}, typed Image in the schema's datasets metadata (Image(decode=False)
when the data holds arrays, so datasets never tries to open a .npy as a picture); ``label`` (class
folders only), typed ClassLabel with the class names; and, when any .npy is packed, ``shape`` and
``dtype`` (the array's, read from its header; null for images). An array is stored as its .npy
file's bytes, which fcmae's Reader reads as it reads the file.

Webdataset: members ``{key}.{ext}`` (the file's own bytes and extension: jpg, png, npy, tif...) and
``{key}.cls`` (the label as decimal text), the key the row's number in its split; tar headers carry no
time or owner, so shards are byte-identical from run to run. datasets' webdataset loader reads them
(``load_dataset("webdataset", data_files=...)``) when a split holds one image type.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import ClassLabel, Features, List, Value
from datasets import Image as ImageFeature

from .listing import SAMPLE_EXTENSIONS, class_labels, list_files
from .samples import sample_seed
from .shards import MANIFEST, MANIFEST_FORMAT, read_footer

FORMATS = {"parquet": ".parquet", "webdataset": ".tar"}
RECORDS = ".pack"  # DIR/.pack/<split>-<index>.json: the shards written so far (hidden from listings)
COLUMNS = {
    "image": "datasets Image struct {bytes: the file's bytes as stored in SRC, path: its path relative to SRC}; "
    "a .npy array is its .npy file's bytes (header: dtype, shape, order)",
    "label": "int64 class index (datasets ClassLabel, names in label_names); only with class folders",
    "shape": "list<int64>: the .npy array's shape (null for images); only when arrays are packed",
    "dtype": "string: the .npy array's numpy dtype (null for images); only when arrays are packed",
}
WEBDATASET_MEMBERS = {
    "{key}.{ext}": "the file's bytes (ext: its own extension, lower case)",
    "{key}.cls": "the label, decimal text; only with class folders",
}


def parse_size(text) -> int:
    """Bytes from '512MB', '64MiB', '1.5GB', '4096' (decimal units, and binary KiB/MiB/GiB/TiB)."""
    s = str(text).strip().upper().replace(" ", "")
    units = {
        "TIB": 2**40,
        "GIB": 2**30,
        "MIB": 2**20,
        "KIB": 2**10,
        "TB": 10**12,
        "GB": 10**9,
        "MB": 10**6,
        "KB": 10**3,
        "T": 10**12,
        "G": 10**9,
        "M": 10**6,
        "K": 10**3,
        "B": 1,
    }
    for unit, factor in units.items():
        if s.endswith(unit):
            s, mult = s[: -len(unit)], factor
            break
    else:
        mult = 1
    try:
        value = int(float(s) * mult)
    except ValueError:
        raise ValueError(f"{text!r} is not a size; write e.g. 512MB, 64MiB or 1GB.") from None
    if value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}.")
    return value


@dataclass
class Task:
    split: str
    index: int
    rows: list  # (absolute path, path relative to SRC, label or None)
    path: str  # the shard's final path
    name: str  # relative to DIR
    fmt: str
    row_group_bytes: int
    label_names: list | None
    arrays: bool
    key: str  # what the shard's contents depend on: a re-run with the same key skips it


def plan_shards(
    src: str, out: str, shard_size: int, fmt: str, seed: int, shuffle: bool, row_group_bytes: int
) -> tuple[list[Task], dict, list]:
    """(tasks, {split: number of shards}, label names): a pure function of the listing and the flags."""
    listing = {
        split: [f for f in files if f.lower().endswith(SAMPLE_EXTENSIONS)] for split, files in list_files(src).items()
    }
    listing = {split: files for split, files in listing.items() if files}
    if not listing:
        raise FileNotFoundError(
            f"No images or arrays found in {src!r}; expected image files "
            f"({' '.join(SAMPLE_EXTENSIONS)}), flat, in class folders or in split folders."
        )
    labels = class_labels(listing)
    names, by_split = labels if labels else (None, {})
    arrays = any(f.lower().endswith(".npy") for files in listing.values() for f in files)
    root = os.path.join(os.path.abspath(src), "")
    tasks, counts = [], {}
    for s, (split, files) in enumerate(listing.items()):
        split_labels = by_split.get(split) or [None] * len(files)
        order = range(len(files))
        if shuffle:
            order = torch.randperm(len(files), generator=torch.Generator().manual_seed(sample_seed(seed, s))).tolist()
        rows = [
            (
                files[i],
                files[i][len(root) :].replace(os.sep, "/") if files[i].startswith(root) else files[i],
                split_labels[i],
                os.stat(files[i]),
            )
            for i in order
        ]
        shards = _fill(rows, shard_size)
        counts[split] = len(shards)
        first = 0
        for i, shard in enumerate(shards):
            name = f"{split}/shard-{i:05d}{FORMATS[fmt]}"
            described = [fmt, row_group_bytes, names, arrays, first]
            described += [[rel, label, st.st_size, st.st_mtime_ns] for _, rel, label, st in shard]
            key = hashlib.sha256(json.dumps(described).encode()).hexdigest()
            rows_of = [(a, rel, label) for a, rel, label, _ in shard]
            path = os.path.join(out, split, os.path.basename(name))
            tasks.append(Task(split, i, rows_of, path, name, fmt, row_group_bytes, names, arrays, key))
            first += len(shard)
    return tasks, counts, names


def _fill(rows: list, shard_size: int) -> list[list]:
    """``rows`` (path, name, label, stat) in order, cut into shards of at most ``shard_size`` bytes of files
    (a file larger than that is a shard of its own)."""
    shards, current, size = [], [], 0
    for row in rows:
        if current and size + row[3].st_size > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(row)
        size += row[3].st_size
    shards.append(current)
    return shards


class _Hashing(io.RawIOBase):
    """A write-only file that hashes what goes through it (pyarrow and tarfile write sequentially)."""

    def __init__(self, f):
        super().__init__()
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, b):
        b = bytes(b)
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self):
        return self.n

    def flush(self):
        self.f.flush()


def _npy_header(data: bytes) -> tuple[list[int] | None, str | None]:
    try:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return [int(d) for d in shape], dtype.str
    except Exception:  # noqa: BLE001 - a damaged array: packed as it is, counted as bad when read
        return None, None


def _read_rows(task: Task, skipped: list):
    """(index, bytes, name, label) of each readable file of ``task``; the others go to ``skipped``."""
    for i, (path, rel, label) in enumerate(task.rows):
        try:
            with open(path, "rb") as src:
                data = src.read()
        except OSError as e:
            skipped.append({"path": rel, "reason": f"{type(e).__name__}: {e}"})
            continue
        yield i, data, rel, label


def _write_parquet(f, task: Task, skipped: list) -> int:
    """Write the rows of ``task`` as parquet to ``f``, a row group per ``task.row_group_bytes`` of files."""
    schema = features(task.label_names, task.arrays).arrow_schema
    # no dictionary and no min/max statistics for the file bytes: both would copy them (twice the size,
    # and a footer holding two files per row group)
    stats = ["label"] if task.label_names is not None else False
    writer = pq.ParquetWriter(f, schema, use_dictionary=False, write_statistics=stats)
    batch, size, num_rows = [], 0, 0

    def flush():
        if not batch:
            return
        cols = {"image": [{"bytes": d, "path": rel} for d, rel, _ in batch]}
        if task.label_names is not None:
            cols["label"] = [label for _, _, label in batch]
        if task.arrays:
            heads = [_npy_header(d) if rel.lower().endswith(".npy") else (None, None) for d, rel, _ in batch]
            cols["shape"], cols["dtype"] = [h[0] for h in heads], [h[1] for h in heads]
        writer.write_table(pa.Table.from_pydict(cols, schema=schema), row_group_size=len(batch))

    for _, data, rel, label in _read_rows(task, skipped):
        if batch and size + len(data) > task.row_group_bytes:
            flush()
            batch, size = [], 0
        batch.append((data, rel, label))
        size += len(data)
        num_rows += 1
    flush()
    writer.close()
    return num_rows


def _write_tar(f, task: Task, skipped: list) -> int:
    """Write the rows of ``task`` as a webdataset tar to ``f``: KEY.EXT (and KEY.cls with a label)."""
    num_rows = 0
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, data, rel, label in _read_rows(task, skipped):
            key = f"{task.index:05d}{i:07d}"
            ext = os.path.splitext(rel)[1].lower().lstrip(".")
            members = [(f"{key}.{ext}", data)]
            if label is not None:
                members.append((f"{key}.cls", str(label).encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))
            num_rows += 1
    return num_rows


def features(label_names, arrays: bool) -> Features:
    cols = {"image": ImageFeature(decode=not arrays)}
    if label_names is not None:
        cols["label"] = ClassLabel(names=list(label_names))
    if arrays:
        cols["shape"], cols["dtype"] = List(Value("int64")), Value("string")
    return Features(cols)


def write_shard(task: Task) -> dict:
    """Write one shard atomically; return its manifest record (with the files that could not be read)."""
    os.makedirs(os.path.dirname(task.path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(task.path), f".{os.path.basename(task.path)}.tmp-{os.getpid()}")
    skipped = []
    with open(tmp, "wb") as raw:
        f = _Hashing(raw)
        num_rows = (_write_parquet if task.fmt == "parquet" else _write_tar)(f, task, skipped)
        raw.flush()
        os.fsync(raw.fileno())
    record = {"name": task.name, "num_rows": num_rows, "bytes": f.n, "sha256": f.sha.hexdigest()}
    if task.fmt == "parquet":
        meta = pq.read_metadata(tmp)
        record["row_groups"] = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        record["row_group_bytes"] = [_group_bytes(meta.row_group(g)) for g in range(meta.num_row_groups)]
    os.replace(tmp, task.path)
    return {"key": task.key, "record": record, "skipped": skipped, "mtime_ns": os.stat(task.path).st_mtime_ns}


def _group_bytes(group) -> int:
    return sum(group.column(c).total_compressed_size for c in range(group.num_columns))


def _done(task: Task, records: str) -> dict | None:
    """The record of a shard an earlier run wrote with the same key, if the file is still as written."""
    path = os.path.join(records, f"{task.split}-{task.index:05d}.json")
    try:
        with open(path) as f:
            done = json.loads(f.read())
        st = os.stat(task.path)
    except (OSError, ValueError):
        return None
    if done.get("key") != task.key or st.st_size != done["record"]["bytes"] or st.st_mtime_ns != done["mtime_ns"]:
        return None
    return done


def pack(
    src: str,
    out: str,
    shard_size="512MB",
    fmt: str = "parquet",
    workers: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    row_group_size=None,
    log=print,
) -> dict:
    """Pack ``src`` into shards under ``out`` (module docstring); returns the manifest. ``row_group_size``
    (parquet): bytes of files per row group, by default shard_size / 32 between 64KB and 8MB: the unit a
    partial read reads, so the row group two readers share stays small next to a shard."""
    src, out = _check_paths(src, out, fmt)
    shard_bytes = parse_size(shard_size)
    group_bytes = parse_size(row_group_size) if row_group_size else min(8 * 2**20, max(2**16, shard_bytes // 32))
    workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
    tasks, counts, names = plan_shards(src, out, shard_bytes, fmt, seed, shuffle, group_bytes)
    records = os.path.join(out, RECORDS)
    os.makedirs(records, exist_ok=True)
    results = {(t.split, t.index): _done(t, records) for t in tasks}
    todo = [t for t in tasks if results[(t.split, t.index)] is None]
    if len(todo) < len(tasks):
        log(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} shards already written")

    def record(task, result):  # each shard's record as soon as it is written: a crash loses no finished shard
        results[(task.split, task.index)] = result
        _write_json(os.path.join(records, f"{task.split}-{task.index:05d}.json"), result)

    _write_shards(todo, workers, record)
    _remove_stale(out, counts, tasks, fmt)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "shard_format": fmt,
        "source": src,
        "order": {"shuffled": shuffle, "seed": seed},
        "shard_size": shard_bytes,
        "row_group_bytes": group_bytes if fmt == "parquet" else None,
        "image_column": "image",
        "columns": COLUMNS if fmt == "parquet" else WEBDATASET_MEMBERS,
        "label_names": names,
        "splits": {},
        "skipped": [],
    }
    for split in counts:
        shards = [results[(t.split, t.index)] for t in tasks if t.split == split]
        manifest["skipped"] += [s for r in shards for s in r["skipped"]]
        shards = [r["record"] for r in shards]
        manifest["splits"][split] = {
            "num_rows": sum(s["num_rows"] for s in shards),
            "num_bytes": sum(s["bytes"] for s in shards),
            "shards": shards,
        }
    _write_json(os.path.join(out, MANIFEST), manifest)
    _report(manifest, log)
    return manifest


def _check_paths(src: str, out: str, fmt: str) -> tuple[str, str]:
    """The absolute source and output folders; raise on a missing source or an output inside it."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}.")
    if not os.path.isdir(os.path.expanduser(src)):
        raise FileNotFoundError(f"{src!r} is not a folder; give the folder of images to pack.")
    src, out = os.path.abspath(os.path.expanduser(src)), os.path.abspath(os.path.expanduser(out))
    if out == src or out.startswith(os.path.join(src, "")):
        raise ValueError(f"--out {out!r} is inside the folder being packed; write the shards elsewhere.")
    return src, out


def _write_shards(todo: list, workers: int, record) -> None:
    """Write the shards of ``todo``, in ``workers`` processes, calling ``record(task, result)`` for each."""
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo))) as pool:
            futures = {pool.submit(write_shard, t): t for t in todo}
            try:
                for future in as_completed(futures):
                    record(futures[future], future.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    else:
        for task in todo:
            record(task, write_shard(task))


def _remove_stale(out: str, counts: dict, tasks: list, fmt: str) -> None:
    """Remove the shards of an earlier pack that this one does not have, and temporary files of a crash."""
    for split in counts:
        folder = os.path.join(out, split)
        keep = {os.path.basename(t.path) for t in tasks if t.split == split}
        for entry in os.listdir(folder):
            stale = entry.startswith("shard-") and entry.endswith(FORMATS[fmt]) and entry not in keep
            if stale or (entry.startswith(".shard-") and ".tmp-" in entry):
                os.remove(os.path.join(folder, entry))


def _report(manifest: dict, log) -> None:
    if manifest["skipped"]:
        first = manifest["skipped"][0]
        warnings.warn(
            f"{len(manifest['skipped'])} file(s) could not be read and were left out, e.g. "
            f"{first['path']} ({first['reason']}); the manifest lists them.",
            stacklevel=3,
        )
    for split, info in manifest["splits"].items():
        log(
            f"{split}: {info['num_rows']} rows in {len(info['shards'])} {manifest['shard_format']} shard(s), "
            f"{info['num_bytes'] / 1e6:.1f} MB"
        )


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(out: str, log=print) -> list[str]:
    """Check every shard of ``out``'s manifest (present, size, sha256; parquet footer and row counts);
    returns one line per damaged or missing shard, naming it."""
    path = os.path.join(out, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.loads(f.read())
    except OSError:
        raise FileNotFoundError(f"{out!r} has no {MANIFEST}: pack it with `fcmae data pack`.") from None
    problems, checked = [], 0
    for info in manifest["splits"].values():
        for s in info["shards"]:
            file = os.path.join(out, s["name"])
            checked += 1
            try:
                size = os.path.getsize(file)
            except OSError:
                problems.append(f"{s['name']}: missing")
                continue
            if size != s["bytes"]:
                problems.append(f"{s['name']}: {size} bytes, the manifest says {s['bytes']} (truncated or replaced)")
                continue
            sha = hashlib.sha256()
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            if sha.hexdigest() != s["sha256"]:
                problems.append(f"{s['name']}: sha256 differs from the manifest's (damaged)")
                continue
            if manifest["shard_format"] == "parquet":
                try:
                    with open(file, "rb") as f:
                        rows = read_footer(f).num_rows
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{s['name']}: unreadable parquet footer ({e})")
                    continue
                if rows != s["num_rows"]:
                    problems.append(f"{s['name']}: {rows} rows, the manifest says {s['num_rows']}")
    log(f"{checked - len(problems)} of {checked} shards intact" + (":" if problems else "."))
    for p in problems:
        log(f"  damaged: {p}")
    return problems


def main(argv: list[str] | None = None, prog: str = "fcmae data pack") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pack_arguments(parser)
    args = parser.parse_args(argv)
    return run_pack(args)


def add_pack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the image folder (split folders, class folders, .npy / TIFF arrays)")
    parser.add_argument("--out", required=True, help="the output folder: <split>/shard-*.parquet|tar + manifest.json")
    parser.add_argument("--shard-size", default="512MB", help="bytes of files per shard (default: 512MB)")
    parser.add_argument("--format", default="parquet", choices=sorted(FORMATS), help="shard format (default: parquet)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="writer processes (default: min(8, CPUs)); the output does not depend on it",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the rows' order (default: 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the listing's sorted order")
    parser.add_argument(
        "--row-group-size",
        default=None,
        help="parquet: bytes of files per row group, the unit "
        "of a partial read (default: shard size / 32, between 64KiB and 8MiB)",
    )


def run_pack(args) -> int:
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        pack(
            args.src,
            args.out,
            args.shard_size,
            args.format,
            args.workers,
            args.seed,
            not args.no_shuffle,
            args.row_group_size,
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def verify_main(argv: list[str] | None = None, prog: str = "fcmae data verify") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description="Check a packed dataset's shards against its manifest "
        "(size, sha256, parquet footer): names every damaged or missing shard.",
    )
    parser.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        return 2 if verify(args.dir) else 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
