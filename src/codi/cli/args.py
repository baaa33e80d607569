"""One argument layer for every `codi` command: typed dataclasses, `--config x.yaml`, one-line errors.

A command declares its flags as dataclasses whose fields carry their help in `metadata["help"]`;
`parse` turns `--config preset.yaml` (repeatable; later files win) and flags (which win over the
YAML) into instances of them, built by `transformers.HfArgumentParser`. Each flag has one spelling,
its field's name (`--num_latent`: no `--num-latent` alias, no `--no_use_lora` complement); a bool
takes a value (`--use_lora False`) or none (`--compare_cot` means True). The help lists exactly
what is accepted. An unknown flag or YAML key, or a value of the wrong type, is a `UsageError` (a
ValueError, printed by the CLI as one line) naming the flag, or the YAML file and key, and the
closest valid names.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from transformers import HfArgumentParser

CONFIG_HELP = (
    "YAML file of `flag: value` pairs, read before the flags (repeatable; later files and flags win)."
)


# The reference's name for the number of latents at inference: the same setting as `num_latent`.
LATENT_ALIASES = {"inf_latent_iterations": "num_latent"}


class UsageError(ValueError):
    """A bad flag, YAML key or value: one line, exit status 2."""


def unknown_name_error(name: str, source: str, valid: Iterable[str], prog: str | None = None) -> UsageError:
    """`unknown argument 'x' in SOURCE. Did you mean: a, b?` (the closest of `valid`, if any is close)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=4, cutoff=0.6)
    close += [option for option in valid if option.startswith(name) and option not in close]  # --out
    if close:
        hint = f" Did you mean: {', '.join(close[:4])}?"
    else:
        hint = f" (`{prog} --help` lists the flags)" if prog else ""
    return UsageError(f"unknown argument {name!r} in {source}.{hint}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has one worth showing (not for required flags or None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


class CommandParser(HfArgumentParser):
    """`HfArgumentParser` for one `codi` command: `prog` in the usage line, one spelling per flag,
    `--config` listed, one flag group per dataclass when there are several, errors raised as
    `UsageError` instead of a usage dump and exit.

    Only public methods are overridden: `HfArgumentParser` declares each field with `add_argument`,
    which this class intercepts to keep the field's own name as the only option string, drop the
    `--no_X` complement of True-by-default bools, show bools as `true|false`, file each flag under
    its dataclass's group and record its action by field name (for the YAML checks).
    """

    def __init__(self, prog: str, classes: Sequence[type], description: str | None = None):
        # set before HfArgumentParser.__init__, which declares the fields through add_argument
        self.flag_actions: dict[str, argparse.Action] = {}
        self._owner = {f.name: cls for cls in classes for f in dataclasses.fields(cls) if f.init}
        self._grouped = len(classes) > 1
        self._groups: dict[type, Any] = {}
        super().__init__(
            list(classes),
            prog=prog,
            description=description or _first_paragraph(classes[0]),
            usage=" ".join([prog, *(f"--{name} {name.upper()}" for name in _required(classes))])
            + " [--config YAML] [--FLAG VALUE ...]",
            formatter_class=_HelpFormatter,
            allow_abbrev=False,  # `--num_lat` must not silently mean `--num_latent`
        )

    def add_argument(self, *options: str, **kwargs: Any) -> argparse.Action | None:
        name = options[0][2:] if options and options[0].startswith("--") else None
        if name not in self._owner or kwargs.get("dest", name) != name:
            if kwargs.get("action") == "store_false" and kwargs.get("dest") in self._owner:
                return None  # the `--no_X` complement of a field
            return super().add_argument(*options, **kwargs)  # -h/--help, --config
        if not self.flag_actions:  # first in the help; `split_config` reads it before argparse does
            super().add_argument("--config", metavar="YAML", default=argparse.SUPPRESS, help=CONFIG_HELP)
        if getattr(kwargs.get("type"), "__name__", "") == "string_to_bool":
            kwargs["metavar"] = "true|false"  # `--use_lora [true|false]`, not `[USE_LORA]`
        if self._grouped:
            action = self._group(self._owner[name]).add_argument(options[0], **kwargs)
        else:
            action = super().add_argument(options[0], **kwargs)
        self.flag_actions[name] = action
        return action

    def _group(self, cls: type) -> Any:
        if cls not in self._groups:
            about = _first_paragraph(cls)
            self._groups[cls] = self.add_argument_group(
                cls.__name__, None if about == self.description else about
            )
        return self._groups[cls]

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (`{self.prog} --help` lists the flags)")


def _required(classes: Sequence[type]) -> list[str]:
    missing = dataclasses.MISSING
    return [
        f.name
        for cls in classes
        for f in dataclasses.fields(cls)
        if f.init and f.default is missing and f.default_factory is missing
    ]


def _first_paragraph(cls: type) -> str:
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def split_config(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`--config` paths, the other tokens) of a command line."""
    paths, rest = [], []
    tokens = iter(argv)
    for token in tokens:
        if token == "--config":
            path = next(tokens, None)
            if path is None or path.startswith("--"):
                raise UsageError("--config needs a path to a YAML file")
            paths.append(path)
        elif token.startswith("--config="):
            paths.append(token.split("=", 1)[1])
        else:
            rest.append(token)
    return paths, rest


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping a `--config` file holds; a missing file or bad YAML is one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise UsageError(f"{path}: invalid YAML: {' '.join(str(error).split())}") from None
        except UnicodeDecodeError as error:  # a binary file (a checkpoint, an image) given as --config
            raise UsageError(
                f"{path}: not a YAML text file (byte 0x{error.object[error.start : error.start + 1].hex()} "
                "is not UTF-8)"
            ) from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of argument names to values at the top level")
    return values


def _tokens(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(item) for item in value]
    if isinstance(value, dict):
        return [json.dumps(value)]
    return [str(value)]


def _check_value(action: argparse.Action, tokens: list[str], where: str) -> None:
    """Convert a YAML value as argparse would, so a bad one names its file and key (not a flag)."""
    if action.nargs in ("+", "*"):
        if not tokens:
            raise UsageError(f"{where}: expected at least one value, got an empty list")
    elif len(tokens) != 1:
        raise UsageError(f"{where}: expected one value, got a list of {len(tokens)}")
    for token in tokens:
        try:
            value = action.type(token) if action.type else token
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            kind = getattr(action.type, "__name__", "value")
            kind = "boolean (true / false)" if kind == "string_to_bool" else kind
            raise UsageError(f"{where}: {token!r} is not a valid {kind}") from None
        if action.choices is not None and value not in action.choices:
            raise UsageError(f"{where}: {token!r} is not one of {', '.join(map(str, action.choices))}")


def check_null(action: argparse.Action, where: str) -> None:
    """A YAML `null` means "not given", which is right only where the default is None: for a field with
    another default (`num_latent: null`) it would silently keep that default."""
    if action.default is None or action.default is argparse.SUPPRESS:
        return
    kind = getattr(action.type, "__name__", "value")
    kind = "boolean (true / false)" if kind == "string_to_bool" else kind
    raise UsageError(
        f"{where}: null is not a valid {kind}; give a value, or leave the key out for the default ({action.default})"
    )


def yaml_to_argv(path: str, parser: CommandParser, aliases: Mapping[str, str] | None = None) -> list[str]:
    """A YAML preset as flags (checked key by key), so that later command-line flags override it."""
    aliases = aliases or {}
    argv: list[str] = []
    given: dict[str, tuple[str, list[str]]] = {}
    for key, value in read_yaml(path).items():
        name = aliases.get(str(key), str(key))
        if name not in parser.flag_actions:
            raise unknown_name_error(str(key), path, [*parser.flag_actions, *aliases], parser.prog)
        if value is None:
            check_null(parser.flag_actions[name], f"{path}: {key}")
            continue
        tokens = _tokens(value)
        _check_value(parser.flag_actions[name], tokens, f"{path}: {key}")
        _check_one_value(given, name, str(key), tokens, path)
        argv += [f"--{name}", *tokens]
    return argv


def _check_one_value(given: dict, name: str, spelling: str, tokens: list[str], where: str) -> None:
    """Two spellings of one setting (an alias and its field) in one source must agree: which one would
    win is not obvious, and e.g. `num_latent` and `inf_latent_iterations` are one count now."""
    other = given.setdefault(name, (spelling, tokens))
    if other[0] != spelling and other[1] != tokens:
        raise UsageError(
            f"{where}: {other[0]} {' '.join(other[1])} and {spelling} {' '.join(tokens)} set the same "
            f"setting ({name}) to different values; give it once"
        )


def normalise_flags(
    argv: Sequence[str], parser: CommandParser, aliases: Mapping[str, str] | None = None
) -> list[str]:
    """Rename alias flags and reject unknown ones with the closest names (argparse would only say
    'unrecognized arguments')."""
    aliases = aliases or {}
    valid = [*parser.flag_actions, *aliases]
    out = []
    given: dict[str, tuple[str, list[str]]] = {}
    for index, token in enumerate(argv):
        if token.startswith("--") and token not in ("--", "--help"):  # --help: argparse prints the flags
            name, sep, value = token[2:].partition("=")
            if name not in valid:
                raise unknown_name_error(name, "the command line", valid, parser.prog)
            following = argv[index + 1 : index + 2]
            tokens = [value] if sep else [t for t in following if not t.startswith("--")]
            _check_one_value(given, aliases.get(name, name), f"--{name}", tokens, "the command line")
            token = f"--{aliases.get(name, name)}{sep}{value}"
        out.append(token)
    return out


def parse(
    prog: str,
    classes: Sequence[type],
    argv: Sequence[str],
    *,
    aliases: Mapping[str, str] | None = None,
    description: str | None = None,
) -> tuple[Any, ...]:
    """`--config` files then flags -> one instance per dataclass in `classes` (in that order).

    `aliases` maps extra accepted names (in YAML and on the command line) to field names. `--help`
    prints the flags and raises SystemExit(0), as argparse does. Validation in the dataclasses'
    `__post_init__` raises its own ValueError.
    """
    parser = CommandParser(prog, classes, description)
    merged = _merged_argv(parser, argv, aliases)
    return tuple(parser.parse_args_into_dataclasses(args=merged, look_for_args_file=False))


def _merged_argv(parser: CommandParser, argv: Sequence[str], aliases: Mapping[str, str] | None) -> list[str]:
    paths, rest = split_config(argv)
    merged = [flag for path in paths for flag in yaml_to_argv(path, parser, aliases)]
    return merged + normalise_flags(rest, parser, aliases)


def parse_into(
    prog: str,
    classes: Sequence[type],
    into: type,
    argv: Sequence[str],
    *,
    aliases: Mapping[str, str] | None = None,
    description: str | None = None,
) -> Any:
    """As `parse`, into ONE instance of `into`, a dataclass with the fields of all `classes` (a config
    such as `codi.config.CODIConfig`): the flags and help come from `classes` (one group each), the
    defaults and help from `into` where it sets its own."""
    parser = CommandParser(prog, classes, description)
    declared = {f.name: f for cls in classes for f in dataclasses.fields(cls) if f.init}
    own = [f for f in dataclasses.fields(into) if f.init and f.name in declared]
    parser.set_defaults(**{f.name: f.default for f in own if f.default != declared[f.name].default})
    for f in own:  # the config's own help for a field it redefines (Coconut's num_latent)
        if f.metadata.get("help") and f.metadata != declared[f.name].metadata:
            parser.flag_actions[f.name].help = f.metadata["help"]
    namespace = parser.parse_args(_merged_argv(parser, argv, aliases))
    return into(**vars(namespace))


def optional_fields(
    name: str, source: type, names: Sequence[str], doc: str, notes: Mapping[str, str]
) -> type:
    """A dataclass of `source`'s fields `names`, each optional with default None (None: not given),
    `source`'s help followed by `notes[field]`, or by its default in `source` when it has no note:
    flags that override settings which otherwise come from elsewhere."""
    hints = typing.get_type_hints(source)
    fields = {f.name: f for f in dataclasses.fields(source)}
    spec = []
    for field_name in names:
        note = notes.get(field_name) or f"Default: {fields[field_name].default}."
        help_text = f"{fields[field_name].metadata.get('help', '')} {note}".strip()
        kind = hints[field_name]
        optional = kind if type(None) in typing.get_args(kind) else kind | None
        spec.append((field_name, optional, dataclasses.field(default=None, metadata={"help": help_text})))
    cls = dataclasses.make_dataclass(name, spec)
    cls.__doc__ = doc
    return cls
