"""``fcmae embed DATA --checkpoint SOURCE --out FILE.parquet``: the pooled features of every image.

DATA is a folder (every image or array file under it, in sorted order), or anything the training
commands read as data (parquet/arrow files, a packed folder, a Hub dataset id). The features are
those of the checkpoint's kind: a classifier's timm pre-logits (the global average of the last
stage through the head's norm), an encoder's global average of its last stage (the k-NN monitor's
features). Images get the model's evaluation transform (its run's input size, crop and
normalisation). FILE.parquet holds one row per readable image: ``path`` (or ``#index`` for rows
without a path) and ``embedding`` (float32, fixed size). Unreadable files are named on stderr and
skipped; the command then exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..data import DataConfig, Reader, image_paths, load_images, path_of, report_unreadable, resolve_workers
from ..data.listing import SAMPLE_EXTENSIONS
from ..tasks import register_all
from ..training.config import exit_on_user_error
from ..weights.artifacts import identify


class Items(torch.utils.data.Dataset):
    """(image tensor, readable, index) for each file or dataset row; an unreadable one gives zeros."""

    def __init__(self, values, names, transform, reader: Reader, size: int):
        self.values, self.names, self.transform, self.reader, self.size = values, names, transform, reader, size
        self.errors = {}

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        try:
            return self.transform(self.reader(self.values[i])), True, i, ""
        except Exception as e:  # noqa: BLE001 - any decoder error: name the file, go on
            return torch.zeros(self.reader.in_chans, self.size, self.size), False, i, f"{type(e).__name__}: {e}"


def items_of(data: str, split: str, image_column: str | None) -> tuple[list, list[str]]:
    """(values to read, their names) of a folder's files or a dataset's rows."""
    if os.path.isdir(data) and not any(p.suffix in (".parquet", ".arrow") for p in Path(data).rglob("*")):
        paths = image_paths([data], SAMPLE_EXTENSIONS)
        return [str(p) for p in paths], [str(p) for p in paths]
    ds = load_images(DataConfig(data=data, train_split=split, image_column=image_column))
    values = list(ds["image"])
    return values, [path_of(v) or f"#{i}" for i, v in enumerate(values)]


@torch.no_grad()
def embed(args) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = identify(args.checkpoint)
    if found.kind.features is None:
        raise ValueError(f"{args.checkpoint} holds a {found.kind.name}: fcmae embed reads encoders and classifiers.")
    module, transform, info = found.kind.features(args.checkpoint)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module.to(device)
    values, names = items_of(args.data, args.split, args.image_column)
    items = Items(values, names, transform, Reader(info["in_chans"], info["channel_axis"]), info["input_size"])
    loader = torch.utils.data.DataLoader(
        items, batch_size=args.batch_size, num_workers=resolve_workers(args.num_workers)
    )
    rows, failed = [], []
    for images, ok, index, errors in loader:
        feats = module(images.to(device)).float().cpu()
        for f, good, i, error in zip(feats, ok.tolist(), index.tolist(), errors):
            (rows.append((names[i], f.numpy())) if good else failed.append((names[i], error)))
    dim = int(info["dim"])
    flat = pa.array([v for _, f in rows for v in f.tolist()], pa.float32())
    table = pa.table(
        {"path": pa.array([n for n, _ in rows], pa.string()), "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    print(f"embedded {len(rows)} of {len(names)} images with {info['model']} ({dim} features) into {out}")
    return report_unreadable(failed, len(names))


def main(argv: list[str] | None = None, prog: str = "fcmae embed") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", help="a folder of images, parquet/arrow files, a packed folder, or a Hub dataset id")
    parser.add_argument(
        "--checkpoint", required=True, help="a classifier or an encoder (a run folder, weights, hf-hub:)"
    )
    parser.add_argument("--out", required=True, help="the parquet file to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, help="DataLoader workers (default as for training)")
    parser.add_argument("--split", default="train", help="the split of a dataset (default train)")
    parser.add_argument("--image-column", help="the image column of a dataset")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    register_all()
    return exit_on_user_error(embed, args)
