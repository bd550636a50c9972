"""Stopping on a signal without losing work: SIGTERM (what Slurm sends on preemption, ``scancel`` and
``scontrol requeue``, and torchrun forwards to its workers), SIGUSR1 (the time-limit warning of
``sbatch --signal=USR1@SECONDS``), SIGUSR2 (submitit's default) and SIGINT (Ctrl-C) only set a
flag. At the end of every optimizer step the processes agree on it; the step they agree at is
finished, checkpointed, and the run exits with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again
later"), from which ``--resume auto`` continues bit for bit. A second Ctrl-C stops at once.

The agreement is a one-integer all-reduce on a CPU (gloo) group after each step: it reads no
device value (no host-device sync) and costs tens of microseconds within a node. So a stop ends
within one optimizer step plus one checkpoint write of the signal, well inside Slurm's KillWait
(30 s) for the step times and checkpoint sizes of every model here (see the cluster docs).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import torch

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the caller should retry (resume)
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class Preempted(Exception):
    """Raised after the checkpoint of the step the processes stopped at is written."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.step, self.signal = step, signal_name


def report_stop(stop: Preempted) -> None:
    """``$FCMAE_STOP_FILE`` (when set; a Slurm job script sets it): JSON of the step and signal, so the
    job script knows the run stopped on a signal with its checkpoint written (``accelerate launch``
    turns a worker's status into its own status 1)."""
    path = os.environ.get("FCMAE_STOP_FILE")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps({"step": stop.step, "signal": stop.signal, "status": EXIT_PREEMPTED}))
        os.replace(tmp, path)


class StopSignal:
    """The stop flag of this process, and the agreement of all processes on it."""

    def __init__(self, accelerator):
        self.signal_name, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        self.world = accelerator.num_processes
        self.buffer = np.zeros(1, dtype=np.int64)  # read from numpy: the all-reduce result is host memory
        self.group = self.flag = None
        if self.world > 1 and torch.distributed.is_initialized():
            gloo = torch.distributed.get_backend() == "gloo"
            self.group = None if gloo else torch.distributed.new_group(backend="gloo")  # a collective: all call it
            self.flag = torch.from_numpy(self.buffer)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agreed(self, step: int) -> bool:
        """Whether every process stops after this step: any one of them has seen a signal. A collective
        in a multi-process run (every process calls it after every optimizer step)."""
        if self.flag is None:
            return self.requested
        self.buffer[0] = int(self.requested)
        torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        if self.buffer[0] and not self.requested:
            self.signal_name = "a signal to another process"
        return bool(self.buffer[0])

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
