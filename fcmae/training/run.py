"""The helpers every task's loop is built of, in the order a loop uses them: ``start`` a run,
``schedule`` it, ``restore`` its position, walk its ``micro_batches`` (reseeding and setting the lr
at each optimizer step), take each optimizer ``step`` (counting it, logging at ``--log-every``),
keep its ``Health`` on the device, ``log`` rows, and ``finish`` it.

Exact resume: data order and augmentation are pure functions of (seed, epoch, index) (fcmae.data);
every random draw of a step (masks, drop path, Mixup) comes from the global RNGs reseeded at the
step's first micro-batch from (seed, step, rank); the lr is a function of the step. So a run resumed
from a checkpoint at step S repeats the uninterrupted run's steps S+1... bit for bit on the same
hardware.
"""
from __future__ import annotations

import importlib.util
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ..data import check_bad_fraction
from ..weights.hub import export_and_push
from .config import save_yaml
from .optim import lr_at, optimizer_step, set_lr
from .distributed import accelerator_kwargs, after_prepare, configure, distributed_name
from .state import complete_checkpoints, fault_point, resolve_resume, trim_log

REPLICATED = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


@dataclass
class Position:
    """Where a run is: saved with every checkpoint (plain types only), restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch consumed
    num_bad: int = 0  # unreadable images, all processes
    num_seen: int = 0
    loss_sum: float = 0.0  # loss summed since the last log row (all processes)
    loss_steps: int = 0  # the optimizer steps that sum covers
    best: dict = field(default_factory=dict)  # a task's best metrics so far


@dataclass
class Schedule:
    total: int  # optimizer steps
    warmup: int
    lr: float  # peak, absolute
    min_lr: float
    steps_per_epoch: int
    grad_accum: int
    eff_batch: int
    kind: str = "cosine"  # cosine | poly (power 1) | step (x0.1 at each milestone)
    milestones: tuple[int, ...] = ()  # steps, for kind step

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.total, self.warmup, self.lr, self.min_lr, self.kind, self.milestones)

    @property
    def per_epoch(self) -> int:  # micro-batches per epoch
        return self.steps_per_epoch * self.grad_accum


class Run:
    """A started run: the accelerator, the output folder, and the few facts every helper needs."""

    def __init__(self, cfg, project: str, wrap=()):
        cfg.validate()
        self.cfg, self.project, self.wrap = cfg, project, tuple(wrap)
        self.out = Path(cfg.output_dir)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=trackers(cfg.report_to),
                                       project_dir=str(self.out), **accelerator_kwargs(self.wrap))
        configure(self.accelerator, self.wrap)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and self.device.type == "cuda"
        set_seed(cfg.seed)  # identical initial weights on every rank
        self.bar = None

    def say(self, msg: str) -> None:
        self.accelerator.print(f"[fcmae] {msg}")

    def prepare(self, model, optimizer, *loaders, shard_loaders: bool = True):
        """Compile (in place: parameter names stay), shard (FSDP2) or wrap (DDP), and let Accelerate
        shard the loaders across processes (``shard_loaders=False``: each already holds its share)."""
        model = model.to(self.device)
        if self.cfg.compile:
            model.compile()
        model, optimizer, *rest = self.accelerator.prepare(model, optimizer, *(loaders if shard_loaders else ()))
        return (after_prepare(self.accelerator, model, self.wrap), optimizer, *(rest if shard_loaders else loaders))

    def schedule(self, batches_per_epoch: int, kind: str = "cosine", milestones: tuple[int, ...] = ()) -> Schedule:
        cfg = self.cfg
        steps_per_epoch = batches_per_epoch // cfg.grad_accum
        if steps_per_epoch < 1:
            raise ValueError(f"One epoch gives {batches_per_epoch} batches per process, fewer than --grad-accum "
                             f"{cfg.grad_accum}: use a smaller batch size or accumulation.")
        total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else cfg.max_steps
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
        eff_batch = cfg.batch_size * cfg.grad_accum * self.world
        lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
        self.say(f"{self.world} process(es) on {self.device} ({distributed_name(self.accelerator)}) | effective "
                 f"batch {eff_batch} ({cfg.batch_size} x {cfg.grad_accum} accum x {self.world}) | lr {lr:.3g}"
                 + ("" if cfg.lr is not None else f" = blr {cfg.blr:g} x {eff_batch} / 256")
                 + f" | {total} steps ({steps_per_epoch}/epoch), warmup {warmup}")
        return Schedule(total, warmup, lr, cfg.min_lr, steps_per_epoch, cfg.grad_accum, eff_batch, kind,
                        tuple(milestones))

    def restore(self, pos: Position) -> Path | None:
        """Load the checkpoint ``--resume`` names into the prepared objects and ``pos``."""
        ckpt = resolve_resume(self.cfg.resume, self.out)
        if ckpt is not None:
            self.accelerator.load_state(str(ckpt))
            for k, v in json.loads((ckpt / "position.json").read_text()).items():
                setattr(pos, k, v)
            self.say(f"resumed from {ckpt} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")
        elif self.cfg.resume and self.cfg.resume != "auto":
            raise FileNotFoundError(f"--resume {self.cfg.resume}: nothing to resume from.")
        return ckpt

    def write_config(self, sched: Schedule, pos: Position, **extra) -> dict:
        """config.yaml (the resolved config), the trackers' config, and a log without the rows a
        resumed run repeats. Returns the resolved config."""
        resolved = {**asdict(self.cfg), **extra, "world_size": self.world,
                    "distributed_type": distributed_name(self.accelerator), "effective_batch_size": sched.eff_batch,
                    "abs_lr": sched.lr, "steps_per_epoch": sched.steps_per_epoch, "total_steps": sched.total,
                    "warmup_steps_resolved": sched.warmup}
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_yaml(resolved, self.out / "config.yaml")
            trim_log(self.out / "log.jsonl", lambda row: row["step"] <= pos.step)
        self.accelerator.init_trackers(self.project, config={k: v for k, v in resolved.items()
                                                             if isinstance(v, (int, float, str, bool))})
        self.bar = tqdm(total=sched.total, initial=pos.step, disable=not self.accelerator.is_local_main_process,
                        desc=self.project, dynamic_ncols=True)
        return resolved

    def step(self, model, optimizer, pos: Position, sched: Schedule, health: "Health", log: bool = True) -> None:
        """The optimizer step after the last micro-batch: clip, step, zero the gradients; count the
        step (rolling over to the next epoch after its last batch); at ``--log-every`` steps (with
        ``log``) check the health and log the mean loss, the lr and the throughput."""
        optimizer_step(self.accelerator, model, optimizer, self.cfg.clip_grad)
        self.end_step(pos, sched)
        if log and due(pos.step, self.cfg.log_every, sched.total):
            health.check(pos)
            loss, ips = health.take_loss(pos)
            self.log(dict(step=pos.step, epoch=pos.epoch + pos.batch / sched.per_epoch, loss=loss,
                          lr=max(g["lr"] for g in optimizer.param_groups), images_per_sec=ips))

    def end_step(self, pos: Position, sched: Schedule) -> None:
        """Count an optimizer step, and roll over to the next epoch after its last batch."""
        pos.step += 1
        fault_point("step", pos.step)
        self.bar.update(1)
        if pos.batch >= sched.per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0

    def log(self, row: dict) -> None:
        if self.is_main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "lr", "mIoU", "acc1")})
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def finish(self, pos: Position, module: torch.nn.Module, **final) -> None:
        """final.yaml, after checking that replicated training left every rank the same weights."""
        self.bar.close()
        same = ranks_identical(self.accelerator, module)
        if self.is_main:
            save_yaml({"step": pos.step, "epochs": pos.epoch, "world_size": self.world,
                       "distributed_type": distributed_name(self.accelerator), "ranks_identical": same,
                       "num_bad": pos.num_bad, "num_seen": pos.num_seen, **pos.best, **final},
                      self.out / "final.yaml")
        if same is False:
            raise RuntimeError("Parameters differ across processes at the end of training: distributed sync is broken.")

    def push(self, checkpoint, **export_kwargs) -> None:
        """``--push-to-hub``: export ``checkpoint`` and upload it (main process)."""
        if self.cfg.push_to_hub and self.is_main:
            datasets = [self.cfg.dataset_name] if self.cfg.dataset_name else ()
            url = export_and_push(checkpoint, self.cfg.push_to_hub, private=self.cfg.hub_private, datasets=datasets,
                                  **export_kwargs)
            self.say(f"pushed to {url}")

    def close(self) -> None:
        """Teardown. The caller drops its model/optimizer/loader references first: a gloo run that
        still holds them sometimes aborts (SIGABRT) at exit after all work is done."""
        self.accelerator.free_memory()
        self.accelerator.end_training()


def start(cfg, project: str, wrap=()) -> Run:
    """Validate ``cfg`` and set up Accelerate. ``wrap``: the module classes FSDP2 shards as units."""
    return Run(cfg, project, wrap)


def micro_batches(run: Run, loader, pos: Position, sched: Schedule, optimizer):
    """The rest of this epoch's batches from ``pos``, as ``(batch, last_micro)``. At the first
    micro-batch of each optimizer step the RNGs are reseeded from (seed, step, rank) and the lr
    is set from the step. Stops at the epoch's end (``Run.step`` rolls it over) or at the last step."""
    loader.set_epoch(pos.epoch)
    for batch in run.accelerator.skip_first_batches(loader, pos.batch) if pos.batch else loader:
        if pos.batch % sched.grad_accum == 0:
            reseed(run.cfg.seed, pos.step, run.rank)
            set_lr(optimizer, sched.lr_at(pos.step))
        pos.batch += 1
        yield batch, pos.batch % sched.grad_accum == 0
        if pos.batch == 0 or pos.step >= sched.total:
            return
    pos.epoch, pos.batch = pos.epoch + 1, 0  # a loader shorter than the schedule expects (not reached)


def due(step: int, every: int | None, total: int) -> bool:
    return bool(every) and step % every == 0 or step == total


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_973 + rank) % (2 ** 63)


def reseed(seed: int, step: int, rank: int) -> None:
    """torch (masks, drop path), numpy (timm's Mixup) and random for this optimizer step."""
    s = step_seed(seed, step, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2 ** 32)
    random.seed(s)


class Health:
    """The loss, the unreadable-image counts and the first non-finite step, kept on the device
    between checks: no host sync per step. ``check`` reads them (a collective: every rank calls it)."""

    def __init__(self, run: Run, pos: Position):
        self.run, dev = run, run.device
        self.loss_sum = torch.tensor(pos.loss_sum if run.is_main else 0.0, device=dev)
        self.bad, self.seen = torch.zeros((), device=dev), torch.zeros((), device=dev)
        self.first_bad_step = torch.full((), -1, device=dev, dtype=torch.long)
        self.since, self.t0 = pos.step - pos.loss_steps, time.perf_counter()

    def add(self, loss: torch.Tensor, ok: torch.Tensor | None, step: int) -> None:
        self.loss_sum += loss.float()
        bad = (self.first_bad_step < 0) & ~torch.isfinite(loss)
        self.first_bad_step = torch.where(bad, step + 1, self.first_bad_step)  # 1-based, as logged
        if ok is not None:
            self.bad += (~ok.to(self.bad.device)).sum()
            self.seen += ok.numel()

    def check(self, pos: Position) -> None:
        """Stop on a non-finite loss or too many unreadable images; fold the counts into ``pos``."""
        acc = self.run.accelerator
        stats = acc.reduce(torch.stack([self.bad, self.seen]), "sum")
        bad_step = int(acc.reduce(self.first_bad_step, "max"))
        if bad_step >= 0:
            good = complete_checkpoints(self.run.out / "checkpoints")
            raise FloatingPointError(f"Non-finite loss at step {bad_step}. The run stopped; the last good checkpoint is "
                                     f"{good[-1] if good else 'none (no checkpoint was written yet)'}. Lower the lr, "
                                     "add --clip-grad, or use bf16 instead of fp16.")
        pos.num_bad, pos.num_seen = pos.num_bad + int(stats[0]), pos.num_seen + int(stats[1])
        self.bad.zero_()
        self.seen.zero_()
        check_bad_fraction(pos.num_bad, pos.num_seen, self.run.cfg.max_bad_fraction)

    def take_loss(self, pos: Position, micro_batches: int | None = None) -> tuple[float, float]:
        """(mean loss per micro-batch since the last call, images per second); resets both.
        ``micro_batches``: how many the sum holds (default: those of the steps since the last call)."""
        total = float(self.run.accelerator.reduce(self.loss_sum, "sum"))
        n = max(1, pos.step - self.since)
        micro_batches = micro_batches or n * self.run.cfg.grad_accum
        ips = n * self.run.cfg.batch_size * self.run.cfg.grad_accum * self.run.world / (time.perf_counter() - self.t0)
        self.loss_sum.zero_()
        self.since, self.t0 = pos.step, time.perf_counter()
        return total / (micro_batches * self.run.world), ips

    def saved(self, pos: Position) -> Position:
        """``pos`` with the loss summed so far, as a checkpoint stores it (a collective)."""
        pos.loss_sum = float(self.run.accelerator.reduce(self.loss_sum, "sum"))
        pos.loss_steps = pos.step - self.since
        return pos


def ranks_identical(accelerator: Accelerator, module: torch.nn.Module) -> bool | None:
    """Replicated training (DDP): compare every rank's parameter fingerprints. None when sharded."""
    if accelerator.distributed_type not in REPLICATED:
        return None
    fingerprint = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(accelerator.device)
    prints = accelerator.gather(fingerprint[None]).cpu()
    return bool((prints == prints[0]).all())


def trackers(report_to: str | None):
    if not report_to or report_to == "none":
        return None
    if report_to == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else None
    return "all" if report_to == "all" else report_to.split(",")
