"""What lmkit's programs share on the command line: options, help, one-line errors and warnings.

``lmkit`` (`lmkit.cli`) and ``python -m lmkit.lab.experiments`` build their parsers from these
pieces, so that both behave alike:

- a run's options come from four places, later ones winning: the dataclass defaults
  (`lmkit.config`), a model preset (``--preset llama``: `lmkit.config.PRESETS`), a TOML file
  (sections ``[model]``, ``[train]``, ``[parallel]``, `load_toml`) and the flags, one per config
  field (`add_config_flags`); `resolve_configs` merges and validates them;
- `HelpFormatter` shows every option's default where it has one (never a bare "None");
- `Parser` turns a bad argument into one line and exit status 2 (`UsageError`), no usage dump;
- `one_line_warnings` prints a warning that reaches the terminal as ``lmkit: warning: ...``, one
  line, instead of Python's two (with the source line that raised it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmkit.config import (
    CORPUS_NAMES,
    PRESETS,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    describe,
    from_dict,
    model_preset,
)

__all__ = [
    "UsageError", "Parser", "HelpFormatter", "one_line_warnings", "SECTIONS", "add_config_flags", "load_toml",
    "resolve_configs",
]

SECTIONS = {"model": ModelConfig, "train": TrainConfig, "parallel": ParallelConfig}


class UsageError(Exception):
    """A user mistake on the command line: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one `UsageError` line naming ``--help``."""

    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to an option's help where the default is a value: not to flags
    (off unless given), required options or options without a value, whose help says in words what
    happens without them, nor where the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.nargs == 0 or action.required or action.default is None or "(default" in text):
            return text
        return super()._get_help_string(action)


def _warn_in_one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    print(f"lmkit: warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within the block, a warning is printed as one line ``lmkit: warning: <message>`` on stderr
    (the warning filters still decide which are shown); the previous behaviour is restored after."""
    with warnings.catch_warnings():
        warnings.showwarning = _warn_in_one_line
        yield


# --------------------------------------------------------------------------- a run's options


def _corpus(value: str) -> str:
    """A corpus name, or several joined with '+' (argparse type of ``--corpus``)."""
    unknown = [part for part in value.split("+") if part.strip() not in CORPUS_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {unknown[0]!r} (choose from {', '.join(map(repr, CORPUS_NAMES))}; join several "
            "with '+')")
    return value


def _device(value: str) -> str:
    """auto, cpu, cuda or cuda:N (argparse type of ``--device``)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is None:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from 'auto', 'cpu', 'cuda', "
                                         "'cuda:N')")
    return value


_TYPES = {"corpus": _corpus, "device": _device}  # enumerated, but not a fixed list of strings


def _preset_help() -> str:
    """``--preset``'s help: what each of `lmkit.config.PRESETS` sets."""
    sets = {name: ", ".join(f"{k}={v}" for k, v in fields.items()) or "the defaults (GPT-2's network)"
            for name, fields in PRESETS.items()}
    sets["llama"] += ", n_kv_head=n_head/2 unless given (grouped-query attention; n_head when odd)"
    listed = "; ".join(f"{name} = {what}" for name, what in sets.items())
    return (f"network the [model] options start from, below the TOML file and the flags: {listed} "
            "(default: no preset, the [model] defaults)")


def add_config_flags(parser: argparse.ArgumentParser, section: str, cls: type) -> None:
    """One flag per dataclass field: its description, choices and default come from `lmkit.config`.

    The model's section also gets ``--preset`` (`lmkit.config.model_preset`), a flag only: the
    values it stands for sit below the TOML file and the flags (`resolve_configs`).
    """
    if cls is ModelConfig:
        parser.add_argument("--preset", dest="model_preset", choices=sorted(PRESETS), default=None,
                            help=_preset_help())
    group = parser.add_argument_group(f"[{section}] options (also settable in the TOML file)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text, choices = describe(f)
        default = f.default
        shown = f"{text} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=f"{section}.{f.name}", action=argparse.BooleanOptionalAction,
                               default=None, help=shown)
        elif f.name in _TYPES:
            group.add_argument(flag, dest=f"{section}.{f.name}", type=_TYPES[f.name], default=None,
                               metavar="{" + ",".join(map(str, choices)) + "}", help=shown)
        else:
            group.add_argument(flag, dest=f"{section}.{f.name}", type=type(default), default=None,
                               choices=choices, help=shown,
                               metavar=None if choices else type(default).__name__.upper())


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a run config; only the sections ``[model]``, ``[train]`` and ``[parallel]`` are allowed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"config file {path} has unknown section(s) {unknown}; use {sorted(SECTIONS)}")
    return values


def resolve_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, ParallelConfig]:
    """Defaults < model preset (``--preset``) < TOML file < flags; every value validated."""
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if getattr(args, "config", None):
        for section, items in load_toml(args.config).items():
            known = [f.name for f in dataclasses.fields(SECTIONS[section])]
            unknown = sorted(set(items) - set(known))
            if unknown:
                close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.4)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"config file {args.config}: [{section}] has unknown key(s) {unknown}; "
                                  f"{hint}known keys: {', '.join(known)}")
            values[section].update(items)
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            values[section][name] = value
    preset = getattr(args, "model_preset", None)
    model_cfg = (model_preset(preset, **values["model"]) if preset
                 else from_dict(ModelConfig, values["model"]))
    train_cfg = from_dict(TrainConfig, values["train"])
    parallel_cfg = from_dict(ParallelConfig, values["parallel"])
    return model_cfg.validate(), train_cfg.validate(), parallel_cfg.validate()
