"""The run every task's loop is built on, in the order a loop uses it: ``launch`` a task (the run is
set up, the task's body runs, the run is torn down), ``prepare`` the model, ``schedule`` it,
``begin`` at its position (a resume included), walk its ``batches`` (reseeding and setting the lr at
each optimizer step), ``backward`` each micro-batch, take each optimizer ``step`` (counting it,
logging at ``--log-every``, stopping cleanly on a preemption signal), ``checkpoint_if_due``,
``save_weights`` with their metadata, ``log`` rows, and ``finish``. ``evaluate_only`` is the same
set-up and teardown for ``--eval-only``.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ..data import StreamLoader
from ..sparse.masking import sample_keys
from .config import RUN_FACTS, flatten, resolve_precision, save_yaml
from .distributed import accelerator_kwargs, after_prepare, configure, distributed_name, is_sharded, load_sharded
from .health import Health
from .optim import backward_micro_batch, lr_at, optimizer_step, set_lr
from .outputs import claim_output_dir
from .preempt import Preempted, StopSignal, report_stop
from .state import fault_point, load_position, resolve_resume, save_checkpoint, trim_log

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
    data: dict = field(default_factory=dict)  # a sharded stream's position (StreamLoader.state_dict); {} otherwise


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


def resolve_schedule(cfg, batches_per_epoch: int, world: int) -> Schedule:
    """The schedule of ``cfg`` for ``batches_per_epoch`` micro-batches per process, resolved once (the
    config is left as given): total steps, warmup (``--warmup-steps``, else ``--warmup-epochs``,
    else min(``--warmup-cap``, a tenth of the run)), peak lr (``--lr``, else blr x batch / 256) and the
    milestones of a step decay (``--lr-milestones`` as fractions of ``--epochs``, so a run shortened
    with ``--max-steps`` keeps the schedule's shape)."""
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"One epoch gives {batches_per_epoch} batches per process, fewer than --grad-accum "
            f"{cfg.grad_accum}: use a smaller batch size or accumulation."
        )
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else cfg.max_steps
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    elif cfg.warmup_epochs is not None:
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
    else:
        warmup = min(cfg.warmup_cap or total, total // 10)
    eff_batch = cfg.batch_size * cfg.grad_accum * world
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    milestones = tuple(round(m / cfg.epochs * total) for m in cfg.lr_milestones or ()) if cfg.decay == "step" else ()
    kind = "cosine" if cfg.decay == "step" and not milestones else cfg.decay
    return Schedule(total, warmup, lr, cfg.min_lr, steps_per_epoch, cfg.grad_accum, eff_batch, kind, milestones)


class Run:
    """A started run: the accelerator, the output folder, the prepared model and optimizer, the
    schedule and position, and the helpers a loop calls."""

    def __init__(self, cfg, project: str, wrap=()):
        cfg.validate()
        self.cfg, self.project, self.wrap = cfg, project, tuple(wrap)
        self.out = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=resolve_precision(cfg.mixed_precision),
            log_with=trackers(cfg.report_to),
            project_dir=str(self.out),
            **accelerator_kwargs(self.wrap, cfg.dist_timeout),
        )
        configure(self.accelerator, self.wrap)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and self.device.type == "cuda"
        claim_output_dir(self, project)
        set_seed(cfg.seed)  # identical initial weights on every rank
        self.stop = StopSignal(self.accelerator)
        self.bar = self.model = self.optimizer = self.sched = self.pos = self.health = self.loader = None

    def say(self, msg: str) -> None:
        self.accelerator.print(f"[fcmae] {msg}")

    @property
    def module(self) -> torch.nn.Module:
        """The prepared model without its DDP / compile wrappers (FSDP2 keeps it sharded)."""
        return self.accelerator.unwrap_model(self.model)

    def prepare(self, model, optimizer, *loaders, shard_loaders: bool = True):
        """Compile (in place: parameter names stay), shard (FSDP2) or wrap (DDP), and let Accelerate
        shard the loaders across processes (``shard_loaders=False``: each already holds its share)."""
        model = model.to(self.device)
        if self.cfg.compile:
            model.compile()
        model, optimizer, *rest = self.accelerator.prepare(model, optimizer, *(loaders if shard_loaders else ()))
        self.model, self.optimizer = after_prepare(self.accelerator, model, self.wrap), optimizer
        loaders = rest if shard_loaders else loaders
        self.loader = loaders[0] if loaders else None  # the training loader, whose position a checkpoint keeps
        return (self.model, optimizer, *loaders)

    def schedule(self, batches_per_epoch: int) -> Schedule:
        cfg, sched = self.cfg, resolve_schedule(self.cfg, batches_per_epoch, self.world)
        self.say(
            f"{self.world} process(es) on {self.device} ({distributed_name(self.accelerator)}) | effective "
            f"batch {sched.eff_batch} ({cfg.batch_size} x {cfg.grad_accum} accum x {self.world}) | lr "
            f"{sched.lr:.3g}"
            + ("" if cfg.lr is not None else f" = blr {cfg.blr:g} x {sched.eff_batch} / 256")
            + f" | {sched.total} steps ({sched.steps_per_epoch}/epoch), warmup {sched.warmup}"
        )
        self.sched = sched
        return sched

    def begin(self, pos: Position, restore=None, **extra) -> Position:
        """Restore ``pos`` from the checkpoint ``--resume`` names (or with ``restore(run, pos)``),
        write config.yaml (the resolved config and ``extra``) and the trackers' config, drop the log
        rows a resumed run repeats, and start the health watch. Returns ``pos``."""
        if set(extra) - RUN_FACTS:
            raise TypeError(f"Run.begin: name {sorted(set(extra) - RUN_FACTS)} in fcmae.training.config.RUN_FACTS")
        (restore or Run.restore)(self, pos)
        sched = self.sched  # config.yaml: every field flat (as flags and YAML keys are), then what was resolved
        resolved = {
            **flatten(self.cfg.to_dict()),
            **extra,
            "world_size": self.world,
            "distributed_type": distributed_name(self.accelerator),
            "effective_batch_size": sched.eff_batch,
            "abs_lr": sched.lr,
            "steps_per_epoch": sched.steps_per_epoch,
            "total_steps": sched.total,
            "warmup_steps_resolved": sched.warmup,
            "lr_milestone_steps": list(sched.milestones),
            "mixed_precision_resolved": self.accelerator.mixed_precision,
        }
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_yaml(resolved, self.out / "config.yaml")
            trim_log(self.out / "log.jsonl", lambda row: row["step"] <= pos.step)
        self.accelerator.init_trackers(
            self.project, config={k: v for k, v in resolved.items() if isinstance(v, (int, float, str, bool))}
        )
        self.bar = tqdm(
            total=sched.total,
            initial=pos.step,
            disable=not self.accelerator.is_local_main_process,
            desc=self.project,
            dynamic_ncols=True,
        )
        self.pos, self.health, self.resolved = pos, Health(self, pos), resolved
        return pos

    def restore(self, pos: Position) -> Path | None:
        """Load the checkpoint ``--resume`` names into the prepared objects and ``pos``."""
        ckpt = resolve_resume(self.cfg.resume, self.out)
        if ckpt is not None:
            saved = load_position(ckpt, self)
            if is_sharded(ckpt) and not self.accelerator.is_fsdp2:
                load_sharded(ckpt, self.model, self.optimizer)  # an FSDP2 checkpoint, gathered for this run
            elif self.accelerator.is_fsdp2 and not is_sharded(ckpt):
                raise ValueError(
                    f"{ckpt} was written by an unsharded (DDP) run: resume it without FSDP (launch without --use_fsdp)."
                )
            else:
                self.accelerator.load_state(str(ckpt))
            for k, v in saved.items():
                setattr(pos, k, v)
            if pos.data and isinstance(self.loader, StreamLoader):  # a sharded stream: same data, its partitions
                self.loader.load_state_dict(pos.data)
            self.say(f"resumed from {ckpt} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")
        elif self.cfg.resume and self.cfg.resume != "auto":
            raise FileNotFoundError(f"--resume {self.cfg.resume}: nothing to resume from.")
        return ckpt

    def keys(self, index: torch.Tensor) -> torch.Tensor:
        """The per-sample keys (on the device) of a batch's global sample indices in this epoch: the
        model draws each sample's masks and drop path from them, so a sample gets the same draws
        however the global batch is split over processes (an elastic resume repeats them)."""
        return sample_keys(self.cfg.seed, self.pos.epoch, index).to(self.device, non_blocking=True)

    @property
    def training(self) -> bool:
        return self.pos.step < self.sched.total

    def batches(self, loader):
        """The rest of this epoch's batches from the position, as ``(batch, last_micro)``. At the first
        micro-batch of each optimizer step the RNGs are reseeded from (seed, step, rank) and the lr
        is set from the step. Stops at the epoch's end (``step`` rolls it over) or at the last step."""
        pos, sched = self.pos, self.sched
        loader.set_epoch(pos.epoch)
        if isinstance(loader, StreamLoader):  # a sharded stream reads nothing before the position
            batches = loader.start_at(pos.epoch, pos.batch)
        else:
            batches = self.accelerator.skip_first_batches(loader, pos.batch) if pos.batch else loader
        for batch in batches:
            if pos.batch % sched.grad_accum == 0:
                reseed(self.cfg.seed, pos.step, self.rank)
                set_lr(self.optimizer, sched.lr_at(pos.step))
            pos.batch += 1
            yield batch, pos.batch % sched.grad_accum == 0
            if pos.batch == 0 or pos.step >= sched.total:
                return
        pos.epoch, pos.batch = pos.epoch + 1, 0  # a loader shorter than the schedule expects (not reached)

    def backward(self, loss_fn, last_micro: bool, ok: torch.Tensor | None = None) -> torch.Tensor:
        """Forward + backward of one micro-batch (gradients synced on the last one of a step), its
        loss and ``ok`` flags added to the health watch. ``loss_fn()`` returns the loss, or a dict of
        loss parts (torchvision's detection losses) that are summed and logged one by one."""
        parts = {}

        def total():
            out = loss_fn()
            if isinstance(out, dict):
                parts.update(out)
                return torch.stack([v.float() for v in out.values()]).sum()
            return out

        loss = backward_micro_batch(self.accelerator, self.model, total, self.cfg.grad_accum, last_micro)
        self.health.add(loss, ok, self.pos.step, parts)
        return loss

    def step(self, log: bool = True) -> None:
        """The optimizer step after the last micro-batch: clip, step, zero the gradients; count the
        step (rolling over to the next epoch after its last batch); at ``--log-every`` steps (with
        ``log``) check the health and log the mean loss and its parts, the lr and the throughput. A
        stop signal that every process has seen ends the run here: checkpoint, then ``Preempted``."""
        pos, sched = self.pos, self.sched
        optimizer_step(self.accelerator, self.model, self.optimizer, self.cfg.clip_grad)
        pos.step += 1
        fault_point("step", pos.step)
        self.bar.update(1)
        if pos.batch >= sched.per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0
        if log and due(pos.step, self.cfg.log_every, sched.total):
            self.health.check(pos)
            loss, ips, parts = self.health.take_loss(pos)
            self.log(
                dict(
                    step=pos.step,
                    epoch=pos.epoch + pos.batch / sched.per_epoch,
                    loss=loss,
                    **parts,
                    lr=self.lr,
                    images_per_sec=ips,
                )
            )
        if self.stop.agreed(pos.step):
            self.save_checkpoint()
            raise Preempted(pos.step, self.stop.signal_name)

    @property
    def lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def save_checkpoint(self) -> Path:
        self.health.check(self.pos)  # never checkpoint weights that saw a non-finite loss
        pos = self.pos
        pos.data = self.loader.state_dict(pos.epoch, pos.batch) if isinstance(self.loader, StreamLoader) else {}
        return save_checkpoint(
            self.accelerator,
            self.out / "checkpoints",
            self.health.saved(self.pos),
            self.cfg.keep_last,
            self.position_facts(),
        )

    def position_facts(self) -> dict:
        """What a checkpoint records beside the position, so a resume can tell what changed."""
        return dict(
            world_size=self.world,
            batch_size=self.cfg.batch_size,
            grad_accum=self.cfg.grad_accum,
            effective_batch=self.sched.eff_batch,
        )

    def checkpoint_if_due(self, then=None, every: int | None = None, at_end: bool = True) -> bool:
        """A checkpoint at every ``every`` (default ``--save-every``) steps and, with ``at_end``, at the
        last step; then ``then()`` (a task's weight exports). Returns whether it saved."""
        every = self.cfg.save_every if every is None else every
        if not ((bool(every) and self.pos.step % every == 0) or (at_end and self.pos.step == self.sched.total)):
            return False
        self.save_checkpoint()
        if then is not None:
            then()
        return True

    def state_dict(self, model=None) -> dict:
        """The full state dict of the prepared model (or ``model``): a collective under FSDP, every
        process calls it; the main process gets the tensors."""
        return self.accelerator.get_state_dict(model if model is not None else self.model)

    def save_weights(self, name: str, metadata: dict, model=None) -> None:
        """``output_dir/name``: the (prepared) model's full state dict with ``metadata``, written
        atomically by the main process. A collective under FSDP: every process calls it."""
        from ..weights.files import save_safetensors

        state = self.state_dict(model)
        if self.is_main:
            save_safetensors(state, self.out / name, {k: str(v) for k, v in metadata.items()})

    def log(self, row: dict) -> None:
        if self.is_main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "lr", "mIoU", "acc1")})
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def finish(self, module: torch.nn.Module | None = None, **final) -> None:
        """final.yaml, after checking that replicated training left every rank the same weights."""
        self.bar.close()
        pos = self.pos
        same = ranks_identical(self.accelerator, module if module is not None else self.module)
        if self.is_main:
            save_yaml(
                {
                    "step": pos.step,
                    "epochs": pos.epoch,
                    "world_size": self.world,
                    "distributed_type": distributed_name(self.accelerator),
                    "ranks_identical": same,
                    "num_bad": pos.num_bad,
                    "num_seen": pos.num_seen,
                    **pos.best,
                    **final,
                },
                self.out / "final.yaml",
            )
        if same is False:
            raise RuntimeError("Parameters differ across processes at the end of training: distributed sync is broken.")

    def push(self, source, **export_kwargs) -> None:
        """``--push-to-hub``: export ``source`` (a run file or folder) as its artifact kind and upload it."""
        if self.cfg.push_to_hub and self.is_main:
            from ..weights.hub import export_and_push

            datasets = [self.cfg.dataset_name] if self.cfg.dataset_name else []
            url = export_and_push(
                source, self.cfg.push_to_hub, private=self.cfg.hub_private, datasets=datasets, **export_kwargs
            )
            self.say(f"pushed to {url}")

    def close(self) -> None:
        """Teardown. The references to the model, optimizer and loaders go first: a gloo run that still
        holds them sometimes aborts (SIGABRT) at exit after all work is done."""
        self.model = self.optimizer = None
        self.stop.close()
        self.accelerator.free_memory()
        self.accelerator.end_training()


def launch(cfg, project: str, body, wrap=()) -> Path:
    """Set up a run of ``cfg``, run ``body(run)`` (the task's loop), tear it down; returns the output
    folder. ``wrap``: the module classes FSDP2 shards as units. A run stopped by a preemption signal
    has saved its checkpoint: ``Preempted`` goes up to the command, which exits with its status."""
    run = Run(cfg, project, wrap)
    try:
        body(run)
    except Preempted as stop:
        run.say(f"stopped by {stop.signal} at step {stop.step}; checkpoint saved: continue with --resume auto")
        if run.is_main:
            report_stop(stop)
        run.close()
        raise
    run.close()
    return run.out


def evaluate_only(cfg, evaluate) -> dict:
    """``--eval-only``: set up Accelerate alone (no output folder), ``evaluate(accelerator) -> metrics``,
    print them as one JSON line with the checkpoint, tear down. Returns the metrics."""
    cfg.validate()
    accelerator = Accelerator(mixed_precision=resolve_precision(cfg.mixed_precision))
    metrics = evaluate(accelerator)
    accelerator.print(json.dumps({"checkpoint": str(cfg.checkpoint), **metrics}))
    accelerator.free_memory()
    accelerator.end_training()
    return metrics


def due(step: int, every: int | None, total: int) -> bool:
    return (bool(every) and step % every == 0) or step == total


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_973 + rank) % (2**63)


def reseed(seed: int, step: int, rank: int) -> None:
    """torch (masks, drop path), numpy (timm's Mixup) and random for this optimizer step."""
    s = step_seed(seed, step, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def ranks_identical(accelerator: Accelerator, module: torch.nn.Module) -> bool | None:
    """Replicated training (DDP): compare every rank's parameter fingerprints. None when there is
    nothing to compare (one process) or the parameters are sharded."""
    if accelerator.distributed_type not in REPLICATED or accelerator.num_processes == 1:
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
