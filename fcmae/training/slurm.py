"""Slurm: ``fcmae submit`` (one sbatch script per run), the preemption contract, Slurm-aware defaults.

``fcmae submit [--nodes N] [--processes-per-node P | --gpus-per-node G] [--cpu] ... -- TASK FLAGS``
writes one sbatch script, ``<output-dir>/slurm/<job-name>-<time>.sbatch``, submits it with ``sbatch``
and prints the job id. ``--dry-run`` prints the script instead. The script is plain bash and
``sbatch`` (no submitit: see "Why not submitit" below); ``configs/slurm/*.sbatch`` are the same script
written by hand, for people who keep their own.

What the job does
-----------------
* One Slurm task per node (``--ntasks-per-node=1``) runs ``accelerate launch`` for that node:
  ``--num_machines N --machine_rank $SLURM_NODEID --main_process_ip <first host of
  scontrol show hostnames $SLURM_JOB_NODELIST> --main_process_port <15000 + job id % 15000>
  --num_processes N*P [--multi_gpu] -m fcmae TASK FLAGS --resume auto`` (``ACCELERATE_USE_CPU=true``
  with ``--cpu``; ``--multi_gpu`` whenever N*P > 1, which on CPU means several gloo processes).
  The port comes from the job id, so a requeued job (same id) and every node agree on it without
  talking, and two jobs on one node do not collide; it stays below Linux's ephemeral range.
* Logs: ``<output-dir>/slurm/<job-name>-<job id>.out``, ``--open-mode=append``: the requeued job (same
  id) appends to the file of its first start. The script prints one ``[fcmae-slurm]`` line per
  decision (start number, signal, requeue or not, and why).
* ``accelerate launch`` (the torch elastic agent) is started with SIGUSR1 and SIGUSR2 ignored: their
  default action would kill it at once (it handles only TERM, INT, HUP, QUIT), which ends the Slurm
  step and gets the training processes killed mid-checkpoint. Its children inherit "ignored", and
  the training installs its own handlers (fcmae.training.preempt), which replace it.

Who requeues, and when (measured on Slurm 22.05, see the study report)
----------------------------------------------------------------------
* Preemption (``PreemptMode=REQUEUE``) and ``scontrol requeue``: **Slurm**. Every process of the job
  (batch shell, srun, the launcher, the training processes) gets SIGCONT+SIGTERM at once; the
  training stops after its current step, saves and exits; SIGKILL follows after ``KillWait`` (30 s by
  default; ``GraceTime`` of the partition for preemption). The job is requeued (``--requeue``) and
  may start again ``cred_expire + 1`` s later (121 s by default). The batch script does nothing.
* Time limit: **the job itself**. ``#SBATCH --signal=B:USR1@S`` warns the batch shell S seconds
  before the limit (Slurm may send it up to a minute earlier); the script forwards USR1 to the step,
  the training stops and saves, and the script runs ``scontrol requeue $SLURM_JOB_ID`` while
  ``SLURM_RESTART_COUNT < --max-requeues``. At the limit itself Slurm only kills (state TIMEOUT).
* A failure (non-zero status with no signal: a lost node whose peers failed on the collective
  timeout, a crash): **the job itself**, under the same cap, only if a new checkpoint appeared since
  this start (no crash loop that repeats the same failure). A node that Slurm declares failed
  (NODE_FAIL) is requeued by Slurm.
* ``scancel``: **nobody**. The training gets SIGTERM, saves, exits; the job ends CANCELLED.
* SIGUSR2 (submitit's signal, or ``scancel --signal=USR2 --batch``) is handled like USR1.

``SLURM_RESTART_COUNT`` counts every requeue, Slurm's own included; the cap applies to the job's own
requeues (Slurm's preemption requeues are not ours to refuse).

The training side (fcmae.training.preempt)
-----------------------------------------
On SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 a process sets a flag; after each optimizer step all
processes agree (all-reduce MAX of the flag), so they stop after the same step; they write the
checkpoint of that step and exit with ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL``: "stopped early,
checkpoint written, run again with --resume auto"). Rank 0 also writes ``$FCMAE_STOP_FILE`` (JSON:
step, signal) when the variable is set: ``accelerate launch`` turns any worker's non-zero status into
its own status 1, so the job script cannot see the 75. The stop (rest of the step + checkpoint) must
take well under KillWait; the time-limit warning (``--signal-seconds``) leaves more.

Why not submitit
----------------
submitit (1.5.4) was tried on the same local Slurm; it can be made to work (a wrapper whose
``checkpoint()`` waits for the ``accelerate launch`` child, the launcher started with USR2 ignored),
but it brings nothing this script needs and makes several things worse: its USR2 handler only acts in
global rank 0 and treats every USR2 of a job shorter than 50 min as a time-out; it ignores SIGTERM in
its own process (logs "Bypassing signal SIGTERM") and knows nothing of SLURM_RESTART_COUNT; its
script can only be printed through private functions (no dry run); the job runs a pickled callable,
so the nodes need the submitting Python environment and pickle compatibility, and users who write
their own sbatch scripts cannot share the logic.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path

TASKS = ("pretrain", "finetune", "segment", "detect")
PORT_BASE, PORT_SPAN = 15000, 15000  # main_process_port = 15000 + job id % 15000 (below 32768)


@dataclasses.dataclass
class SubmitOptions:
    """What ``fcmae submit`` takes. ``task_args`` are the task's own flags, passed through."""

    task: str
    task_args: list[str]
    nodes: int = 1
    processes_per_node: int | None = None  # default: gpus_per_node, or 1 with --cpu
    gpus_per_node: int | None = None
    cpu: bool = False
    cpus_per_task: int | None = None  # CPUs per node (one task per node); default: --cpu: P, else Slurm's
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | None = None  # minutes
    mem: str | None = None  # per node, Slurm syntax ("200G", "0" = all)
    job_name: str | None = None  # default fcmae-<task>
    constraint: str | None = None
    max_requeues: int = 20
    requeue_on_failure: bool = True
    signal_seconds: int = 180  # time-limit warning, seconds before the limit
    main_process_port: int | None = None  # default: derived from the job id
    setup: list[str] = dataclasses.field(default_factory=list)  # shell lines before the launch
    accelerate_args: list[str] = dataclasses.field(default_factory=list)  # e.g. --mixed_precision bf16
    sbatch_args: list[str] = dataclasses.field(default_factory=list)  # extra "#SBATCH" options
    launcher: list[str] | None = None  # default: [sys.executable, -m, accelerate.commands.launch]
    program: list[str] | None = None  # default: [-m, fcmae, TASK]; tests put a script here
    workdir: str | None = None  # the job's working directory (default: where fcmae submit runs)

    def __post_init__(self):
        if self.task not in TASKS and self.program is None:
            raise ValueError(f"task {self.task!r}: one of {', '.join(TASKS)}")
        if self.nodes < 1:
            raise ValueError("--nodes must be at least 1")
        if self.gpus_per_node is not None and self.cpu:
            raise ValueError("--gpus-per-node and --cpu exclude each other")
        if self.processes_per_node is None:
            self.processes_per_node = self.gpus_per_node or 1
        elif self.gpus_per_node is not None and self.processes_per_node != self.gpus_per_node:
            raise ValueError(
                f"--processes-per-node {self.processes_per_node} with --gpus-per-node "
                f"{self.gpus_per_node}: one process per GPU (give one of the two)"
            )
        if self.processes_per_node < 1:
            raise ValueError("--processes-per-node must be at least 1")
        if self.cpu and self.cpus_per_task is None:
            self.cpus_per_task = self.processes_per_node
        if self.max_requeues < 0:
            raise ValueError("--max-requeues must be >= 0")
        resume = _flag_value(self.task_args, "--resume")
        if resume is not None and resume != "auto":
            raise ValueError(
                f"--resume {resume}: a Slurm run resumes with --resume auto (added by fcmae submit) "
                "from its --output-dir; start from other weights with the task's init/finetune flag"
            )
        if not self.output_dir:
            raise ValueError(
                "the task needs --output-dir: checkpoints (--resume auto) and the Slurm logs "
                "(<output-dir>/slurm/) live there"
            )

    @property
    def output_dir(self) -> str | None:
        return _flag_value(self.task_args, "--output-dir")

    @property
    def num_processes(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def name(self) -> str:
        return self.job_name or f"fcmae-{self.task}"


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag V`` or ``--flag=V``; the last one wins), or None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1 :]
    return value


def launch_args(
    opts: SubmitOptions,
    machine_rank: str = '"$SLURM_NODEID"',
    main_ip: str = '"$MAIN_HOST"',
    port: str = '"$MAIN_PORT"',
) -> list[str]:
    """The ``accelerate launch`` arguments of one node, as shell words: rank, address and port are
    shell expressions the node expands (defaults), or literal values given here."""
    words = [*(opts.launcher or [sys.executable, "-m", "accelerate.commands.launch"])]
    words = [shlex.quote(w) for w in words]
    words += [
        "--num_machines",
        str(opts.nodes),
        "--machine_rank",
        machine_rank,
        "--main_process_ip",
        main_ip,
        "--main_process_port",
        port,
        "--num_processes",
        str(opts.num_processes),
    ]
    if opts.num_processes > 1:
        words.append("--multi_gpu")  # on CPU too: without it --num_processes N silently runs one process
    words += [shlex.quote(a) for a in opts.accelerate_args]
    program = opts.program if opts.program is not None else ["-m", "fcmae", opts.task]
    words += [shlex.quote(a) for a in program]
    task_args = list(opts.task_args)
    if _flag_value(task_args, "--resume") is None:
        task_args += ["--resume", "auto"]
    words += [shlex.quote(a) for a in task_args]
    return words


def node_command(opts: SubmitOptions) -> str:
    """The shell code each node runs (``srun ... bash -c "$NODE_CMD"``)."""
    return (
        "trap '' USR1 USR2  # the launcher (torch elastic agent) would die of these; the training "
        "processes install their own handlers\n"
        "exec " + " ".join(launch_args(opts))
    )


def sbatch_options(opts: SubmitOptions) -> list[tuple[str, str | None]]:
    out = Path(opts.output_dir).expanduser()
    logdir = out / "slurm" if out.is_absolute() else Path(opts.workdir or os.getcwd()) / out / "slurm"
    o: list[tuple[str, str | None]] = [("job-name", opts.name), ("nodes", str(opts.nodes)), ("ntasks-per-node", "1")]
    if opts.cpus_per_task:
        o.append(("cpus-per-task", str(opts.cpus_per_task)))
    if opts.gpus_per_node:
        o.append(("gpus-per-node", str(opts.gpus_per_node)))
    for key in ("partition", "account", "qos", "mem", "constraint"):
        if getattr(opts, key):
            o.append((key, str(getattr(opts, key))))
    if opts.time:
        o.append(("time", str(opts.time)))
    o += [
        ("chdir", str(opts.workdir or os.getcwd())),
        ("output", str(logdir / "%x-%j.out")),
        ("open-mode", "append"),
        ("requeue", None),
        ("signal", f"B:USR1@{opts.signal_seconds}"),
    ]
    for extra in opts.sbatch_args:
        key, _, value = extra.lstrip("-").partition("=")
        o.append((key, value or None))
    return o


_COMMENTS = {
    "ntasks-per-node": "one task per node: it runs accelerate launch for that node",
    "output": "one log per job id; a requeued job keeps its id",
    "open-mode": "append: a requeued job adds to its log instead of truncating it",
    "requeue": "Slurm may requeue it (preemption, scontrol requeue, node failure)",
    "signal": "time-limit warning to this batch shell only; it forwards it and requeues the job",
}

_BODY = r"""
set -u
OUTPUT_DIR=@OUTPUT_DIR@
MAX_REQUEUES=@MAX_REQUEUES@  # this job's own requeues, counted with SLURM_RESTART_COUNT
REQUEUE_ON_FAILURE=@REQUEUE_ON_FAILURE@
RESTARTS=${SLURM_RESTART_COUNT:-0}
log() { echo "[fcmae-slurm $(date '+%F %T')] $*"; }
log "job $SLURM_JOB_ID: start $((RESTARTS + 1)) (restarts so far: $RESTARTS," \
    "own-requeue cap $MAX_REQUEUES) on $SLURM_JOB_NODELIST"

# rank-0 host of accelerate: the first host of the allocation (this batch shell runs there)
export MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PORT=${FCMAE_MAIN_PORT:-@PORT@}
# the training's rank 0 writes this file (JSON: step, signal) when it stopped on a signal after a checkpoint
export FCMAE_STOP_FILE="$OUTPUT_DIR/slurm/stop-$SLURM_JOB_ID-$RESTARTS.json"
mkdir -p "$OUTPUT_DIR/slurm"; rm -f "$FCMAE_STOP_FILE"
@EXPORTS@
newest_checkpoint() { ls -1 "$OUTPUT_DIR/checkpoints" 2>/dev/null | grep '^step_' | tail -n 1; }
CHECKPOINT_AT_START=$(newest_checkpoint)
@SETUP@
# The command of each node (expanded there: SLURM_NODEID is the node's rank in the allocation).
read -r -d '' NODE_CMD <<'NODE' || true
@NODE_CMD@
NODE

STOP_SIGNAL=""   # USR1/USR2 received by this shell (forwarded to the training)
TERMINATED=0     # SIGTERM received: preemption, scontrol requeue, scancel or the time limit itself
SRUN_PID=""
forward() {
    STOP_SIGNAL=$1
    log "got SIG$1: asking the training to stop after its current step and save"
    [ -n "$SRUN_PID" ] && kill -s "$1" "$SRUN_PID" 2>/dev/null  # srun forwards it to every process of the step
}
trap 'forward USR1' USR1
trap 'forward USR2' USR2
trap 'TERMINATED=1; log "got SIGTERM: Slurm signals every process of the job; the training saves before KillWait"' TERM

# in the background, so the traps run at once (bash runs a trap only when its foreground command returns)
srun --kill-on-bad-exit=1 --ntasks-per-node=1 @SRUN_CPUS@bash -c "$NODE_CMD" &
SRUN_PID=$!
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
wait "$SRUN_PID"; STATUS=$?
STOPPED=""; [ -f "$FCMAE_STOP_FILE" ] && STOPPED=$(cat "$FCMAE_STOP_FILE")
log "the training ended with status $STATUS${STOPPED:+ (stopped: $STOPPED)}"

requeue() {  # $1: why
    if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
        log "NOT requeued ($1): $RESTARTS restarts already, cap --max-requeues $MAX_REQUEUES"
        return 1
    fi
    log "requeue ($1): scontrol requeue $SLURM_JOB_ID; it resumes with --resume auto"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    log "scontrol requeue failed"
    return 1
}
if [ "$TERMINATED" = 1 ]; then
    log "not requeuing: after SIGTERM Slurm decides (it requeues on preemption and scontrol requeue;" \
        "not on scancel or the time limit)"
elif [ -n "$STOP_SIGNAL" ] || grep -qs '"SIGUSR[12]"' "$FCMAE_STOP_FILE"; then
    requeue "stopped on SIG${STOP_SIGNAL:-USR} (time-limit warning)"
elif [ "$STATUS" -ne 0 ] && [ "$REQUEUE_ON_FAILURE" = 1 ] && [ -z "$STOPPED" ]; then
    if [ "$(newest_checkpoint)" != "$CHECKPOINT_AT_START" ]; then
        requeue "failed with status $STATUS after writing a new checkpoint"
    else
        log "NOT requeued: failed with status $STATUS and no new checkpoint since this start"
    fi
fi
exit "$STATUS"
"""


def build_script(opts: SubmitOptions) -> str:
    """The sbatch script of a run."""
    lines = [
        "#!/bin/bash",
        f"# fcmae {opts.task} on {opts.nodes} node(s) x {opts.processes_per_node} process(es)"
        f" ({'CPU' if opts.cpu else 'GPU'}), written by fcmae submit (fcmae.training.slurm).",
    ]
    for key, value in sbatch_options(opts):
        flag = f"#SBATCH --{key}" + ("" if value is None else f"={value}")
        note = _COMMENTS.get(key)
        lines.append(f"{flag:<56} # {note}" if note else flag)
    out = opts.output_dir
    out_abs = out if os.path.isabs(out) else os.path.join(opts.workdir or os.getcwd(), out)
    exports = ["export ACCELERATE_USE_CPU=true  # --cpu: gloo processes"] if opts.cpu else []
    port = str(opts.main_process_port) if opts.main_process_port else f"$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))"
    srun_cpus = "${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK }"  # srun 22.05+ does not inherit it
    body = (
        _BODY.replace("@OUTPUT_DIR@", shlex.quote(out_abs))
        .replace("@MAX_REQUEUES@", str(opts.max_requeues))
        .replace("@REQUEUE_ON_FAILURE@", "1" if opts.requeue_on_failure else "0")
        .replace("@PORT@", port)
        .replace("@EXPORTS@", "\n".join(exports))
        .replace("@SETUP@", "\n".join(opts.setup))
        .replace("@SRUN_CPUS@", srun_cpus)
        .replace("@NODE_CMD@", node_command(opts))
    )
    return "\n".join(lines) + "\n" + body


def dry_run(opts: SubmitOptions) -> str:
    return build_script(opts)


def log_dir(opts: SubmitOptions) -> Path:
    out = Path(opts.output_dir)
    return (out if out.is_absolute() else Path(opts.workdir or os.getcwd()) / out) / "slurm"


def submit(opts: SubmitOptions) -> str:
    """Write the script under ``<output-dir>/slurm/`` and submit it; returns the job id."""
    folder = log_dir(opts)
    folder.mkdir(parents=True, exist_ok=True)  # sbatch does not create --output's folder (the job would fail silently)
    path = folder / f"{opts.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}.sbatch"
    path.write_text(build_script(opts))
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


# ---- fcmae submit ---------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[SubmitOptions, bool]:
    """``fcmae submit`` flags: (the submission, whether it is a dry run)."""
    if "--" not in argv and not any(a in ("-h", "--help") for a in argv):
        raise ValueError("usage: fcmae submit [options] -- TASK [task flags]   (TASK: " + " | ".join(TASKS) + ")")
    argv = argv if "--" in argv else [*argv, "--"]
    cut = argv.index("--")
    own, rest = argv[:cut], argv[cut + 1 :]
    p = _parser()
    a = vars(p.parse_args(own))
    if not rest:
        p.error("no task after --")
    dry = a.pop("dry_run")
    a["requeue_on_failure"] = not a.pop("no_requeue_on_failure")
    return SubmitOptions(task=rest[0], task_args=rest[1:], **a), dry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcmae submit", description="Submit an fcmae task to Slurm.", allow_abbrev=False)
    p.add_argument("--nodes", type=int, default=1)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--processes-per-node", type=int)
    g.add_argument("--gpus-per-node", type=int)
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo), ACCELERATE_USE_CPU=true")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node (default with --cpu: one per process)")
    for name in ("partition", "account", "qos", "mem", "job-name", "constraint"):
        p.add_argument(f"--{name}")
    p.add_argument("--time", type=int, help="time limit, minutes")
    p.add_argument(
        "--max-requeues",
        type=int,
        default=SubmitOptions.max_requeues,
        help="cap on the job's own requeues (time limit, failure), checked with SLURM_RESTART_COUNT",
    )
    p.add_argument("--no-requeue-on-failure", action="store_true")
    p.add_argument(
        "--signal-seconds",
        type=int,
        default=SubmitOptions.signal_seconds,
        help="time-limit warning (SIGUSR1), seconds before the limit",
    )
    p.add_argument("--main-process-port", type=int)
    p.add_argument("--setup", action="append", default=[], help="a shell line run before the launch (repeatable)")
    p.add_argument("--accelerate-arg", action="append", default=[], dest="accelerate_args")
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        dest="sbatch_args",
        help="an extra sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    return p


def main(argv: list[str] | None = None) -> None:
    """``fcmae submit``: user errors raise ValueError (the command turns them into one line, status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    opts, dry = parse_args(argv)
    if dry:
        sys.stdout.write(dry_run(opts))
        return
    job = submit(opts)
    print(job)
    print(f"fcmae {opts.task}: Slurm job {job}; log {log_dir(opts) / f'{opts.name}-{job}.out'}", file=sys.stderr)
