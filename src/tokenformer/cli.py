"""The ``tokenformer`` command line: a table of verbs.

Each verb is a plain function in its own module of :mod:`tokenformer.commands` (for ``train``,
the :class:`~tokenformer.train.TrainConfig` dataclass gives the flags); jsonargparse builds its
flags, ``--config`` YAML support and ``--help`` with every default from the signature and
docstring. A new verb is one more module and one more entry in :data:`COMMANDS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from .commands.consolidate import consolidate
from .commands.convert import convert
from .commands.evaluate import evaluate
from .commands.generate import generate
from .commands.grow import grow
from .commands.presets import presets
from .commands.prune import prune
from .commands.scale import scale
from .commands.study import study
from .commands.train import train

COMMANDS: dict[str, Callable[..., Any]] = {
    "presets": presets,
    "train": train,
    "grow": grow,
    "prune": prune,
    "consolidate": consolidate,
    "generate": generate,
    "eval": evaluate,
    "convert": convert,
    "scale": scale,
    "study": study,
}
# Verbs whose required arguments are positional (`tokenformer scale PLAN.yaml`).
POSITIONAL = ("scale", "study")


def build_parser() -> ArgumentParser:
    from .train import TrainConfig

    parser = ArgumentParser(
        prog="tokenformer", description="TokenFormer: train, grow, prune, evaluate and sample language models."
    )
    subcommands = parser.add_subcommands()
    for name, command in COMMANDS.items():
        sub = ArgumentParser(description=(command.__doc__ or "").split("\n\n")[0])
        sub.add_argument("--config", action=ActionConfigFile, help="A YAML file of options; later flags override it.")
        if command is train:
            sub.add_class_arguments(TrainConfig, None, as_group=False)
        else:
            sub.add_function_arguments(command, None, as_group=False, as_positional=name in POSITIONAL)
        subcommands.add_subcommand(name, sub, help=(command.__doc__ or "").split("\n")[0])
    return parser


def main(argv: list[str] | None = None) -> None:
    import torch

    from .io import describe_os_error
    from .train import CheckpointError, TrainConfig, TrainingDiverged

    torch.set_flush_denormal(True)  # CPU training and inference are several times slower without it
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.subcommand
    try:
        if name == "train":
            options = args[name].clone()
            options.pop("config", None)
            train(TrainConfig.from_dict(options.as_dict()))
        else:
            COMMANDS[name](**{k: v for k, v in args[name].items() if k != "config"})
    except (
        ValueError,
        OSError,  # files and devices: disk full, read-only output, missing files, connections
        CheckpointError,
        TrainingDiverged,
        ImportError,
        RuntimeError,
    ) as exc:
        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        print(f"tokenformer {name}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
