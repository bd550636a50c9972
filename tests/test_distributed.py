"""Distributed runs on 2 CPU processes (gloo), launched as a user does with ``accelerate launch``:
FSDP2 pretraining and fine-tuning against DDP runs of the same seed, exact resume from sharded
checkpoints, 2 nodes x 1 process against 1 node x 2 processes, and the launches that must not
silently run something else. Tiny models (convnextv2_atto) at 64 px, a few steps each."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CLI_ENV, ROOT, free_port
from safetensors.torch import load_file
from test_finetune import make_shapes
from test_pretrain import make_images
from torch.distributed.checkpoint import FileSystemReader

PRETRAIN, FINETUNE = str(ROOT / "fcmae" / "pretrain.py"), str(ROOT / "finetune" / "run.py")
CONFIGS = ROOT / "configs" / "accelerate"
COMMON = ["--input-size", "64", "--num-workers", "0", "--report-to", "none"]
# 48 images, 4 per process, 2 accumulated: 3 optimizer steps per epoch; checkpoints at steps 2 (mid-epoch) and 4;
# bf16 autocast, as pretraining runs on GPUs
PRE = [
    *COMMON,
    "--model",
    "convnextv2_atto",
    "--batch-size",
    "4",
    "--decoder-dim",
    "32",
    "--num-recon",
    "0",
    "--lr",
    "1e-3",
    "--warmup-steps",
    "2",
    "--log-every",
    "1",
    "--grad-accum",
    "2",
    "--max-steps",
    "4",
    "--save-every",
    "2",
    "--mixed-precision",
    "bf16",
]
# 12 images, 2 per process: 3 steps per epoch, 2 epochs; clipping at 0.01, small enough to rescale these gradients
FT = [
    *COMMON,
    "--batch-size",
    "2",
    "--epochs",
    "2",
    "--warmup-epochs",
    "1",
    "--lr",
    "2e-3",
    "--layer-decay",
    "0.9",
    "--mixup",
    "0.8",
    "--cutmix",
    "1.0",
    "--smoothing",
    "0.1",
    "--drop-path",
    "0.1",
    "--clip-grad",
    "0.01",
]
FSDP = ["--use_fsdp", "--fsdp_version", "2"]  # unit and checkpoint settings: fcmae's defaults
BLOCK = re.compile(r"^((?:encoder\.)?stages\.\d+\.blocks\.\d+|decoder\.\d+)\.conv_dw\.weight$")  # a block's name


def launch(how: list, script: str, args: list, env=None, port=None, check=True, wait=True):
    """``accelerate launch HOW... SCRIPT ARGS...`` with 2 CPU processes in all (ACCELERATE_USE_CPU)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port or free_port()),
        *how,
        script,
        *args,
    ]
    env = {**CLI_ENV, "ACCELERATE_USE_CPU": "true", **(env or {})}
    proc = subprocess.Popen(
        list(map(str, cmd)), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    out = proc.communicate(timeout=600)[0]
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{out[-4000:]}")
    return proc.returncode, out


def yaml_of(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_sharded(report_dir: Path, weights: dict):
    """Every ConvNeXt block (encoder and FCMAE decoder) is an FSDP unit under the root, and each
    process holds only its rows of every parameter (its dim-0 shard), as the processes' own reports
    say. ``weights``: the run's exported state, named as the model's parameters."""
    blocks = {m.group(1) for k in weights if (m := BLOCK.match(k))}
    assert len(blocks) > 2
    reports = [json.loads((report_dir / f"sharding_{r}.json").read_text()) for r in (0, 1)]
    assert [set(rep["units"]) for rep in reports] == [{""} | blocks] * 2
    assert reports[0]["params"].keys() == reports[1]["params"].keys() == weights.keys()
    for name, full in ((n, list(v.shape)) for n, v in weights.items()):
        local = [rep["params"][name]["local"] for rep in reports]
        assert [rep["params"][name]["global"] for rep in reports] == [full, full], name
        assert local[0][0] + local[1][0] == full[0] and local[0][1:] == local[1][1:] == full[1:], name
        assert full[0] == 1 or max(local[0][0], local[1][0]) < full[0], name


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("imgs"), n=48)


@pytest.fixture(scope="module")
def ddp_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(["--multi_gpu"], PRETRAIN, [*PRE, "--data", images, "--output-dir", out])
    return out


@pytest.fixture(scope="module")
def fsdp_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    _, log = launch(
        FSDP,
        PRETRAIN,
        [*PRE, "--data", images, "--output-dir", out / "run"],
        env={"FCMAE_SHARDING_REPORT": out / "sharding"},
    )
    return out, log


def test_pretraining_under_fsdp2_is_sharded(fsdp_run):
    out, log = fsdp_run
    assert yaml_of(out / "run" / "config.yaml")["distributed_type"] == "FSDP2"
    final = yaml_of(out / "run" / "final.yaml")
    assert final["distributed_type"] == "FSDP2" and final["world_size"] == 2 and final["num_seen"] == 4 * 2 * 2 * 4
    assert "reducer" not in log.lower() and "DistributedDataParallel" not in log  # no DDP wrapper ran
    weights = load_file(str(out / "run" / "fcmae.safetensors"))
    assert_sharded(out / "sharding", weights)
    # the checkpoint holds each weight and AdamW moment as two pieces (rows split at the middle), one in
    # each process's file: torch.distributed.checkpoint's metadata. A replicated run writes model.safetensors.
    ckpt = out / "run" / "checkpoints" / "step_00000004"
    parts = (("pytorch_model_fsdp_0", "model.", ""), ("optimizer_0", "optimizer.state.", ".exp_avg"))
    for part, prefix, suffix in parts:
        meta = FileSystemReader(str(ckpt / part)).read_metadata()
        files = {}
        for index, info in meta.storage_data.items():
            files.setdefault(index.fqn, set()).add(info.relative_path)
        for name, w in weights.items():
            key = f"{prefix}{name}{suffix}"
            starts = sorted(c.offsets[0] for c in meta.state_dict_metadata[key].chunks if c.sizes[0])
            assert starts == ([0, (len(w) + 1) // 2] if len(w) > 1 else [0]), key
            assert len(files[key]) == 2, key  # one piece per process (empty for a 1-row tensor)


def test_pretraining_under_fsdp2_equals_ddp_bitwise(fsdp_run, ddp_run):
    """Without clipping the sharded run's arithmetic is the replicated run's (bf16 autocast, fp32
    weights and gradient reduction in both): the same bits."""
    out, _ = fsdp_run
    assert yaml_of(ddp_run / "config.yaml")["distributed_type"] == "MULTI_CPU"
    for name in ("fcmae.safetensors", "encoder.safetensors"):
        assert_bitwise_equal(load_file(str(out / "run" / name)), load_file(str(ddp_run / name)))
    assert [r["loss"] for r in rows(out / "run")] == [r["loss"] for r in rows(ddp_run)]


def test_resume_from_sharded_checkpoint_is_bitwise_exact(fsdp_run, images, tmp_path):
    """Killed after step 3; resumed from the step-2 sharded checkpoint (mid-epoch) by a launch with
    the shipped FSDP config file (its GPU count and bf16 overridden on the command line)."""
    ref, _ = fsdp_run
    args = [*PRE, "--data", images, "--output-dir", tmp_path / "run"]
    code, _ = launch(FSDP, PRETRAIN, args, env={"FCMAE_FAULT": "step:3"}, check=False)
    assert code != 0 and not (tmp_path / "run" / "final.yaml").exists()
    shards = (tmp_path / "run" / "checkpoints" / "step_00000002" / "pytorch_model_fsdp_0").glob("*.distcp")
    assert sorted(f.name for f in shards) == ["__0_0.distcp", "__1_0.distcp"]
    _, log = launch(
        ["--config_file", CONFIGS / "fsdp_8gpu.yaml"],
        PRETRAIN,
        [*args, "--resume", "auto"],
        env={"FCMAE_SHARDING_REPORT": tmp_path / "sharding"},
    )
    assert "resumed from" in log and "at step 2 (epoch 0, batch 4)" in log
    assert yaml_of(tmp_path / "run" / "config.yaml")["distributed_type"] == "FSDP2"  # not a silent MULTI_CPU
    assert_sharded(tmp_path / "sharding", load_file(str(ref / "run" / "fcmae.safetensors")))
    for name in ("fcmae.safetensors", "encoder.safetensors"):
        assert_bitwise_equal(load_file(str(tmp_path / "run" / name)), load_file(str(ref / "run" / name)))
    assert [r["loss"] for r in rows(tmp_path / "run")] == [r["loss"] for r in rows(ref / "run")]


def test_finetuning_under_fsdp2_matches_ddp(fsdp_run, tmp_path):
    """Clipping sums the squared gradient norms shard by shard under FSDP2, in one piece under DDP:
    float rounding apart, the same weights. Measured: at most 1.2e-7 apart (one float32 step at 1.0;
    about 2 in 3 weights differ), 6e-5 of one AdamW step (lr 2e-3)."""
    shapes = make_shapes(tmp_path / "shapes")
    encoder = fsdp_run[0] / "run" / "encoder.safetensors"
    args = [*FT, "--from-fcmae", encoder, "--data", shapes]
    launch(["--multi_gpu"], FINETUNE, [*args, "--output-dir", tmp_path / "ddp"])
    launch(FSDP, FINETUNE, [*args, "--output-dir", tmp_path / "fsdp"], env={"FCMAE_SHARDING_REPORT": tmp_path / "rep"})
    assert yaml_of(tmp_path / "fsdp" / "config.yaml")["distributed_type"] == "FSDP2"
    last = load_file(str(tmp_path / "fsdp" / "last.safetensors"))
    assert_sharded(tmp_path / "rep", last)
    ref, start = load_file(str(tmp_path / "ddp" / "last.safetensors")), load_file(str(encoder))
    atol, rtol = 1e-6, 1e-5
    assert last.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(last[k], ref[k], atol=atol, rtol=rtol, msg=k)
    assert max((ref[k] - start[k]).abs().max() for k in start) > 1000 * atol  # both runs trained
    a, b = rows(tmp_path / "fsdp"), rows(tmp_path / "ddp")
    assert [r["step"] for r in a] == [3, 6] and [r["acc1"] for r in a] == [r["acc1"] for r in b]
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-5)


def test_two_nodes_of_one_process_equal_one_node_of_two_bitwise(ddp_run, images, tmp_path):
    """The documented multi-node launch (configs/accelerate/multinode_2x8gpu.yaml, one command per
    node with its --machine_rank) as 2 nodes x 1 process on localhost."""
    port, args = free_port(), [*PRE, "--data", images, "--output-dir", tmp_path]
    node = ["--config_file", CONFIGS / "multinode_2x8gpu.yaml", "--main_process_ip", "127.0.0.1"]
    procs = [launch([*node, "--machine_rank", str(r)], PRETRAIN, args, port=port, wait=False) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    cfg = yaml_of(tmp_path / "config.yaml")
    assert cfg["world_size"] == 2 and cfg["distributed_type"] == "MULTI_CPU"
    for name in ("fcmae.safetensors", "encoder.safetensors"):
        assert_bitwise_equal(load_file(str(tmp_path / name)), load_file(str(ddp_run / name)))


def test_fsdp_launches_that_cannot_shard_are_refused(images, tmp_path):
    """FSDP asked for but not FSDP2 (`--use_fsdp` alone means version 1), or a single process:
    the run stops with the reason instead of training replicated."""
    args = [*PRE, "--data", images, "--max-steps", "1", "--output-dir", tmp_path / "v1"]
    code, log = launch(["--use_fsdp"], PRETRAIN, args, check=False)
    assert code != 0 and "fcmae shards with FSDP2 only" in log and "--fsdp_version 2" in log
    assert not (tmp_path / "v1" / "config.yaml").exists()
    single = subprocess.run(
        [sys.executable, PRETRAIN, *map(str, args[:-1]), tmp_path / "one"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**CLI_ENV, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
    )
    assert single.returncode == 2 and "FSDP2 was asked for, but Accelerate set up NO" in single.stderr
    assert not (tmp_path / "one" / "config.yaml").exists()


def test_model_ema_is_refused_under_fsdp2(tmp_path):
    """timm's EMA keeps an unsharded copy updated from the parameters: not with sharded ones."""
    shapes = make_shapes(tmp_path / "shapes")
    code, log = launch(
        FSDP,
        FINETUNE,
        [*FT, "--model", "convnextv2_atto", "--model-ema", "--data", shapes, "--output-dir", tmp_path / "out"],
        check=False,
    )
    assert code != 0 and "--model-ema is not supported with FSDP" in log
