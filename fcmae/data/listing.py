"""Local data files: one walk of a folder (os.scandir), links followed, files sorted into splits.

datasets finds a folder's files with an fsspec glob per pattern. That glob does not follow links
to folders (a linked val/ or linked class folders are silently missing) and costs minutes on
ImageNet-sized folders. Here the folder is walked once, following links to files and folders,
and datasets' own split patterns (`datasets.data_files`) and imagefolder label rule are applied to
the list, so splits and class names stay what `datasets.load_dataset("imagefolder", ...)` gives.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import time
import warnings

from datasets.data_files import ALL_DEFAULT_PATTERNS, DEFAULT_SPLITS, FILES_TO_IGNORE, SPLIT_PATTERN_SHARDED
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from datasets.utils.py_utils import string_to_dict
from fsspec.utils import glob_translate

IMAGE_EXTENSIONS = tuple(sorted(ImageFolder.EXTENSIONS))  # .tif/.tiff among them: multi-band TIFFs too
ARRAY_EXTENSIONS = (".npy",)  # N-channel arrays (fcmae.data.arrays); listed as images are: {'bytes': None, 'path'}
SAMPLE_EXTENSIONS = IMAGE_EXTENSIONS + ARRAY_EXTENSIONS
TABLE_EXTENSIONS = (".parquet", ".arrow")
BUILDERS = (
    ("parquet", (".parquet",)),
    ("arrow", (".arrow",)),
    ("webdataset", (".tar",)),  # .tar: webdataset shards
    ("imagefolder", SAMPLE_EXTENSIONS),
)
ACCEPTED = (
    f"image files ({' '.join(IMAGE_EXTENSIONS)}) or .npy arrays, flat or in class sub-folders, "
    f"or {' / '.join(TABLE_EXTENSIONS)} / webdataset .tar files"
)
RACY_NS = 2_000_000_000  # folder times closer than this to the listing may hide a later change (FAT: 2 s ticks)
SHARDED = SPLIT_PATTERN_SHARDED.replace("{split}", "*")  # data/*-00000-of-00004.*: the split is the name's start
_CACHE: dict[str, tuple[int, list, dict]] = {}  # root -> (listing start, [(folder, stat key)], splits)


def list_files(root: str) -> dict[str, list[str]]:
    """{split: absolute paths, sorted as datasets sorts them} of every file under ``root``, links followed.

    Splits follow datasets' default patterns: files under a train/, val/ or validation/, test/
    folder (or named train*, val*, ...) go to 'train', 'validation', 'test'; without such names
    everything is 'train'. Hidden files and folders and '__*' folders are skipped, as datasets does.
    Paths keep the link names (a class folder that is a link keeps its name, hence its label).
    Listed once per process: a second call re-reads only the folders' times, and lists again if
    any folder changed. The lists are shared between calls: do not modify them."""
    root = os.path.abspath(os.path.expanduser(root))
    cached = _CACHE.get(root)
    if cached is not None and _unchanged(*cached[:2]):
        return cached[2]
    started = time.time_ns()
    files, folders = _walk(root)
    splits = split_files(root, files)
    if len(_CACHE) >= 4:  # a run reads one or two folders; ImageNet's list is ~150 MB of Python strings
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[root] = (started, folders, splits)
    return splits


def files_under(root: str, extensions: tuple[str, ...] = SAMPLE_EXTENSIONS) -> list[str]:
    """Every file under ``root`` whose name ends with one of ``extensions`` (any case), links followed
    (each real folder once), hidden files and folders skipped, sorted by path."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root!r} is not a folder; give the folder that holds the images or arrays.")
    files = _walk(os.path.abspath(os.path.expanduser(root)), once=True)[0]
    return sorted(f for f in files if f.lower().endswith(extensions))


def clear_cache() -> None:
    """Forget every listing: the next `list_files` walks its folder again (benchmarks, tests)."""
    _CACHE.clear()


def local_files(source: str, split: str) -> tuple[str, list[str]]:
    """('parquet' | 'arrow' | 'imagefolder', files of ``split``) for a folder, a file or a glob."""
    path = os.path.abspath(os.path.expanduser(source))
    if glob.has_magic(source):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise FileNotFoundError(f"No file matches {source!r}; expected {ACCEPTED}.")
    elif os.path.isdir(path):
        by_split = list_files(path)
        if by_split and split not in by_split:
            raise ValueError(
                f"{source!r} has no split {split!r} (split folders/files found: "
                f"{sorted(by_split)}); choose one with DataConfig.split (--split)."
            )
        files = by_split.get(split, [])
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"Data path {source!r} does not exist; expected a folder of {ACCEPTED}.")
    for builder, exts in BUILDERS:
        chosen = [f for f in files if f.lower().endswith(exts)]  # str.endswith: 4x faster than splitext
        if chosen:
            return builder, chosen
    raise FileNotFoundError(f"No images found in {source!r} (split {split!r}); expected {ACCEPTED}.")


def class_labels(files: dict[str, list[str]]) -> tuple[list[str], dict[str, list[int]]] | None:
    """(class names, {split: label of each file}) by datasets' imagefolder rule, or None: the label
    is the name of the file's folder, names are sorted, and labels exist only if there are at least
    two names and every image sits at the same depth (datasets' FolderBasedBuilder)."""
    images = [f for fs in files.values() for f in fs if f.lower().endswith(SAMPLE_EXTENSIONS)]
    names = sorted({_folder_name(f) for f in images})
    if len(names) < 2 or len({f.replace("\\", "/").count("/") for f in images}) != 1:
        return None
    index = {n: i for i, n in enumerate(names)}
    return names, {split: [index[_folder_name(f)] for f in fs] for split, fs in files.items()}


def _folder_name(path):
    return os.path.basename(os.path.dirname(path))


# ----------------------------------------------------------------------------- the walk


def _walk(root, once: bool = False):
    """(files, [(folder, stat key)]): every non-hidden file, and each folder read with its
    (device, inode, mtime) to tell later whether the listing still holds. ``once``: each real folder
    is read once (a link loop or a second link to a folder is skipped) instead of a loop being an error."""
    files, folders, broken, seen = [], [], [], set()
    stack = [(root, (), None)]  # (folder, (device, inode) of the folders above it, last link on the way)
    while stack:
        path, above, link = stack.pop()
        st = os.stat(path)  # follows links
        here = (st.st_dev, st.st_ino)
        if once and here in seen:
            continue
        seen.add(here)
        if here in above:
            raise ValueError(
                f"Link loop: {link or path} leads back to {os.path.realpath(path)}, a folder that "
                f"contains it, so the listing of {root} would never end. Remove the link or point it "
                "elsewhere."
            )
        folders.append((path, (*here, st.st_mtime_ns)))
        with os.scandir(path) as entries:
            for e in entries:
                if e.name.startswith("."):  # hidden, as datasets skips them
                    continue
                if e.is_dir():  # follows links
                    if not e.name.startswith("__"):  # __pycache__, __MACOSX: datasets skips them too
                        stack.append((e.path, (*above, here), e.path if e.is_symlink() else link))
                elif e.is_file():
                    if e.name not in FILES_TO_IGNORE:
                        files.append(e.path)
                elif e.is_symlink():
                    broken.append(e.path)
    if broken:
        warnings.warn(f"Ignoring {len(broken)} broken link(s) under {root}, e.g. {broken[0]}.", stacklevel=3)
    return files, folders


def _unchanged(started, folders):
    """True if no folder was added to, removed from or replaced since the listing began. Times
    within RACY_NS of that start do not count as unchanged: a second change in the same clock
    tick would not show (the 'racy clean' problem that git guards against in the same way)."""
    try:
        for path, key in folders:
            st = os.stat(path)
            if (st.st_dev, st.st_ino, st.st_mtime_ns) != key or st.st_mtime_ns >= started - RACY_NS:
                return False
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- splits


def split_files(root: str, files: list[str]) -> dict[str, list[str]]:
    """{split: files} by datasets' default patterns, tried in datasets' order: sharded names
    (data/train-00000-of-00004.parquet), then the first pattern group that matches any file
    (datasets.data_files.get_data_patterns). Patterns match paths relative to ``root`` by fsspec's
    glob rules. Files come in datasets' order: those of a split's first pattern, sorted, then those of
    its second... A file matching two patterns of a split is listed once (datasets lists it twice)."""
    files = sorted(files)  # fsspec's glob returns paths sorted; datasets keeps that order
    start = len(os.path.join(root, ""))  # the walk joined every path onto root: slicing is relpath, 50x faster
    paths = _Paths(files, [f[start:].replace(os.sep, "/") for f in files])
    shards = {}
    for f in paths.select([SHARDED]):
        name = string_to_dict(os.path.basename(f), os.path.basename(SPLIT_PATTERN_SHARDED))["split"]
        shards.setdefault(name, []).append(f)
    if shards:
        defaults = [str(s) for s in DEFAULT_SPLITS]
        return {s: shards[s] for s in [s for s in defaults if s in shards] + sorted(set(shards) - set(defaults))}
    for group in ALL_DEFAULT_PATTERNS:
        found = {str(split): paths.select(patterns) for split, patterns in group.items()}
        found = {split: fs for split, fs in found.items() if fs}
        if found:
            return found
    return {}


class _Paths:
    """Sorted files and their paths relative to the root, matched against glob patterns cheaply
    (ImageNet: 1.28M files in ~1,000 folders). A pattern ending in '/**' depends only on the folder,
    so it is tried once per folder. The others are tried only on paths holding their literal text
    ('train' of '**/train[-._ 0-9]*'), found in one pass over all paths for every pattern."""

    def __init__(self, files, rel):
        self.files, self.rel = files, rel
        self.folders = [r.rpartition("/")[0] for r in rel]
        self.unique_folders = set(self.folders)
        patterns = [p for group in ALL_DEFAULT_PATTERNS for ps in group.values() for p in ps]
        patterns.append(SHARDED)
        literals = {_literal(p) for p in patterns if not p.endswith("/**")} - {""}
        hint = re.compile("|".join(map(re.escape, sorted(literals))))
        self.candidates = [i for i, r in enumerate(rel) if hint.search(r)]

    def select(self, patterns):
        """The files matching the patterns: those of the first pattern, then the new ones of the
        second... (datasets' order), each file once."""
        chosen = {}
        for p in patterns:
            rx = _regex(p)
            if p.endswith("/**"):
                folders = {d for d in self.unique_folders if rx.match(d + "/")}
                found = [i for i, d in enumerate(self.folders) if d in folders] if folders else []
            elif p == "**":  # every path
                found = range(len(self.rel))
            else:
                found = [i for i in (self.candidates if _literal(p) else range(len(self.rel))) if rx.match(self.rel[i])]
            chosen.update(dict.fromkeys(found))
        return [self.files[i] for i in chosen]


def _literal(pattern):
    """The longest run of plain text in a glob pattern: every path it matches holds it."""
    return max(re.split(r"[*?/]+", re.sub(r"\[[^\]]*\]", "/", pattern)), key=len)


@functools.cache
def _regex(pattern):
    return re.compile(glob_translate(pattern))
