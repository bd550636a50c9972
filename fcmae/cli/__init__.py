"""The ``fcmae`` command: one entry for every task and tool (``python -m fcmae`` is the same).

    fcmae pretrain | finetune | segment | detect [FLAGS]   train (each: --help lists every flag)
    fcmae predict IMAGES --checkpoint RUN                  classify, segment, detect or reconstruct,
                                                           by what the checkpoint holds
    fcmae embed DATA --checkpoint RUN --out FILE.parquet   pooled features of every image
    fcmae export --checkpoint RUN --out DIR [--format F]   Hub-ready folder (timm, transformers, ONNX, ...)
    fcmae push --folder DIR --repo-id OWNER/NAME           upload an export to the Hugging Face Hub
    fcmae submit [SLURM FLAGS] -- TASK [FLAGS]             run a task as a Slurm job (requeued on preemption)
    fcmae data stats DIR | pack SRC --out DIR              channel statistics; folders packed into shards
    fcmae models                                           the registered models, params and GFLOPs

Several processes: ``accelerate launch -m fcmae pretrain ...`` (any Accelerate launch).
"""

from __future__ import annotations

import sys

from ..version import __version__

COMMANDS = {  # name -> (module, function, one line for --help)
    "pretrain": ("fcmae.tasks.pretrain.loop", "main", "FCMAE pretraining (the built-in demo without --data)"),
    "finetune": ("fcmae.tasks.classify.loop", "main", "image classification fine-tuning, linear probe, --eval-only"),
    "segment": ("fcmae.tasks.segment.loop", "main", "UPerNet semantic segmentation"),
    "detect": ("fcmae.tasks.detect.loop", "main", "Mask R-CNN detection and instance segmentation"),
    "predict": ("fcmae.cli.predict", "main", "predictions of a trained model on images, by its kind"),
    "embed": ("fcmae.cli.embed", "main", "pooled features of every image, to parquet"),
    "export": ("fcmae.cli.hub", "export", "a Hub-ready folder of any fcmae artifact"),
    "push": ("fcmae.cli.hub", "push", "upload an exported folder to the Hub"),
    "submit": ("fcmae.cli.submit", "main", "submit a task to Slurm"),
    "data": ("fcmae.cli.data", "main", "data tools: stats, pack"),
    "models": ("fcmae.cli.models", "main", "registered models with params and GFLOPs"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return (
        "usage: fcmae [--version] [--help] COMMAND [ARGS]\n\nFCMAE pretraining of ConvNeXt V2, fine-tuning and "
        "publishing.\n\ncommands:\n" + "\n".join(lines) + "\n\n`fcmae COMMAND --help` describes each; "
        "several processes: accelerate launch -m fcmae COMMAND ...\n"
    )


def main(argv: list[str] | None = None) -> None:
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"fcmae {__version__}")
        return
    if argv[0] not in COMMANDS:
        print(usage(), end="", file=sys.stderr)
        print(f"fcmae: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        sys.exit(2)
    module, function, _ = COMMANDS[argv[0]]
    try:
        result = getattr(importlib.import_module(module), function)(argv[1:], prog=f"fcmae {argv[0]}")
        sys.stdout.flush()
    except BrokenPipeError:
        _closed_stdout()
        raise
    if isinstance(result, int):
        sys.exit(result)


def _closed_stdout() -> None:
    """``fcmae predict ... | head``: the reader has gone, so stop as a Unix tool stops on SIGPIPE
    (silently, status 128 + 13), not with a traceback. Returns (and the error is re-raised) when
    stdout still works: then the broken pipe was something else's, a socket's, and is a real error."""
    import os
    import select

    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    if any(event & select.POLLERR for _, event in poll.poll(0)):  # a pipe with no reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(141)
