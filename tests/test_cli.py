"""The ``fcmae`` command: every subcommand answers --help, a wrong flag or command is one ``error:``
line with status 2, ``--version`` prints the package's version, and the old entry points are the
same commands."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_ENV, ROOT, run_cli

import fcmae
from fcmae.cli import COMMANDS, main

TASKS = ("pretrain", "finetune", "segment", "detect")


def call(argv, capsys):
    """(exit status, stdout, stderr) of ``fcmae ARGV`` run in this process."""
    try:
        main(argv)
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    status, out, _ = call([command, "--help"], capsys)
    assert status == 0 and "usage:" in out and f"fcmae {command}" in out


def test_top_level_help_version_and_unknown_command(capsys):
    status, out, _ = call(["--help"], capsys)
    assert status == 0 and all(name in out for name in COMMANDS)
    status, out, _ = call(["--version"], capsys)
    assert status == 0 and out.strip() == f"fcmae {fcmae.__version__}"
    status, _, err = call(["pretrian"], capsys)
    assert status == 2 and err.strip().splitlines()[-1] == (
        "fcmae: error: unknown command 'pretrian' (choose from " + ", ".join(COMMANDS) + ")"
    )


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["pretrain", "--learning-rate", "1"], "--learning-rate"),
        (["finetune", "--data", "d", "--mixupp", "0.2"], "--mixupp"),
        (["segment", "--data", "d", "--lrr", "1"], "--lrr"),
        (["detect", "--data", "d", "--tag", "x"], "--tag"),
        (["export", "--checkpoint", "c", "--out", "o", "--fromat", "timm"], "--fromat"),
        (["embed", "d", "--checkpoint", "c", "--out", "f.parquet", "--x"], "--x"),
        (["data", "stats", "d", "--samples", "3"], "--samples"),
        (["models", "--model", "x"], "--model"),
    ],
)
def test_an_unknown_flag_is_one_error_line_naming_it(argv, flag, capsys):
    status, _, err = call(argv, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and lines[-1].startswith(("error:", "fcmae")) and "error:" in lines[-1], err
    assert flag in lines[-1]


def test_a_flag_that_means_nothing_to_a_task_is_refused(capsys):
    """Shared fields a task does not use have no flag there (pretraining evaluates nothing)."""
    status, _, err = call(["pretrain", "--eval-only"], capsys)
    assert status == 2 and "--eval-only" in err.strip().splitlines()[-1]


def test_console_script_module_and_old_entry_points_are_the_same_command(tmp_path):
    exe = shutil.which("fcmae", path=str(Path(sys.executable).parent))
    assert exe, "the fcmae console script is installed with the package"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, env=CLI_ENV)
    assert version.returncode == 0 and version.stdout.strip() == f"fcmae {fcmae.__version__}"
    assert run_cli(["-m", "fcmae", "--version"]).stdout.strip() == f"fcmae {fcmae.__version__}"
    for script in ("fcmae/pretrain.py", "finetune/run.py", "finetune/segment.py", "finetune/detect.py"):
        out = run_cli([script, "--help"]).stdout
        assert "--output-dir" in out and "--lr" in out, script
    assert "predict" in run_cli(["-m", "fcmae.predict", "--help"]).stdout
    assert "export" in run_cli(["-m", "fcmae.hub", "--help"]).stdout
    assert "stats" in run_cli(["-m", "fcmae.data", "--help"]).stdout


def test_a_reader_that_has_gone_stops_the_command_quietly():
    """`fcmae models | head`: the pipe closes before the output is written; the command stops as a
    Unix tool stops on SIGPIPE (status 141, nothing on stderr), not with a traceback."""
    read, write = os.pipe()
    os.close(read)
    cmd = [sys.executable, "-m", "fcmae", "models", "--models", "convnextv2_atto", "--sizes", "224"]
    proc = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True, env=CLI_ENV, cwd=ROOT, timeout=600)
    os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr
