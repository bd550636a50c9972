"""A run's health, kept on the device between checks so that no step waits on it: the loss and
its task-specific parts (a detector's RPN and RoI losses), the unreadable-image counts, and the
first step whose loss was not finite."""

from __future__ import annotations

import time

import torch

from ..data import check_bad_fraction
from .state import complete_checkpoints


class Health:
    """``add`` after every micro-batch (device tensors only); ``check`` and ``take_loss`` read the
    values (collectives: every rank calls them) at log and checkpoint steps."""

    def __init__(self, run, pos):
        self.run, dev = run, run.device
        self.loss_sum = torch.tensor(pos.loss_sum if run.is_main else 0.0, device=dev)
        self.parts_sum, self.part_names = None, None
        self.bad, self.seen = torch.zeros((), device=dev), torch.zeros((), device=dev)
        self.first_bad_step = torch.full((), -1, device=dev, dtype=torch.long)
        self.since, self.t0 = pos.step - pos.loss_steps, time.perf_counter()

    def add(self, loss: torch.Tensor, ok: torch.Tensor | None, step: int, parts: dict | None = None) -> None:
        """One micro-batch's detached loss, its ``ok`` flags (readable images) and its loss ``parts``."""
        self.loss_sum += loss.float()
        bad = (self.first_bad_step < 0) & ~torch.isfinite(loss)
        self.first_bad_step = torch.where(bad, step + 1, self.first_bad_step)  # 1-based, as logged
        if ok is not None:
            self.bad += (~ok.to(self.bad.device)).sum()
            self.seen += ok.numel()
        if parts:
            values = torch.stack([v.detach().float() for v in parts.values()])
            self.part_names = self.part_names or list(parts)
            self.parts_sum = values if self.parts_sum is None else self.parts_sum + values

    def check(self, pos) -> None:
        """Stop on a non-finite loss or too many unreadable images; fold the counts into ``pos``."""
        acc = self.run.accelerator
        stats = acc.reduce(torch.stack([self.bad, self.seen]), "sum")
        bad_step = int(acc.reduce(self.first_bad_step, "max"))
        if bad_step >= 0:
            good = complete_checkpoints(self.run.out / "checkpoints")
            raise FloatingPointError(
                f"Non-finite loss at step {bad_step}. The run stopped; the last good checkpoint is "
                f"{good[-1] if good else 'none (no checkpoint was written yet)'}. Lower the lr, "
                "add --clip-grad, or use bf16 instead of fp16."
            )
        pos.num_bad, pos.num_seen = pos.num_bad + int(stats[0]), pos.num_seen + int(stats[1])
        self.bad.zero_()
        self.seen.zero_()
        check_bad_fraction(pos.num_bad, pos.num_seen, self.run.cfg.max_bad_fraction)

    def take_loss(self, pos, micro_batches: int | None = None) -> tuple[float, float, dict]:
        """(mean loss per micro-batch since the last call, images per second, mean of each loss part);
        resets them. ``micro_batches``: how many the sums hold (default: those of the steps since the
        last call)."""
        acc, cfg = self.run.accelerator, self.run.cfg
        total = float(acc.reduce(self.loss_sum, "sum"))
        n = max(1, pos.step - self.since)
        micro_batches = (micro_batches or n * cfg.grad_accum) * self.run.world
        parts = {}
        if self.parts_sum is not None:
            parts = dict(zip(self.part_names, (acc.reduce(self.parts_sum, "sum") / micro_batches).tolist()))
            self.parts_sum = None
        ips = n * cfg.batch_size * cfg.grad_accum * self.run.world / (time.perf_counter() - self.t0)
        self.loss_sum.zero_()
        self.since, self.t0 = pos.step, time.perf_counter()
        return total / micro_batches, ips, parts

    def saved(self, pos):
        """``pos`` with the loss summed so far, as a checkpoint stores it (a collective)."""
        pos.loss_sum = float(self.run.accelerator.reduce(self.loss_sum, "sum"))
        pos.loss_steps = pos.step - self.since
        return pos
