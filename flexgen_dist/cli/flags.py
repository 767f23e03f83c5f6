"""Command-line flags generated from the typed configuration (config.py, policy.py): a field
`gpu_batch_size` is the flag `--gpu-batch-size`, its docstring the help, its default the default."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from ..core.config import (
    EngineConfig,
    GenerationConfig,
    JobConfig,
    field_docs,
    field_types,
)
from ..core.errors import FlexGenError

ALIASES = {"max_new_tokens": ["--gen-len"]}  # FlexGen's name for it stays the documented one


# the flags `plan` and `run` share, in one definition: which model, and what work to plan or run
MODEL_FIELDS = ((JobConfig, ("model", "tokenizer")), (EngineConfig, ("dummy_weights", "dtype", "offload_dir")))
WORKLOAD_FIELDS = ((JobConfig, ("prompts", "prompt_len", "num_prompts")), (GenerationConfig, ("max_new_tokens",)))
SHARED_FIELDS = tuple(name for _, names in MODEL_FIELDS + WORKLOAD_FIELDS for name in names)


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags end with one line `error: ...` and status 2, like every other bad input."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says what the default means."""

    def _get_help_string(self, action) -> str:
        if "(default" in (action.help or "") or action.default in (None, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def str2bool(value: str) -> bool:
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _unwrap_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return tp


def _flag_options(tp, default) -> dict:
    """argparse keyword arguments for a field of type `tp`."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:  # `--overlap` alone means true; `--overlap 0` false
        return dict(type=str2bool, nargs="?", const=True, metavar="0|1")
    if origin is typing.Literal:
        choices = list(typing.get_args(tp))
        return dict(type=type(choices[0]), choices=choices)
    if origin is list:
        if typing.get_args(tp) == (float,):
            return dict(type=float_list, metavar="X,X,...")
        return dict(type=int_list, metavar="N,N,...")
    return dict(type=tp)


def flag_name(field_name: str) -> str:
    """The command-line flag of a configuration field: `gpu_batch_size` -> `--gpu-batch-size` (a
    field with a documented alias goes by the alias: `max_new_tokens` -> `--gen-len`)."""
    return ALIASES.get(field_name, [f"--{field_name.replace('_', '-')}"])[0]


def add_shared_fields(parser: argparse.ArgumentParser) -> None:
    """The model and workload flags, as `plan` and `run` both take them."""
    for title, description, fields in (("model", "Which model, in what dtype, offloaded where.", MODEL_FIELDS),
                                       ("workload", "The prompts and how many tokens to generate.", WORKLOAD_FIELDS)):
        group = parser.add_argument_group(title, description)
        for cls, names in fields:
            add_fields(parser, cls, only=names, group=group)


def add_fields(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), title: str | None = None,
               only: tuple[str, ...] | None = None, group=None):
    """One flag per field of dataclass `cls` (those in `only`, if given, and not in `skip`), in
    `group` or a new group titled `title`."""
    if group is None:
        group = parser.add_argument_group(title or cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    docs, types = field_docs(cls), field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = ALIASES.get(f.name, []) + [f"--{f.name.replace('_', '-')}"]
        options = _flag_options(types[f.name], default)
        if f.name in ALIASES and "metavar" not in options:  # --gen-len's value, not MAX_NEW_TOKENS
            options["metavar"] = ALIASES[f.name][0].lstrip("-").replace("-", "_").upper()
        group.add_argument(*names, dest=f.name, default=default, help=docs.get(f.name, ""), **options)
    return group


def check_config_keys(values: dict, parser: argparse.ArgumentParser, path: str) -> None:
    known = {a.dest for a in parser._actions} | {a.lstrip("-").replace("-", "_") for n in ALIASES.values() for a in n}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FlexGenError(f"config file {path}: unknown key {unknown[0]!r}")


def config_defaults(values: dict) -> dict:
    """Config-file keys as destinations (`gen_len` is `max_new_tokens`)."""
    renamed = {a.lstrip("-").replace("-", "_"): dest for dest, flags in ALIASES.items() for a in flags}
    return {renamed.get(k, k): v for k, v in values.items()}
