"""Shard-aware streaming: each shard read once per epoch, an order that is a pure function of
(seed, epoch), and mid-epoch resume that reads only the rest of the epoch.

The epoch plan (`plan`) is a pure function of (shard row counts, seed, epoch, P, c, w):
- the shards are put in an order drawn from (seed, epoch), and their rows laid end to end: N rows;
- the rows are cut into P **partitions** (virtual streams) of L = (N // (P c)) c rows each, contiguous
  spans made of pieces (shard, first row, end row); the N - P L rows left over (fewer than the global
  batch P c) are dropped this epoch, a different part each epoch;
- inside a partition, consecutive **blocks** of w rows (the window) are each permuted by a generator
  seeded from (seed, epoch, partition, block): a seeded shuffle inside a bounded window;
- step k (a micro-batch of every process together, the global batch P c) takes positions
  [k c, (k + 1) c) of every partition: partition p, position t is global sample
  s = (t // c) P c + p c + t % c, augmented with the seed (seed, epoch, s) as every fcmae loader does.
So the samples of every step, their order and their augmentation depend neither on the number of
DataLoader workers nor on the number of processes: only on (seed, epoch, P, c, w) and the shards.

Who reads what: process r of W owns the m = P / W partitions r m ... (r + 1) m - 1 (W must divide P):
its batch of step k is global samples k P c + r m c ... k P c + (r + 1) m c - 1, a contiguous slice
of the global batch, so the batches of all processes put together in rank order are the same for
any W. Its DataLoader worker i of n owns a contiguous run of those partitions (`owned`): at every step
it yields one item, its partitions' chunks (c decoded and augmented rows each) concatenated, or None
when it owns none (more workers than partitions). torch's DataLoader hands worker outputs over
round-robin in order (batch_size None, in_order), so step k arrives as the next n items, in worker
order, which is partition order, whatever n; `StreamLoader` concatenates them (and checks that they
cover its partitions at step k). A reader (process, worker) thus reads a
contiguous span of the epoch's rows: with at least as many shards as readers, a shard is read by one
reader, but for the row group that straddles the boundary of two readers (the footers and row groups
its own partitions share are read once: `ReaderPool`). Workers beyond m idle.

P (`default_partitions`) is processes x gcd(per-process batch, 8) unless set (--stream-partitions):
it does not depend on the worker count, so neither does the order. It is kept in the checkpoint's
position (`StreamLoader.state_dict`), and a resume on another process count W' with the same global
batch takes it over when W' divides P: every step then holds the same samples as in the run that
wrote the checkpoint (losses equal up to the float order of the gradient reduction).

Resume: (epoch, step) gives every partition's position k c; reading restarts at the first row of the
block that holds it, so resuming at 75 % of an epoch reads the last 25 % plus at most a block per
partition, and yields bitwise the batches of the uninterrupted run (`StreamLoader.start_at`,
`state_dict` / `load_state_dict`).

Memory: each worker holds one block (w rows, still encoded) per partition it owns, and the parquet row
groups its partitions share.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN

from .arrays import Reader
from .samples import MAX_NAMED, ImageSamples, check_bad_fraction, sample_seed
from .shards import ShardSet

STATE_FORMAT = "fcmae-stream/1"
ORDER_WORD, BLOCK_WORD = 0x5348524F, 0x424C4B50  # keep the order and block seeds apart from sample seeds


@dataclass(frozen=True)
class Piece:
    shard: int  # index in the ShardSet
    start: int  # first row in the shard
    end: int  # one past the last row


@dataclass(frozen=True)
class Plan:
    seed: int
    epoch: int
    partitions: int  # P
    chunk: int  # c: rows of a partition per step
    window: int  # w: rows of a shuffle block
    length: int  # L: rows of each partition
    order: tuple[int, ...]  # the shards in this epoch's order
    pieces: tuple[tuple[Piece, ...], ...]  # per partition

    @property
    def steps(self) -> int:
        return self.length // self.chunk

    @property
    def global_batch(self) -> int:
        return self.partitions * self.chunk

    def sample_index(self, p: int, t: int) -> int:
        return (t // self.chunk) * self.global_batch + p * self.chunk + t % self.chunk

    def block_order(self, p: int, b: int) -> list[int]:
        """The permutation of block b of partition p: position b w + j reads row b w + perm[j]."""
        n = min(self.window, self.length - b * self.window)
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, p, b, BLOCK_WORD))
        return torch.randperm(n, generator=g).tolist()

    def locate(self, p: int, row: int) -> tuple[int, int]:
        """(shard index, row in the shard) of row ``row`` of partition p (before the block shuffle)."""
        for piece in self.pieces[p]:
            if row < piece.end - piece.start:
                return piece.shard, piece.start + row
            row -= piece.end - piece.start
        raise IndexError(row)

    def resume_rows(self, step: int) -> list[tuple[int, int]]:
        """Per partition, (shard, row) where reading restarts at ``step``: the block holding step c."""
        return [
            self.locate(p, (step * self.chunk // self.window) * self.window) if step < self.steps else (-1, -1)
            for p in range(self.partitions)
        ]


def plan(num_rows: list[int], seed: int, epoch: int, partitions: int, chunk: int, window: int) -> Plan:
    """The epoch plan (module docstring): a pure function of its arguments."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, ORDER_WORD))
    order = torch.randperm(len(num_rows), generator=g).tolist()
    length = sum(num_rows) // (partitions * chunk) * chunk
    pieces, current, need = [], [], length
    for shard in order:
        start, end = 0, num_rows[shard]
        while start < end and len(pieces) < partitions:
            take = min(end - start, need)
            if take:
                current.append(Piece(shard, start, start + take))
            start, need = start + take, need - take
            if need == 0:
                pieces.append(tuple(current))
                current, need = [], length
        if len(pieces) == partitions:
            break
    return Plan(seed, epoch, partitions, chunk, window, length, tuple(order), tuple(pieces))


def readers_of(partitions: int, world_size: int, workers: int) -> list[list[int]]:
    """The partitions each reader (process, worker) owns: contiguous runs, process by process."""
    m = partitions // world_size
    return [
        owned(list(range(r * m, (r + 1) * m)), i, max(1, workers))
        for r in range(world_size)
        for i in range(min(m, max(1, workers)))
    ]


def owned(mine: list[int], worker: int, workers: int) -> list[int]:
    """Worker ``worker`` of ``workers``'s contiguous run of a process's partitions ``mine``."""
    bounds = [len(mine) * i // workers for i in range(workers + 1)]
    return mine[bounds[worker] : bounds[worker + 1]]


def read_bytes(p: Plan, shards: ShardSet, readers: list[list[int]], first_step: int = 0) -> int | None:
    """Bytes an epoch reads from the shards, from ``first_step`` on, when each group of partitions in
    ``readers`` is read by one reader: its parquet row groups counted once per reader (tar shards: the
    rows' share of the file). None without sizes."""
    total = 0
    start = (first_step * p.chunk // p.window) * p.window
    for parts in readers:
        seen = set()
        for part in parts:
            offset = 0
            for piece in p.pieces[part]:
                a, b = max(piece.start, piece.start + start - offset), piece.end
                offset += piece.end - piece.start
                if a >= b:
                    continue
                shard = shards.shards[piece.shard]
                if shard.row_groups is None or shard.row_group_bytes is None:
                    if shard.bytes is None:
                        return None
                    total += shard.bytes * (b - a) // max(1, shard.num_rows)
                    continue
                lo = 0
                for g, (n, size) in enumerate(zip(shard.row_groups, shard.row_group_bytes)):
                    if lo < b and lo + n > a and (piece.shard, g) not in seen:
                        seen.add((piece.shard, g))
                        total += size
                    lo += n
    return total


# ----------------------------------------------------------------------------- the workers' side


class Unreadable:
    """A row whose shard could not be read: counted as a bad image; the shard is named once."""

    def __init__(self, name: str):
        self.name = name


class ReaderPool:
    """A worker's open shards. Parquet shards are opened once per worker, whatever the number of its
    partitions they feed, and keep the row groups two of its partitions share (read once); a tar
    shard gets a reader per partition (tar reads forward). A shard that fails is named once and its
    rows come back `Unreadable`."""

    def __init__(self, shards: ShardSet, p: Plan, parts: list[int], warn):
        self.shards, self.warn, self.readers, self.broken = shards, warn, {}, set()
        self.users: dict = {}  # reader key -> the partitions still to read from it
        self.ranges: dict = {}  # parquet shard -> [(partition, first row, end row)]
        for part in parts:
            for piece in p.pieces[part]:
                self.users.setdefault(self._key(piece.shard, part), set()).add(part)
                self.ranges.setdefault(piece.shard, []).append((part, piece.start, piece.end))

    def _key(self, shard: int, part: int):
        return shard if self.shards.format == "parquet" else (shard, part)

    def rows(self, shard: int, part: int, a: int, z: int) -> list:
        key = self._key(shard, part)
        if shard not in self.broken:
            reader = self.readers.get(key)
            if reader is None:
                reader = self.readers[key] = self.shards.reader(shard)
                if self.shards.format == "parquet":
                    reader.share(self.ranges[shard])
            try:
                return reader.rows(a, z, part)
            except Exception as e:  # noqa: BLE001 - OSError after retries, a corrupt file (ValueError, ArrowInvalid)
                self.broken.add(shard)
                self.readers.pop(key).close()
                self.warn(
                    f"Shard {self.shards.shards[shard].url} could not be read ({type(e).__name__}: {e}); "
                    "its rows count as unreadable images."
                )
        return [Unreadable(f"{self.shards.shards[shard].name}#{row}") for row in range(a, z)]

    def release(self, shard: int, part: int) -> None:
        """Partition ``part`` has moved past ``shard``: close it once no partition needs it."""
        key = self._key(shard, part)
        users = self.users.get(key, set())
        users.discard(part)
        if not users and key in self.readers:
            self.readers.pop(key).close()

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()


class PartitionCursor:
    """Rows of one partition, block by block, in the plan's shuffled order."""

    def __init__(self, pool: ReaderPool, p: Plan, part: int):
        self.pool, self.plan, self.part = pool, p, part
        self.block, self.values, self.order, self.open = -1, [], [], set()

    def take(self, t0: int, t1: int) -> list:
        out = []
        for t in range(t0, t1):
            b = t // self.plan.window
            if b != self.block:
                self._load(b)
            out.append(self.values[self.order[t - b * self.plan.window]])
        return out

    def _load(self, b: int) -> None:
        w = self.plan.window
        first, last = b * w, min((b + 1) * w, self.plan.length)
        values, offset, now = [], 0, set()
        for piece in self.plan.pieces[self.part]:
            n = piece.end - piece.start
            a, z = max(first - offset, 0), min(last - offset, n)
            offset += n
            if offset <= first:  # a piece this partition has moved past
                if piece.shard not in now:
                    self.pool.release(piece.shard, self.part)
                continue
            if a >= z:
                continue
            now.add(piece.shard)
            values.extend(self.pool.rows(piece.shard, self.part, piece.start + a, piece.start + z))
        self.block, self.values, self.order = b, values, self.plan.block_order(self.part, b)


class StreamChunks(ImageSamples, torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: for every step from ``start`` on, the chunks of the worker's
    run of partitions (`owned`) as one item (images (n c, C, S, S), ok (n c,), sample index (n c,),
    step, first partition, n), or None for a worker without partitions. Bad-image accounting and
    stand-ins as `StreamingPretrainImages`: an unreadable row is counted and another image of the same
    chunk stands in."""

    def __init__(
        self,
        shards: ShardSet,
        transform,
        partitions: int,
        chunk: int,
        window: int,
        input_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_bad_fraction: float = 0.01,
        reader: Reader | None = None,
        mean=None,
    ):
        super().__init__(None, transform, seed, max_bad_fraction, reader)
        self.shards, self.partitions, self.chunk, self.window = shards, partitions, chunk, window
        self.input_size, self.mean = input_size, list(mean or IMAGENET_DEFAULT_MEAN)
        self.rank, self.world_size, self.start = rank, world_size, 0
        self.num_rows = [s.num_rows for s in shards.shards]
        self._plans: dict = {}

    def plan(self, epoch: int) -> Plan:
        if epoch not in self._plans:
            if len(self._plans) > 1:  # keep two: this epoch's and the one a checkpoint may ask for
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = plan(self.num_rows, self.seed, epoch, self.partitions, self.chunk, self.window)
        return self._plans[epoch]

    @property
    def mine(self) -> list[int]:
        m = self.partitions // self.world_size
        return list(range(self.rank * m, (self.rank + 1) * m))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        p, mine = self.plan(self.epoch), self.mine
        parts = owned(mine, worker, workers)
        pool = ReaderPool(self.shards, p, parts, self._warn)
        cursors = [PartitionCursor(pool, p, part) for part in parts]
        try:
            for k in range(self.start, p.steps):
                if not parts:  # an idle worker (more workers than partitions) still answers every step
                    yield None
                    continue
                images, ok, index = [], [], []
                for c in cursors:
                    x, good, s = self._chunk(p, k, c.part, c.take(k * p.chunk, (k + 1) * p.chunk))
                    images, ok, index = images + x, ok + good, index + s
                yield torch.stack(images), torch.tensor(ok), torch.tensor(index), k, parts[0], len(parts)
        finally:
            pool.close()

    def _warn(self, message: str) -> None:
        warnings.warn(message, stacklevel=2)

    def _decode(self, value, index: int):
        if isinstance(value, Unreadable):  # its shard was named in a warning already
            self.num_seen, self.num_bad = self.num_seen + 1, self.num_bad + 1
            if len(self.bad_files) < MAX_NAMED:
                self.bad_files.append(value.name)
            check_bad_fraction(self.num_bad, self.num_seen, self.max_bad_fraction)
            return None
        return self.decode(value, index)

    def _chunk(self, p: Plan, k: int, part: int, values: list) -> tuple[list, list, list]:
        """(augmented images, ok flags, sample indices) of partition ``part``'s chunk of step k."""
        index = [p.sample_index(part, t) for t in range(k * p.chunk, (k + 1) * p.chunk)]
        images = [self._decode(v, s) for v, s in zip(values, index)]
        good = [im for im in images if im is not None]
        if not good:  # a whole chunk unreadable: the mean in every pixel (zeros after normalisation)
            good = [self.reader.stand_in(self.input_size, self.mean)]
        out = [
            self.augment(good[i % len(good)] if im is None else im, p.epoch, s)
            for i, (im, s) in enumerate(zip(images, index))
        ]
        return out, [im is not None for im in images], index


# ----------------------------------------------------------------------------- the main process's side


class _Batches(torch.utils.data.IterableDataset):
    """The loader's batches as a dataset, so that ``accelerate.skip_first_batches(loader, n)`` still
    yields the right batches (it rebuilds a loader over ``loader.dataset``), reading and decoding the
    n skipped ones; `StreamLoader.start_at` skips them without reading."""

    def __init__(self, loader: StreamLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


class StreamLoader:
    """This process's batches of the stream: ``(images (B, C, S, S), ok (B,))`` per step, B = P c / W
    (with ``with_index``: also the global sample index of each image, (B,) int64).

    The loop's side: ``set_epoch(epoch)`` before each epoch, ``len(loader)`` steps per epoch;
    ``start_at(epoch, batch)`` to resume at a micro-batch of an epoch without reading what comes
    before it; ``state_dict(epoch, batch)`` into the checkpoint, ``load_state_dict(state)`` on resume
    (checks that the data, the seed, the window and the global batch are those of the checkpoint, and
    takes over its partition count P). Do not ``accelerator.prepare`` it: it already holds this
    process's share."""

    batch_size, drop_last, num_workers, prefetch_factor = None, False, 0, None  # read by accelerate.skip_first_batches

    def __init__(
        self,
        chunks: StreamChunks,
        workers: int = 0,
        pin_memory: bool = False,
        with_index: bool = False,
        timeout: float = 0,
    ):
        self.chunks, self.workers, self.pin_memory, self.with_index, self.timeout = (
            chunks,
            workers,
            pin_memory,
            with_index,
            timeout,
        )
        self.epoch, self._start = 0, (0, 0)
        self.dataset = _Batches(self)

    # -- the plan's facts
    @property
    def partitions(self) -> int:
        return self.chunks.partitions

    @property
    def global_batch(self) -> int:
        return self.chunks.partitions * self.chunks.chunk

    def plan(self, epoch: int | None = None) -> Plan:
        return self.chunks.plan(self.epoch if epoch is None else epoch)

    def __len__(self) -> int:
        return self.chunks.shards.num_rows // self.global_batch  # every epoch: its plan's steps

    # -- epochs and positions
    def set_epoch(self, epoch: int) -> None:
        if self._start[0] != epoch:
            self._start = (epoch, 0)
        self.epoch = epoch

    def start_at(self, epoch: int, batch: int) -> StreamLoader:
        """The next iteration yields batches ``batch``, ``batch`` + 1, ... of ``epoch``, reading only
        from the block that holds ``batch`` on. Returns the loader."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"batch {batch} is outside an epoch of {len(self)} batches")
        self.epoch, self._start = epoch, (epoch, batch)
        return self

    def __iter__(self):
        epoch, start = self._start if self._start[0] == self.epoch else (self.epoch, 0)
        self._start = (self.epoch, 0)  # one resumed iteration; the next starts at the epoch's beginning
        chunks = self.chunks
        chunks.set_epoch(epoch)
        chunks.start = start
        loader = torch.utils.data.DataLoader(
            chunks,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            timeout=self.timeout,
            generator=torch.Generator().manual_seed(chunks.seed),
        )
        items = max(1, self.workers)  # one item per worker and step: its partitions' chunks, or None
        mine, k, parts, got = chunks.mine, start, [], 0
        for item in loader:
            got += 1
            if item is not None:
                parts.append(item)
            if got < items:
                continue
            covered = [(int(x[3]), int(x[4]) + i) for x in parts for i in range(int(x[5]))]
            if covered != [(k, part) for part in mine]:
                raise RuntimeError(
                    f"stream chunks out of order at step {k} of process {chunks.rank}: got (step, "
                    f"partition) {covered}; the DataLoader must hand worker outputs over in order"
                )
            images, ok, index = (torch.cat(x) if len(parts) > 1 else x[0] for x in list(zip(*parts))[:3])
            parts, got, k = [], 0, k + 1
            yield (images, ok, index) if self.with_index else (images, ok)
        if k != len(self):
            raise RuntimeError(
                f"process {chunks.rank}'s stream ended after step {k} of {len(self)}; did the shards "
                "change while reading?"
            )

    def state_dict(self, epoch: int, batch: int) -> dict:
        """What a checkpoint keeps to resume at micro-batch ``batch`` of ``epoch`` (plain types): the
        plan's facts and, per partition, the shard and row where reading restarts."""
        p = self.plan(epoch)
        shards = self.chunks.shards.shards
        return {
            "format": STATE_FORMAT,
            "epoch": epoch,
            "batch": batch,
            "seed": self.chunks.seed,
            "partitions": p.partitions,
            "chunk": p.chunk,
            "window": p.window,
            "global_batch": p.global_batch,
            "steps": p.steps,
            "shards": self.chunks.shards.fingerprint(),
            "num_shards": len(shards),
            "num_rows": self.chunks.shards.num_rows,
            "resume": [[shards[s].name, row] if s >= 0 else None for s, row in p.resume_rows(batch)],
        }

    def load_state_dict(self, state: dict) -> StreamLoader:
        """Check a checkpoint's stream position against this loader and start at it. Another process
        or worker count works when it divides the checkpoint's partition count (the batches of every
        step then hold the same samples); anything else is refused with one line saying what to do."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"The checkpoint's data position is not a stream position ({state.get('format')!r}): "
                "it was written by a run without --streaming, or an older fcmae."
            )
        shards = self.chunks.shards
        checks = [
            (
                "the data",
                state["shards"],
                shards.fingerprint(),
                f"{state['num_shards']} shards / {state['num_rows']} rows then, {len(shards.shards)} / "
                f"{shards.num_rows} now: resume with the same --data",
            ),
            ("--seed", state["seed"], self.chunks.seed, "resume with the same --seed"),
            (
                "the global batch (--batch-size x processes)",
                state["global_batch"],
                self.global_batch,
                "keep --batch-size x processes equal to the checkpoint's",
            ),
            (
                "the shuffle window (--stream-window)",
                state["window"],
                self.chunks.window,
                "resume with the same --stream-window",
            ),
        ]
        for what, then, now, fix in checks:
            if then != now:
                raise ValueError(f"Cannot resume the stream: {what} was {then}, now {now} ({fix}).")
        world, partitions = self.chunks.world_size, state["partitions"]
        if partitions % world:
            raise ValueError(
                f"Cannot resume the stream on {world} processes: its {partitions} partitions "
                f"(--stream-partitions) must be a multiple of the process count; resume on a "
                f"divisor of {partitions} processes."
            )
        if partitions != self.partitions:
            self.chunks.partitions, self.chunks.chunk = partitions, state["global_batch"] // partitions
            self.chunks._plans = {}
            check_workers(partitions // world, self.workers)
        saved = state["resume"]
        now = self.state_dict(state["epoch"], state["batch"])["resume"]
        if saved != now:
            raise ValueError(
                "Cannot resume the stream: this fcmae plans the epoch differently from the one that "
                "wrote the checkpoint (the rows where each partition resumes differ)."
            )
        return self.start_at(state["epoch"], state["batch"])


# ----------------------------------------------------------------------------- building


def default_partitions(world_size: int, batch_size: int) -> int:
    """P = processes x gcd(per-process batch, 8): up to 8 readers per process, whatever the worker
    count (so the order does not depend on it); --stream-partitions for more."""
    return world_size * math.gcd(batch_size, 8)


def check_workers(per_rank: int, num_workers: int) -> None:
    if num_workers > per_rank:
        warnings.warn(
            f"--num-workers {num_workers} is more than this process's {per_rank} stream partition(s): "
            f"{num_workers - per_rank} worker(s) will have nothing to read. Set --stream-partitions to a "
            f"multiple of processes x {num_workers} that divides the global batch, or use fewer workers.",
            stacklevel=3,
        )


def build_stream_loader(
    shards: ShardSet,
    transform,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    input_size: int = 224,
    partitions: int | None = None,
    window: int = 1024,
    max_bad_fraction: float = 0.01,
    reader: Reader | None = None,
    mean=None,
    pin_memory: bool = False,
    with_index: bool = False,
) -> StreamLoader:
    """A `StreamLoader` of ``shards`` for process ``rank`` of ``world_size``, set to ``epoch``.
    ``partitions`` (P, default `default_partitions`) must be a multiple of world_size and divide the
    global batch batch_size x world_size."""
    global_batch = batch_size * world_size
    default = partitions is None
    partitions = default_partitions(world_size, batch_size) if default else partitions
    flag = "" if default else f" (--stream-partitions {partitions})"
    if partitions < 1 or partitions % world_size or global_batch % partitions:
        raise ValueError(
            f"{partitions} stream partitions{flag} must be a multiple of the {world_size} process(es) "
            f"and divide the global batch {global_batch} (--batch-size {batch_size} x {world_size})."
        )
    if window < 1:
        raise ValueError(f"--stream-window must be at least 1, got {window}.")
    if shards.num_rows // global_batch == 0:
        raise ValueError(
            f"{shards.num_rows} images are too few for batch size {batch_size} on {world_size} "
            "process(es) (batches are full, and the incomplete last one is dropped). Lower the batch size."
        )
    chunk = global_batch // partitions
    check_workers(partitions // world_size, num_workers)
    groups = readers_of(partitions, world_size, num_workers)
    if len(shards.shards) < len(groups):
        p0 = plan([s.num_rows for s in shards.shards], seed, epoch, partitions, chunk, window)
        total, read = shards.num_bytes, read_bytes(p0, shards, groups)
        amp = f"about {read / total:.2f}x" if total and read is not None else "unknown"
        spans = [{piece.shard for part in g for piece in p0.pieces[part]} for g in groups]
        most = max(sum(s in span for span in spans) for s in range(len(shards.shards)))
        warnings.warn(
            f"{len(shards.shards)} shard(s) for {len(groups)} readers ({world_size} process(es) x "
            f"{len(groups) // world_size} worker(s)): neighbouring readers share shards, a shard is read by "
            f"up to {most} readers (parquet: only the row groups each needs); read amplification {amp} this "
            "epoch. More, smaller shards avoid it (fcmae data pack --shard-size).",
            stacklevel=2,
        )
    chunks = StreamChunks(
        shards, transform, partitions, chunk, window, input_size, seed, rank, world_size, max_bad_fraction, reader, mean
    )
    loader = StreamLoader(chunks, num_workers, pin_memory, with_index)
    loader.set_epoch(epoch)
    return loader
