"""Data utilities from the command line.

    python -m fcmae.data stats DIR [--channel-axis last|first] [--sample 1000] [--seed 0]

prints the per-channel mean and std of the .npy / .tif / .tiff arrays or images under DIR (searched
recursively, following symbolic links), as YAML and as flags to paste into a training command. Values
are in the units the transforms normalise: integer types scaled to [0, 1], floats as stored.
A user error (no such folder, no files) exits with status 2 and one line.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .arrays import ARRAY_EXTENSIONS, CHANNEL_AXES, channel_summary


def list_files(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Files under root whose names end with one of extensions (any case), recursively, following
    symbolic links (each real folder once, so a link loop ends), sorted by path."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root!r} is not a folder; give the folder that holds the arrays or images.")
    found, seen, todo = [], set(), [root]
    while todo:
        folder = todo.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # hidden files and folders (.git, .cache) hold no samples, as datasets skips them
                if entry.is_dir(follow_symlinks=True):
                    if not entry.name.startswith("__"):  # __MACOSX, __pycache__: skipped by datasets too
                        todo.append(entry.path)
                elif entry.is_file(follow_symlinks=True) and entry.name.lower().endswith(extensions):
                    found.append(entry.path)
    return sorted(found)


def _stats(args) -> None:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder  # the image types datasets reads

    extensions = tuple(sorted(set(ARRAY_EXTENSIONS) | set(ImageFolder.EXTENSIONS)))
    files = list_files(args.dir, extensions)
    if not files:
        raise FileNotFoundError(f"No files in {args.dir!r}; expected arrays or images ({' '.join(extensions)}).")
    if args.sample < 1:
        raise ValueError(f"--sample must be at least 1, got {args.sample}.")
    s = channel_summary(files, args.channel_axis, args.sample, args.seed, args.max_bad_fraction)

    def fmt(values):
        return ", ".join(f"{v:.6g}" for v in values)

    print(f"# {len(s.mean)} channel(s) over {s.pixels} pixels of {s.files} of the {len(files)} files in {args.dir}"
          + (f" ({s.bad} skipped)" if s.bad else "") + f"; channel axis {args.channel_axis}, seed {args.seed}")
    print(f"mean: [{fmt(s.mean)}]")
    print(f"std: [{fmt(s.std)}]")
    print(f"# flags: --mean {fmt(s.mean).replace(' ', '')} --std {fmt(s.std).replace(' ', '')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcmae.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="per-channel mean and std of a folder of arrays or images")
    stats.add_argument("dir")
    stats.add_argument("--channel-axis", choices=CHANNEL_AXES, default="last",
                       help="where .npy files (and TIFFs stored as page stacks) hold the channels (default: last)")
    stats.add_argument("--sample", type=int, default=1000, help="files drawn at random (default: 1000)")
    stats.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    stats.add_argument("--max-bad-fraction", type=float, default=0.01,
                       help="fraction of unreadable files allowed (default: 0.01)")
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line per skipped file
    try:
        _stats(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
