"""The ``tokenformer`` command line: a table of verbs.

Each verb is a plain function in its own module of :mod:`tokenformer.commands`; jsonargparse
builds its flags, ``--config`` YAML support and ``--help`` with every default from the signature
and docstring. A new verb is one more module and one more entry in :data:`COMMANDS`.

The verbs of :func:`configured_verbs` take a config dataclass first (``train`` a
:class:`~tokenformer.train.TrainConfig`, ``scale`` and ``study`` their plans): its fields are the
verb's flags, nested ones dotted (``--train.seed 3``); ``--config`` fills them from a YAML file
or from a config shipped with the package, named without ``.yaml`` (``--config cpu-5M``,
``tokenformer scale --config demo``), and later flags override it. ``tokenformer scale PLAN`` is
short for ``tokenformer scale --config PLAN``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from . import __version__
from .commands.consolidate import consolidate
from .commands.convert import convert
from .commands.evaluate import evaluate
from .commands.export import export
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
    "export": export,
    "scale": scale,
    "study": study,
}
# Verbs whose first argument may be the config without --config (`tokenformer scale PLAN.yaml`).
CONFIG_FIRST = ("scale", "study")
# Verbs whose leading arguments may be given without their flags (`tokenformer export RUN OUT`).
POSITIONAL = {"export": ("run", "out")}
# The YAML configs shipped with the package; each configured verb looks in its own folder.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def configured_verbs() -> dict[str, tuple[type, str]]:
    """Verbs configured by a dataclass: (the dataclass, its folder in :data:`PACKAGED_CONFIGS`)."""
    from .experiments.scaling import ScalingPlan
    from .experiments.study import StudyPlan
    from .train import TrainConfig

    return {"train": (TrainConfig, "."), "scale": (ScalingPlan, "scaling"), "study": (StudyPlan, "studies")}


def packaged_configs(folder: str) -> list[str]:
    """Names of the configs shipped in ``folder`` of :data:`PACKAGED_CONFIGS`."""
    return sorted(path.stem for path in (PACKAGED_CONFIGS / folder).glob("*.yaml"))


def find_config(value: str, folder: str) -> str:
    """``value`` when it is a file (or YAML text), else the shipped config of that name in ``folder``
    (``cpu-5M``, ``demo``; also ``scaling/demo``, relative to the packaged configs)."""
    if Path(value).is_file() or not re.fullmatch(r"[\w.+/-]+", value):
        return value
    for candidate in (PACKAGED_CONFIGS / folder / value, PACKAGED_CONFIGS / value):
        for path in (candidate, candidate.with_name(candidate.name + ".yaml")):
            if path.is_file():
                return str(path)
    shipped = ", ".join(packaged_configs(folder)) or "none"
    raise ValueError(f"--config {value!r} is neither a file nor a config shipped with tokenformer; shipped: {shipped}")


def _config_action(folder: str, config_class: type) -> type[ActionConfigFile]:
    class PackagedConfigFile(ActionConfigFile):
        def __call__(self, parser, cfg, values, option_string=None):
            try:
                values = find_config(values, folder)
                check_layout(config_class, values)
            except ValueError as exc:
                parser.error(str(exc))
            super().__call__(parser, cfg, values, option_string)

    return PackagedConfigFile


def check_layout(config_class: type, source: str) -> None:
    """A config class with ``check_layout(data)`` (a scaling plan) refuses a file of an older
    layout with what to move where, before the flags parser meets its unknown keys."""
    check = getattr(config_class, "check_layout", None)
    if check is None:
        return
    import yaml

    data = yaml.safe_load(Path(source).read_text() if Path(source).is_file() else source)
    if isinstance(data, dict):
        check(data)


def flagged(args: list[str], names: tuple[str, ...]) -> list[str]:
    """``args`` with its leading values (those before the first flag) given their flags, in the
    order of ``names``: ``[RUN, OUT, --ema, true]`` -> ``[--run, RUN, --out, OUT, --ema, true]``."""
    leading = 0
    while leading < min(len(args), len(names)) and not args[leading].startswith("-"):
        leading += 1
    named = [item for name, value in zip(names, args[:leading], strict=False) for item in (f"--{name}", value)]
    return [*named, *args[leading:]]


def build_parser() -> ArgumentParser:
    # A value never names code to import: jsonargparse would import the module of a
    # ``class_path`` in any option typed Any (model_overrides), from a flag or a --config file,
    # before any check could refuse it. Denied, such a value stays plain data, which the
    # configs refuse (tokenformer.validation.check_plain_data). Our own dataclasses stay
    # importable: jsonargparse names them so to parse a list of them (a plan's stages).
    set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=["tokenformer"])
    parser = ArgumentParser(
        prog="tokenformer", description="TokenFormer: train, grow, prune, evaluate and sample language models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subcommands()
    configured = configured_verbs()
    for name, command in COMMANDS.items():
        sub = ArgumentParser(description=(command.__doc__ or "").split("\n\n")[0])
        if name in configured:
            config_class, folder = configured[name]
            shipped = ", ".join(packaged_configs(folder))
            what = f"A YAML file of options, or a config shipped with tokenformer ({shipped})"
            sub.add_argument(
                "--config", action=_config_action(folder, config_class), help=f"{what}; later flags override it."
            )
            sub.add_class_arguments(config_class, None, as_group=False)
            skip = {next(iter(inspect.signature(command).parameters)), "command"}
            sub.add_function_arguments(command, None, as_group=False, skip=skip)
        else:
            sub.add_argument(
                "--config", action=ActionConfigFile, help="A YAML file of options; later flags override it."
            )
            sub.add_function_arguments(command, None, as_group=False)
        subcommands.add_subcommand(name, sub, help=(command.__doc__ or "").split("\n")[0])
    return parser


def main(argv: list[str] | None = None) -> None:
    import torch

    from .io import describe_os_error
    from .train import CheckpointError, TrainingDiverged

    torch.set_flush_denormal(True)  # CPU training and inference are several times slower without it
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] in CONFIG_FIRST and not argv[1].startswith("-"):
        argv.insert(1, "--config")
    if argv and argv[0] in POSITIONAL:
        argv = [argv[0], *flagged(argv[1:], POSITIONAL[argv[0]])]
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.subcommand
    command = COMMANDS[name]
    options = args[name].clone()
    options.pop("config", None)
    options = options.as_dict()
    try:
        configured = configured_verbs()
        if name in configured:
            config_class = configured[name][0]
            fields = {f.name for f in dataclasses.fields(config_class)}
            config = config_class.from_dict({k: v for k, v in options.items() if k in fields})
            extra = {k: v for k, v in options.items() if k not in fields}
            if "command" in inspect.signature(command).parameters:  # recorded in the verb's report
                extra["command"] = shlex.join(["tokenformer", *argv])
            command(config, **extra)
        else:
            command(**options)
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
    except KeyboardInterrupt as exc:  # Ctrl-C; training says what it saved (TrainingInterrupted)
        print(f"tokenformer {name}: {exc or 'interrupted'}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
