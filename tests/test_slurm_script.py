"""fcmae submit's sbatch script, without Slurm: the script is run by bash with stand-ins for srun,
scontrol and the launcher, simulating a 2-node allocation; what each "node" would launch is recorded."""

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT

from fcmae.training import slurm

SRUN = r"""#!/bin/bash
# stand-in srun: runs the task command once per node (SLURM_NODEID 0..SLURM_NNODES-1), forwards USR1/USR2
echo "srun $*" >> "$STUB_LOG"
n=$#; cmd=("${@:n-2:3}")   # bash -c CMD
pids=()
on_sig() {
    echo "srun got $1" >> "$STUB_LOG"
    # the training stops after its step and rank 0 writes the stop file
    echo "{\"step\": 3, \"signal\": \"SIG$1\", \"status\": 75}" > "$FCMAE_STOP_FILE"
    kill -KILL "${pids[@]}" 2>/dev/null; exit 1
}
trap 'on_sig USR1' USR1; trap 'on_sig USR2' USR2
for ((i = 0; i < ${SLURM_NNODES:-1}; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "${cmd[@]}" & pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait $p || status=$?; done
exit $status
"""
SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
case "$1 $2" in
  "show hostnames") for h in $STUB_HOSTS; do echo $h; done ;;
esac
"""
LAUNCHER = r"""#!/bin/bash
# stand-in for accelerate launch: records what it was given, then behaves as STUB_MODE says
python3 - "$@" <<'PY' >> "$STUB_DIR/launch-$SLURM_NODEID.json"
import json, os, sys
sigign = int([l for l in open(f"/proc/{os.getppid()}/status") if l.startswith("SigIgn")][0].split()[1], 16)
print(json.dumps({"argv": sys.argv[1:], "node": os.environ.get("SLURM_NODEID"),
                  "cpu": os.environ.get("ACCELERATE_USE_CPU"), "stop_file": os.environ.get("FCMAE_STOP_FILE"),
                  "usr1_ignored": bool(sigign & (1 << 9)), "usr2_ignored": bool(sigign & (1 << 11))}))
PY
case "$STUB_MODE" in
  ok) exit 0 ;;
  stop) [ "$SLURM_NODEID" = 0 ] && echo '{"step": 7, "signal": "SIGUSR1", "status": 75}' > "$FCMAE_STOP_FILE"
    exit 1 ;;
  stop-term) [ "$SLURM_NODEID" = 0 ] && echo '{"step": 7, "signal": "SIGTERM", "status": 75}' > "$FCMAE_STOP_FILE"
    exit 1 ;;
  fail) exit 1 ;;
  fail-progress) mkdir -p "$STUB_OUT/checkpoints/step_00000009"; exit 1 ;;
  wait) exec sleep 120 ;;  # exec: the stand-in srun's kill ends the "training" itself
esac
"""


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def stubs(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _exe(bin_ / "srun", SRUN)
    _exe(bin_ / "scontrol", SCONTROL)
    launcher = _exe(tmp_path / "fake-accelerate", LAUNCHER)
    return tmp_path, bin_, launcher


def _opts(tmp_path, launcher, **kw):
    out = tmp_path / "run"
    base = dict(
        task="pretrain",
        task_args=["--data", "/data/x y", "--output-dir", str(out), "--epochs", "3"],
        nodes=2,
        processes_per_node=2,
        cpu=True,
        launcher=[str(launcher)],
        workdir=str(tmp_path),
    )
    base.update(kw)
    return slurm.SubmitOptions(**base)


def _run(script: str, tmp_path, bin_, mode="ok", restarts=None, background=False, nodes=2):
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {
        **os.environ,
        "PATH": f"{bin_}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "12345",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": str(nodes),
        "SLURM_CPUS_PER_TASK": "8",
        "STUB_LOG": str(tmp_path / "stub.log"),
        "STUB_DIR": str(tmp_path),
        "STUB_MODE": mode,
        "STUB_HOSTS": "node-a node-b",
        "STUB_OUT": str(tmp_path / "run"),
    }
    env.pop("FCMAE_MAIN_PORT", None)
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    (tmp_path / "run").mkdir(exist_ok=True)
    if background:
        return subprocess.Popen(
            ["bash", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)


def _launches(tmp_path):
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in tmp_path.glob("launch-*.json")}


def _stub_log(tmp_path):
    p = tmp_path / "stub.log"
    return p.read_text() if p.exists() else ""


def test_two_node_cpu_script_launches_one_accelerate_per_node(stubs):
    tmp_path, bin_, launcher = stubs
    opts = _opts(tmp_path, launcher)
    script = slurm.build_script(opts)
    flags = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        "--open-mode=append",
        "--requeue",
        f"--output={tmp_path}/run/slurm/%x-%j.out",
        "--signal=B:USR1@180",
        f"--chdir={tmp_path}",
    } <= flags
    assert not any(f.startswith("--gpus") for f in flags)
    proc = _run(script, tmp_path, bin_)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = _launches(tmp_path)
    assert sorted(launches) == [0, 1]
    port = str(15000 + 12345 % 15000)
    for rank, rec in launches.items():
        a = rec["argv"]
        assert a[:13] == [
            "--num_machines",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "node-a",
            "--main_process_port",
            port,
            "--num_processes",
            "4",
            "--multi_gpu",
            "-m",
            "fcmae",
        ]
        assert a[13:] == [
            "pretrain",
            "--data",
            "/data/x y",
            "--output-dir",
            str(tmp_path / "run"),
            "--epochs",
            "3",
            "--resume",
            "auto",
        ]
        assert rec["cpu"] == "true"
        assert rec["usr1_ignored"] and rec["usr2_ignored"], "the launcher must not die of USR1/USR2"
        assert rec["stop_file"] == f"{tmp_path}/run/slurm/stop-12345-0.json"
    log = _stub_log(tmp_path)
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=8 bash -c" in log
    assert "scontrol requeue" not in log
    assert "start 1 (restarts so far: 0" in proc.stdout


def test_gpu_script(stubs):
    tmp_path, bin_, launcher = stubs
    opts = _opts(
        tmp_path,
        launcher,
        cpu=False,
        processes_per_node=None,
        gpus_per_node=4,
        partition="gpu",
        account="proj",
        qos="high",
        time=600,
        mem="200G",
        constraint="h100",
        job_name="atto",
        main_process_port=29500,
        accelerate_args=["--mixed_precision", "bf16"],
    )
    script = slurm.build_script(opts)
    for flag in (
        "--gpus-per-node=4",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--time=600",
        "--mem=200G",
        "--constraint=h100",
        "--job-name=atto",
        f"--output={tmp_path}/run/slurm/%x-%j.out",
    ):
        assert f"#SBATCH {flag}" in script
    assert "--cpus-per-task" not in script.split("set -u")[0]
    assert "ACCELERATE_USE_CPU" not in script
    proc = _run(script, tmp_path, bin_)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank, rec in _launches(tmp_path).items():
        a = rec["argv"]
        assert a[a.index("--machine_rank") + 1] == str(rank)
        assert a[a.index("--main_process_port") + 1] == "29500"
        assert a[a.index("--num_processes") + 1] == "8" and "--multi_gpu" in a
        assert a[a.index("--mixed_precision") + 1] == "bf16"
        assert rec["cpu"] is None


def test_single_process_has_no_multi_gpu(stubs):
    tmp_path, bin_, launcher = stubs
    opts = _opts(tmp_path, launcher, nodes=1, processes_per_node=1)
    proc = _run(slurm.build_script(opts), tmp_path, bin_, nodes=1)
    assert proc.returncode == 0
    (rec,) = _launches(tmp_path).values()
    assert "--multi_gpu" not in rec["argv"] and rec["argv"][rec["argv"].index("--num_processes") + 1] == "1"


@pytest.mark.parametrize(
    "mode,restarts,requeued,why",
    [
        ("ok", None, False, ""),
        ("stop", None, True, "stopped on SIGUSR"),  # the training stopped on USR1 sent to the step
        ("stop", 3, False, "NOT requeued"),  # cap: SLURM_RESTART_COUNT 3 >= --max-requeues 3
        ("stop-term", None, False, ""),  # SIGTERM: Slurm's business
        ("fail", None, False, "no new checkpoint"),  # a failure without progress: no crash loop
        ("fail-progress", 1, True, "after writing a new checkpoint"),
    ],
)
def test_requeue_decision(stubs, mode, restarts, requeued, why):
    tmp_path, bin_, launcher = stubs
    opts = _opts(tmp_path, launcher, max_requeues=3)
    proc = _run(slurm.build_script(opts), tmp_path, bin_, mode=mode, restarts=restarts)
    assert ("scontrol requeue 12345" in _stub_log(tmp_path)) == requeued, proc.stdout
    assert why in proc.stdout
    if requeued:
        assert proc.returncode == 0


def test_time_limit_warning_is_forwarded_and_the_job_requeues_itself(stubs):
    tmp_path, bin_, launcher = stubs
    opts = _opts(tmp_path, launcher, max_requeues=3)
    proc = _run(slurm.build_script(opts), tmp_path, bin_, mode="wait", background=True)
    deadline = time.time() + 20
    while len(list(tmp_path.glob("launch-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@S does: the batch shell only
    out, _ = proc.communicate(timeout=60)
    log = _stub_log(tmp_path)
    assert "srun got USR1" in log, out
    assert "scontrol requeue 12345" in log, out
    assert "got SIGUSR1" in out and proc.returncode == 0


def test_sigterm_to_the_batch_shell_does_not_requeue(stubs):
    tmp_path, bin_, launcher = stubs
    proc = _run(slurm.build_script(_opts(tmp_path, launcher)), tmp_path, bin_, mode="wait", background=True)
    deadline = time.time() + 20
    while len(list(tmp_path.glob("launch-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    # Slurm would SIGTERM the step too; here the stand-in srun is ended by hand
    srun = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in srun:  # the script's own child: the stand-in srun
        os.kill(int(pid), signal.SIGUSR2)
    out, _ = proc.communicate(timeout=60)
    assert "got SIGTERM" in out and "Slurm decides" in out
    assert "scontrol requeue" not in _stub_log(tmp_path)


def test_options_checked():
    base = dict(task="pretrain", task_args=["--output-dir", "out"])
    with pytest.raises(ValueError, match="--resume auto"):
        slurm.SubmitOptions(task="pretrain", task_args=["--output-dir", "o", "--resume", "ckpt/step_1"])
    with pytest.raises(ValueError, match="--output-dir"):
        slurm.SubmitOptions(task="pretrain", task_args=["--data", "d"])
    with pytest.raises(ValueError, match="one process per GPU"):
        slurm.SubmitOptions(**base, gpus_per_node=4, processes_per_node=2)
    with pytest.raises(ValueError, match="task"):
        slurm.SubmitOptions(task="train", task_args=["--output-dir", "o"])
    o = slurm.SubmitOptions(**base, gpus_per_node=4, nodes=3)
    assert (o.processes_per_node, o.num_processes) == (4, 12)
    o = slurm.SubmitOptions(
        task="finetune", task_args=["--output-dir=o", "--resume=auto"], cpu=True, processes_per_node=3
    )
    assert o.output_dir == "o" and o.cpus_per_task == 3
    words = slurm.launch_args(o)
    assert words[-1] == "--resume=auto" and "auto" not in words[:-1]  # not added twice


def test_cli_dry_run_prints_the_script(capsys, tmp_path):
    slurm.main(
        [
            "--nodes",
            "2",
            "--processes-per-node",
            "2",
            "--cpu",
            "--time",
            "30",
            "--max-requeues",
            "5",
            "--dry-run",
            "--",
            "segment",
            "--data",
            "d",
            "--output-dir",
            str(tmp_path / "o"),
        ]
    )
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in out and "MAX_REQUEUES=5" in out
    assert "-m fcmae segment --data d --output-dir" in out and out.rstrip().endswith('exit "$STATUS"')
    assert not (tmp_path / "o").exists()  # nothing written, nothing submitted
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)


def test_default_num_workers():
    """Inside an allocation: the task's CPUs over its processes, less one for the process (at least 1);
    outside: 4, or the machine's CPUs when fewer."""
    from fcmae.data import resolve_workers

    for slurm_env, expected in (
        ({}, min(4, os.cpu_count())),
        ({"SLURM_CPUS_PER_TASK": "32", "LOCAL_WORLD_SIZE": "4"}, 7),
        ({"SLURM_CPUS_PER_TASK": "2", "LOCAL_WORLD_SIZE": "2"}, 1),
        ({"SLURM_CPUS_PER_TASK": "10"}, 9),
    ):
        with pytest.MonkeyPatch.context() as m:
            for k in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
                m.delenv(k, raising=False)
            for k, v in slurm_env.items():
                m.setenv(k, v)
            assert resolve_workers(None) == expected, slurm_env
            assert resolve_workers(3) == 3  # --num-workers wins


def test_default_dist_timeout(monkeypatch):
    from fcmae.training.distributed import TIMEOUT_DEFAULT, TIMEOUT_SLURM, collective_timeout

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert collective_timeout() == TIMEOUT_DEFAULT == 1800 and collective_timeout(42) == 42
    monkeypatch.setenv("SLURM_JOB_ID", "3")
    assert collective_timeout() == TIMEOUT_SLURM == 300


@pytest.mark.parametrize("name,nodes,procs", [("single_node.sbatch", 1, 4), ("multi_node.sbatch", 2, 16)])
def test_templates_run(stubs, name, nodes, procs):
    """The shipped templates, run like the generated script: one launch per node, same arguments."""
    tmp_path, bin_, launcher = stubs
    (bin_ / "accelerate").symlink_to(launcher)
    text = (ROOT / "configs" / "slurm" / name).read_text()
    for needle in (
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@",
        "SLURM_RESTART_COUNT",
        "scontrol requeue",
        "trap '' USR1 USR2",
        "--resume auto",
        "scontrol show hostnames",
    ):
        assert needle in text, needle
    text = text.replace("/path/to/run", str(tmp_path / "run")).replace("/path/to/data", "'/data/x y'")
    proc = _run(text, tmp_path, bin_, mode="stop", nodes=nodes)
    launches = _launches(tmp_path)
    assert sorted(launches) == list(range(nodes)), proc.stdout + proc.stderr
    for rank, rec in launches.items():
        a = rec["argv"]
        assert a[0] == "launch" and rec["usr1_ignored"] and rec["usr2_ignored"]
        assert a[a.index("--machine_rank") + 1] == str(rank) and a[a.index("--num_machines") + 1] == str(nodes)
        assert a[a.index("--main_process_ip") + 1] == "node-a"
        assert a[a.index("--main_process_port") + 1] == str(15000 + 12345 % 15000)
        assert a[a.index("--num_processes") + 1] == str(procs) and "--multi_gpu" in a
        i = a.index("-m")
        assert a[i + 1] == "fcmae" and a[i + 3 : i + 5] == ["--data", "/data/x y"] and a[-2:] == ["--resume", "auto"]
    assert "scontrol requeue 12345" in _stub_log(tmp_path), proc.stdout  # stopped on SIGUSR1: requeued
