"""Shard-aware streaming (fcmae.data.stream): the epoch plan, independence from workers and processes,
read-once counted on the processes' reads, bitwise mid-epoch resume that reads only the rest, elastic
resume, fewer shards than readers, corrupt shards and records, retries, fsspec URLs. CPU, offline.

Ranks are simulated in this process (a loader per rank, each with real DataLoader worker processes);
reads are counted by fcmae.data.shards' counting wrapper (FCMAE_COUNT_READS), workers included."""

import json
import os
import shutil
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import fsspec
import numpy as np
import pytest
import torch
from accelerate import skip_first_batches
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from fcmae.data import DataConfig, TooManyBadFiles, build_pretrain_loader, by_input, recon_images
from fcmae.data import shards as shards_module
from fcmae.data.pack import pack
from fcmae.data.shards import READS_ENV, discover, read_counts
from fcmae.data.stream import build_stream_loader, plan, read_bytes, readers_of

N = 256  # images; 32 px noise PNGs of ~3 KB whose first pixel holds the image's number
AUGMENT = by_input("pretrain", 32)


def identity(image):  # module level: DataLoader workers pickle it
    return pil_to_tensor(image)


def number(x) -> int:
    return int(x[0, 0, 0]) + 256 * int(x[1, 0, 0])


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(shards_module, "RETRY_DELAY", 0.0)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """7 parquet shards of ~37 rows, row groups of 4 rows (fcmae data pack)."""
    src = tmp_path_factory.mktemp("noise")
    for i in range(N):
        a = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        a[0, 0, :2] = (i % 256, i // 256)
        Image.fromarray(a).save(src / f"{i:04d}.png")
    out = tmp_path_factory.mktemp("packed")
    pack(str(src), str(out), shard_size="120KB", workers=1, row_group_size="12KB", log=lambda *_: None)
    return out


def loaders(out, world=1, workers=0, global_batch=16, partitions=4, window=8, transform=identity, seed=0, **kw):
    shards = discover(str(out))
    return [
        build_stream_loader(
            shards,
            transform,
            global_batch // world,
            workers,
            seed,
            rank=r,
            world_size=world,
            input_size=32,
            partitions=partitions,
            window=window,
            with_index=True,
            **kw,
        )
        for r in range(world)
    ]


def global_steps(ranks, start=None, state=None, steps=None):
    """Per step: (images, sample indices) of all ranks put together in rank order (the first ``steps``)."""
    for loader in ranks:
        if state is not None:
            loader.load_state_dict(state)
        elif start is not None:
            loader.start_at(*start)
    per_rank = [
        [(x.clone(), i.clone()) for _, (x, _, i) in zip(range(steps or len(loader)), loader)] for loader in ranks
    ]
    return [
        (torch.cat([r[k][0] for r in per_rank]), torch.cat([r[k][1] for r in per_rank]))
        for k in range(len(per_rank[0]))
    ]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(i, j) for (x, i), (y, j) in zip(a, b))


def shard_sizes(out):
    manifest = json.loads((out / "manifest.json").read_text())
    return {s["name"]: s["bytes"] for s in manifest["splits"]["train"]["shards"]}


# ----------------------------------------------------------------------------- the plan


def test_plan_is_a_pure_function_that_partitions_the_epoch():
    rows = [37, 37, 37, 5, 37, 40, 34]
    a = plan(rows, seed=3, epoch=2, partitions=4, chunk=3, window=5)
    assert a == plan(rows, 3, 2, 4, 3, 5) and a.order != plan(rows, 3, 3, 4, 3, 5).order
    assert a.length == sum(rows) // 12 * 3 and a.steps == a.length // 3
    taken = [(piece.shard, r) for part in a.pieces for piece in part for r in range(piece.start, piece.end)]
    assert len(taken) == len(set(taken)) == 4 * a.length and sum(rows) - len(taken) < 12  # the rest: < a batch
    for part in a.pieces:  # contiguous spans of the epoch's shard order
        assert sum(p.end - p.start for p in part) == a.length
    indices = sorted(a.sample_index(p, t) for p in range(4) for t in range(a.length))
    assert indices == list(range(4 * a.length))
    assert sorted(a.block_order(1, 2)) == list(range(5)) and a.block_order(1, 2) == a.block_order(1, 2)
    assert a.resume_rows(4)[0] == a.locate(0, 10)  # step 4 x chunk 3 = 12: its block starts at 10


# ----------------------------------------------------------------------------- order


def test_order_and_augmentation_depend_on_neither_workers_nor_processes(packed):
    reference = global_steps(loaders(packed, transform=AUGMENT), steps=3)  # augmented: bitwise equal images
    assert torch.equal(torch.cat([i for _, i in reference]), torch.arange(3 * 16))
    for world, workers in ((1, 2), (1, 3), (2, 3)):  # uneven runs of partitions; 2 x 3: an idle worker a rank
        assert same(global_steps(loaders(packed, world, workers, transform=AUGMENT), steps=3), reference), world
    epoch = global_steps(loaders(packed, 2, 1))  # the whole epoch, every image once
    assert sorted(number(x) for images, _ in epoch for x in images) == list(range(N // 16 * 16))
    assert not torch.equal(global_steps(loaders(packed, transform=AUGMENT, seed=1), steps=1)[0][0], reference[0][0])


# ----------------------------------------------------------------------------- read once


def test_two_processes_two_workers_read_each_shard_once(packed, tmp_path, monkeypatch):
    counts = tmp_path / "reads"
    monkeypatch.setenv(READS_ENV, str(counts))
    cfg = DataConfig(data=str(packed), streaming=True, input_size=32)
    seen = []
    for rank in (0, 1):  # the default P: 2 x gcd(8, 8) = 16 partitions, 4 readers
        loader = build_pretrain_loader(cfg, batch_size=8, num_workers=2, rank=rank, world_size=2, transform=identity)
        assert loader.partitions == 16 and len(loader) == N // 16
        seen += [number(x) for images, ok in loader for x in images]
    assert sorted(seen) == list(range(N))
    read, sizes = read_counts(str(counts)), shard_sizes(packed)
    assert set(read) == set(sizes)
    for name, size in sizes.items():  # one reader per shard, but for a boundary row group and the footer
        assert read[name] <= 1.1 * size, (name, read[name], size)
    assert sum(read.values()) <= 1.1 * sum(sizes.values())


# ----------------------------------------------------------------------------- resume


def test_resume_reads_the_rest_and_repeats_the_run_bitwise(packed, tmp_path, monkeypatch):
    """A demo loop of 2 simulated processes x 2 workers: SGD on a linear model over the global batch.
    Interrupted at 75 % of the epoch and resumed from the checkpointed stream position, it ends with
    bitwise the weights of the uninterrupted run, and reads the last quarter plus at most a block."""

    def train(weights, batches, steps):
        for _, (x, _) in zip(range(steps), batches):
            loss = (x.flatten(1) @ weights).square().mean()
            (grad,) = torch.autograd.grad(loss, weights)
            weights = (weights - 0.01 * grad).detach().requires_grad_()
        return weights

    stop, steps = 12, N // 16
    ranks = loaders(packed, 2, 2, transform=AUGMENT)
    batches = iter(_Global(ranks))
    half = train(torch.full((3 * 32 * 32,), 1e-3, requires_grad=True), batches, stop)
    state = json.loads(json.dumps(ranks[0].state_dict(epoch=0, batch=stop)))  # what position.json keeps
    full = train(half, batches, steps - stop)  # the uninterrupted run goes on

    counts = tmp_path / "reads"
    monkeypatch.setenv(READS_ENV, str(counts))
    resumed = loaders(packed, 2, 2, transform=AUGMENT)
    for loader in resumed:
        loader.load_state_dict(state)
    end = train(half, iter(_Global(resumed)), steps - stop)
    assert torch.equal(end, full)

    shards = discover(str(packed))
    p = resumed[0].plan(0)
    expected = read_bytes(p, shards, readers_of(4, 2, 2), first_step=stop)  # row groups from the resume blocks on
    footers = sum(size - sum(s.row_group_bytes) for s, size in zip(shards.shards, shard_sizes(packed).values()))
    read = sum(read_counts(str(counts)).values())
    assert read <= expected + footers and read < 0.4 * sum(shard_sizes(packed).values())


class _Global:
    """The ranks' batches of each step put together, as an all-reduce of their gradients would see them."""

    def __init__(self, ranks):
        self.ranks = ranks

    def __iter__(self):
        for batches in zip(*self.ranks):
            yield torch.cat([b[0] for b in batches]), torch.cat([b[2] for b in batches])


def test_start_at_and_skip_first_batches_give_the_same_batches(packed):
    reference = global_steps(loaders(packed, 1, 2))
    assert same(global_steps(loaders(packed, 1, 2), start=(0, 5)), reference[5:])
    loader = loaders(packed, 1, 0)[0]  # an unchanged loop: correct, but reads and decodes what it skips
    loader.set_epoch(0)
    skipped = [(x, i) for x, _, i in skip_first_batches(loader, 5)]
    assert same(skipped, reference[5:])


def test_elastic_resume_keeps_the_partitions_or_refuses(packed):
    reference = global_steps(loaders(packed, 2, 1))
    state = loaders(packed, 2, 1)[0].state_dict(0, 6)
    for world in (1, 4):  # the same global batch of 16 on 1 or 4 processes: the same samples at every step
        ranks = loaders(packed, world, 1, partitions=None)  # their own default P differs; the checkpoint's wins
        assert same(global_steps(ranks, state=state), reference[6:]), world
    with pytest.raises(ValueError, match=r"on 8 processes.*4 partitions \(--stream-partitions\)"):
        loaders(packed, 8, 0, partitions=8)[0].load_state_dict(state)
    with pytest.raises(ValueError, match=r"global batch.*was 16, now 32"):
        loaders(packed, 2, 0, global_batch=32)[0].load_state_dict(state)
    with pytest.raises(ValueError, match=r"--seed was 0, now 1"):
        loaders(packed, 2, 0, seed=1)[0].load_state_dict(state)
    with pytest.raises(ValueError, match=r"--stream-window"):
        loaders(packed, 2, 0, window=16)[0].load_state_dict(state)


# ----------------------------------------------------------------------------- fewer shards, bad data


def test_fewer_shards_than_readers_warns_with_the_amplification(packed, tmp_path):
    src = tmp_path / "few"
    src.mkdir()
    for f in sorted(packed.parent.glob("noise*/*.png"))[:64]:
        shutil.copy(f, src)
    out = tmp_path / "out"
    pack(str(src), str(out), shard_size="150KB", workers=1, row_group_size="12KB", log=lambda *_: None)
    assert len(discover(str(out)).shards) == 2
    with pytest.warns(
        UserWarning, match=r"2 shard\(s\) for 4 readers .*up to \d readers.*amplification about \d\.\d\dx"
    ):
        ranks = loaders(out, 2, 2)
    assert sorted(torch.cat([i for _, i in global_steps(ranks)]).tolist()) == list(range(64))


def test_a_corrupt_shard_and_a_corrupt_record_count_as_bad_and_are_named(packed, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(packed, out)
    victim = sorted((out / "train").glob("*.parquet"))[2]
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated: the footer is gone
    cfg = DataConfig(data=str(out), streaming=True, input_size=32, max_bad_fraction=0.5)
    with pytest.warns(UserWarning, match=rf"Shard .*{victim.name} could not be read"):
        oks = torch.cat([ok for _, ok in build_pretrain_loader(cfg, batch_size=16, transform=identity)])
    rows = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][2]["num_rows"]
    assert 0 < int((~oks).sum()) <= rows
    cfg.max_bad_fraction = 0.01
    with pytest.raises(TooManyBadFiles, match="could not be read"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(build_pretrain_loader(cfg, batch_size=16, transform=identity))

    src = tmp_path / "src"  # a record that is not an image
    src.mkdir()
    for f in sorted(packed.parent.glob("noise*/*.png"))[:31]:
        shutil.copy(f, src)
    (src / "0999_bad.png").write_bytes(b"not a png")
    pack(str(src), str(tmp_path / "p"), shard_size="40KB", workers=1, log=lambda *_: None)
    cfg = DataConfig(data=str(tmp_path / "p"), streaming=True, input_size=32, max_bad_fraction=0.5)
    with pytest.warns(UserWarning, match="Skipping unreadable image 0999_bad.png"):
        oks = torch.cat([ok for _, ok in build_pretrain_loader(cfg, batch_size=8, transform=identity)])
    assert int((~oks).sum()) == 1


class Flaky(MemoryFileSystem):
    """An in-memory object store whose opens of shards fail the first ``fail`` times, and always for
    the shard named ``dead``."""

    protocol = ("flaky",)
    fail, dead, opens = 2, None, {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        n = Flaky.opens[path] = Flaky.opens.get(path, 0) + 1
        if "r" in mode and path.endswith(".parquet") and (n <= Flaky.fail or (Flaky.dead and Flaky.dead in path)):
            raise ConnectionError(f"simulated network failure #{n} on {path}")
        return super()._open(path, mode, **kwargs)


def test_shards_at_fsspec_urls_with_retries(packed):
    reference = global_steps(loaders(packed, 1, 0), steps=4)
    assert same(global_steps(loaders(f"file://{packed}", 1, 0), steps=4), reference)
    memory = fsspec.filesystem("memory")
    memory.put(str(packed), "/ds", recursive=True)
    assert same(global_steps(loaders("memory://ds", 1, 2), steps=4), reference)
    assert recon_images(DataConfig(data="memory://ds", streaming=True, input_size=32), 2).shape == (2, 3, 32, 32)

    fsspec.register_implementation("flaky", Flaky, clobber=True)
    Flaky.fail, Flaky.opens = 2, {}  # two failures per shard, then success: the retries absorb them
    assert same(global_steps(loaders("flaky://ds", 1, 0), steps=4), reference)
    assert max(Flaky.opens.values()) >= 3
    Flaky.fail, Flaky.dead, Flaky.opens = 0, "shard-00003", {}  # never opens: named, and all its rows are bad
    with pytest.warns(
        UserWarning,
        match=r"Shard flaky:///?ds/train/shard-00003\.parquet could not be read.*after 4 "
        "tries",
    ):
        ranks = loaders("flaky://ds", 1, 0, max_bad_fraction=1.0)
        oks = torch.cat([ok for _, ok, _ in ranks[0]])
    assert Flaky.opens["/ds/train/shard-00003.parquet"] == 4 and 0 < int((~oks).sum()) <= 37
