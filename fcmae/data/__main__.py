"""Data utilities from the command line.

    fcmae data stats DIR [--channel-axis last|first] [--sample 1000] [--seed 0]
    fcmae data pack SRC --out DIR [--shard-size 512MB] [--format parquet|webdataset] [--workers N]
    fcmae data verify DIR

stats prints the per-channel mean and std of the .npy / .tif / .tiff arrays or images under DIR
(searched recursively, following symbolic links), as YAML and as flags to paste into a training
command. Values are in the units the transforms normalise: integer types scaled to [0, 1], floats as
stored. pack turns an image folder into parquet or webdataset shards with a manifest
(fcmae.data.pack); verify checks a packed folder's shards against its manifest and names the damaged
ones. ``python -m fcmae.data`` is the same command. A user error (no such folder, no files) exits
with status 2 and one line.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .arrays import ARRAY_EXTENSIONS, CHANNEL_AXES, channel_summary
from .listing import files_under


def list_files(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Files under root whose names end with one of extensions (any case), recursively, following
    symbolic links, sorted by path (fcmae.data.listing.files_under)."""
    return files_under(root, extensions)


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

    print(
        f"# {len(s.mean)} channel(s) over {s.pixels} pixels of {s.files} of the {len(files)} files in {args.dir}"
        + (f" ({s.bad} skipped)" if s.bad else "")
        + f"; channel axis {args.channel_axis}, seed {args.seed}"
    )
    print(f"mean: [{fmt(s.mean)}]")
    print(f"std: [{fmt(s.std)}]")
    print(f"# flags: --mean {fmt(s.mean).replace(' ', '')} --std {fmt(s.std).replace(' ', '')}")


def main(argv: list[str] | None = None, prog: str = "python -m fcmae.data") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser(
        "stats", allow_abbrev=False, help="per-channel mean and std of a folder of arrays or images"
    )
    stats.add_argument("dir")
    stats.add_argument(
        "--channel-axis",
        choices=CHANNEL_AXES,
        default="last",
        help="where .npy files (and TIFFs stored as page stacks) hold the channels (default: last)",
    )
    stats.add_argument("--sample", type=int, default=1000, help="files drawn at random (default: 1000)")
    stats.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    stats.add_argument(
        "--max-bad-fraction", type=float, default=0.01, help="fraction of unreadable files allowed (default: 0.01)"
    )
    from . import pack

    pack.add_pack_arguments(
        commands.add_parser(
            "pack", allow_abbrev=False, help="an image folder -> parquet / webdataset shards + manifest"
        )
    )
    check = commands.add_parser(
        "verify", allow_abbrev=False, help="check a packed folder's shards against its manifest"
    )
    check.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "pack":
        return pack.run_pack(args)
    if args.command == "verify":
        return pack.verify_main([args.dir])
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line per skipped file
    try:
        _stats(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
