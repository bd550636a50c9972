"""How a run is distributed: replicated (DDP) or sharded (FSDP2), and its name as recorded.

``accelerate launch --use_fsdp --fsdp_version 2 ...`` (or a config file with ``distributed_type:
FSDP``) asks for FSDP2; its FSDP_* environment fills the plugin, and the task's ``wrap`` classes
(ConvNeXt ``Block``: the encoder's blocks and the FCMAE decoder's) become the sharding units
unless the launch names others. Checkpoints are sharded (each process writes its shard with
torch.distributed.checkpoint) and resume exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import timedelta
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    convert_outputs_to_fp32,
    get_mixed_precision_context_manager,
)

# seconds a collective waits for the other processes before the run fails: short under Slurm, so that
# a lost node ends the job (and its requeue starts) instead of hanging it; torch's 30 minutes elsewhere.
# Every deliberate wait (a checkpoint write, the main process's COCO evaluation) must stay under it.
TIMEOUT_SLURM, TIMEOUT_DEFAULT = 300, 1800


def _asked(what: str) -> bool:  # as Accelerate reads its launch flags
    return os.environ.get(f"ACCELERATE_USE_{what}", "false").lower() == "true"


def fsdp_asked() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch --use_fsdp`` sets ACCELERATE_USE_FSDP)."""
    return _asked("FSDP")


def fsdp_plugin(wrap) -> FullyShardedDataParallelPlugin:
    """The FSDP2 plugin: the wrap policy, wrap classes and checkpoint type are fcmae's unless the
    launch's FSDP_* environment sets them (fields left None: the plugin reads that environment);
    the launch's other FSDP_* settings hold, but for the two fixed below."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(
            f"FSDP version {version} asked for: fcmae shards with FSDP2 only. Add --fsdp_version 2 to "
            "accelerate launch (fsdp_version: 2 under fsdp_config in a config file)."
        )
    names = [c.__name__ for c in wrap]
    by_class = bool(names) and "FSDP_AUTO_WRAP_POLICY" not in os.environ
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap" if by_class else None,
        transformer_cls_names_to_wrap=names if names and "FSDP_TRANSFORMER_CLS_TO_WRAP" not in os.environ else None,
        state_dict_type=None if "FSDP_STATE_DICT_TYPE" in os.environ else "SHARDED_STATE_DICT",
        # `accelerate launch --use_fsdp` turns this on by default; Accelerate 1.15's loader behind it
        # (fsdp2_load_full_state_dict) splits every parameter name at its last dot and fails on a
        # root parameter such as the FCMAE's mask_token. Not needed: every process builds the same
        # weights (seeded before the model is built, pretrained files read by each).
        cpu_ram_efficient_loading=False,
        # --mixed-precision bf16/fp16 stays autocast (after_prepare), as under DDP and in the official
        # code (torch.amp): weights all-gathered and gradients reduced in fp32, outputs in fp32.
        # Accelerate's own FSDP2 policy would cast the parameters, the gradient reduction and the
        # model's outputs (the FCMAE loss too) to bf16.
        mixed_precision_policy=MixedPrecisionPolicy(),
    )


def collective_timeout(seconds: int | None = None) -> int:
    """``--dist-timeout``, else 300 s inside a Slurm job and 1800 s elsewhere."""
    return seconds or (TIMEOUT_SLURM if "SLURM_JOB_ID" in os.environ else TIMEOUT_DEFAULT)


def accelerator_kwargs(wrap, timeout: int | None = None) -> dict:
    """Extra ``Accelerator`` arguments: the collective timeout, and an FSDP2 plugin when the launch
    asked for FSDP."""
    kwargs = {"kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout(timeout)))]}
    return {**kwargs, "fsdp_plugin": fsdp_plugin(wrap)} if fsdp_asked() else kwargs


def configure(accelerator: Accelerator, wrap) -> None:
    """After the ``Accelerator`` is built, before ``prepare``: make an FSDP launch shard on CPU too,
    and refuse to run a launch whose sharding Accelerate silently dropped."""
    state = accelerator.state
    if fsdp_asked() and state.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate 1.15's AcceleratorState promotes MULTI_GPU/MLU/SDAA/MUSA/NPU/XPU/HPU/NEURON to
        # FSDP when FSDP is asked for, never MULTI_CPU (the CPU processes, gloo): there the plugin is
        # dropped and prepare() wraps the model in DDP. Setting the type here, before prepare(), makes
        # Accelerate run its own FSDP2 code path on the gloo group (fsdp2_prepare_model: fully_shard
        # per wrap class and the root; save_state/load_state with torch.distributed.checkpoint;
        # get_state_dict, clip_grad_norm_ and no_sync for sharded models), as on GPUs.
        plugin = fsdp_plugin(wrap)
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if fsdp_asked() and not accelerator.is_fsdp2:
        raise ValueError(
            f"FSDP2 was asked for, but Accelerate set up {state.distributed_type.value} with "
            f"{accelerator.num_processes} process(es): FSDP needs 2 or more processes "
            "(accelerate launch --num_processes N)."
        )
    if _asked("DEEPSPEED") and state.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(
            f"DeepSpeed was asked for, but Accelerate set up {state.distributed_type.value}: with "
            "ACCELERATE_USE_CPU (or --cpu) Accelerate ignores DeepSpeed. See "
            "configs/accelerate/deepspeed_zero2_8gpu.yaml for what runs on CPU."
        )


def after_prepare(accelerator: Accelerator, model, wrap):
    """After ``prepare``: under FSDP2, check that the ``wrap`` modules became sharding units and let
    their ``run`` method (the sparse backends' way into a block) all-gather the block's weights as
    ``forward`` does. Returns the prepared model."""
    if accelerator.is_fsdp2:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

        if getattr(model, "backend", None) == "minkowski":
            raise ValueError(
                "--backend minkowski does not run under FSDP: its sparse convolutions read the blocks' "
                "weights outside any forward, where FSDP keeps them sharded. Use --backend gather."
            )
        units = [m for m in model.modules() if isinstance(m, tuple(wrap))]
        if units and not any(isinstance(m, FSDPModule) for m in units):
            names = ", ".join(c.__name__ for c in wrap)
            raise ValueError(
                f"FSDP2 made none of the {len(units)} {names} modules a sharding unit: the launch's "
                f"--fsdp_auto_wrap_policy / --fsdp_transformer_layer_cls_to_wrap should name {names}."
            )
        for m in units:
            if isinstance(m, FSDPModule) and hasattr(m, "run"):
                register_fsdp_forward_method(m, "run")
        if accelerator.native_amp:  # Accelerate's FSDP2 path leaves this to the (fp32) policy: autocast as for DDP
            model._original_forward = model.forward  # where Accelerate's unwrap_model looks for it
            autocast = get_mixed_precision_context_manager(True, accelerator.autocast_handler)
            model.forward = convert_outputs_to_fp32(autocast(model.forward))
    report_sharding(accelerator, model)
    return model


@contextlib.contextmanager
def unsharded(model):
    """Code that calls a prepared model's submodules outside its ``forward`` (k-NN features of
    ``model.encoder``) runs inside this: under FSDP2 the root's own parameters (stem, downsamples,
    norms, the FCMAE's proj/mask token/pred: all but the blocks, which gather themselves) are
    all-gathered for it and resharded after. A collective: every process enters it. Elsewhere a no-op."""
    from torch.distributed.fsdp import FSDPModule

    root = getattr(model, "_orig_mod", model)
    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


SHARDED_MODEL, SHARDED_OPTIMIZER = "pytorch_model_fsdp_0", "optimizer_0"  # Accelerate's FSDP2 checkpoint folders


def is_sharded(ckpt: Path) -> bool:
    """Whether a checkpoint was written by an FSDP2 run (its state in torch.distributed.checkpoint shards)."""
    return (Path(ckpt) / SHARDED_MODEL).is_dir()


def load_sharded(ckpt: Path, model, optimizer) -> None:
    """Load an FSDP2 checkpoint, written by any number of processes, into an unsharded run: the model
    and AdamW state gathered from the shards by torch.distributed.checkpoint (which reshards on load),
    by parameter name. (An FSDP2 run loads it with Accelerate's load_state, resharded the same way.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    module = getattr(model, "module", model)
    module = getattr(module, "_orig_mod", module)
    state = {"model": get_model_state_dict(module)}
    dcp.load(state, checkpoint_id=str(Path(ckpt) / SHARDED_MODEL))
    set_model_state_dict(module, state["model"])
    optim = {"optimizer": get_optimizer_state_dict(module, optimizer)}  # the template: AdamW's state initialised
    dcp.load(optim, checkpoint_id=str(Path(ckpt) / SHARDED_OPTIMIZER))
    set_optimizer_state_dict(module, optimizer, optim["optimizer"])


def report_sharding(accelerator: Accelerator, model) -> None:
    """Test hook: with ``FCMAE_SHARDING_REPORT=DIR`` each process writes ``DIR/sharding_RANK.json``:
    the FSDP units (module names, "" for the root) and every parameter's local and global shapes,
    read from the parameters themselves (a replicated run reports no units and equal shapes)."""
    folder = os.environ.get("FCMAE_SHARDING_REPORT")
    if not folder:
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    module = accelerator.unwrap_model(model)
    report = {
        "units": [name for name, m in module.named_modules() if isinstance(m, FSDPModule)],
        "params": {
            name: {"local": list((p.to_local() if isinstance(p, DTensor) else p).shape), "global": list(p.shape)}
            for name, p in module.named_parameters()
        },
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"sharding_{accelerator.process_index}.json").write_text(json.dumps(report, indent=1))


def distributed_name(accelerator: Accelerator) -> str:
    """What really ran: ``FSDP2`` only when a prepared model is sharded, else Accelerate's type
    (``MULTI_CPU``, ``MULTI_GPU``: replicated, DDP; ``NO``: one process)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FSDPModule

        version = accelerator.state.fsdp_plugin.fsdp_version
        models = getattr(accelerator, "_models", [])
        sharded = any(isinstance(getattr(m, "_orig_mod", m), FSDPModule) for m in models)
        return f"FSDP{version}" if sharded or not models else f"FSDP{version} (no model sharded)"
    return str(accelerator.distributed_type.value)
