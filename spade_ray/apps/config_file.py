"""``--config FILE``: the options of any ``spade-ray`` command from a YAML or TOML file.

A nightly job, a notebook session and a colleague's rerun should use the same settings without
copying a long command line around, so every command accepts ``--config FILE``.  The file's keys
are the commands' long option names (``image-k`` or ``image_k`` for ``--image-k``); options given
on the command line win over the file, and what neither sets is left to the bank (``score``'s
scoring settings) and then to the defaults::

    # spade-ray.toml
    storage-options = {endpoint_url = "http://minio:9000"}   # top level: every command that has the option
    batch-size = 8

    [score]                                                  # a table per command: that command only
    bank = "s3://plant/banks/line3"
    visuals = "all"

Rules (each enforced here, each error names the key and the file, exit code 2 like any usage error):

* a top-level key applies to every command that has that option and is skipped by the others;
  a key that no command has is refused (a typo must not be silently ignored);
* a table named after a command (``[score]``, ``score:`` in YAML) applies to that command only,
  wins over the top-level keys, and every key in it must be one of that command's options;
* values are checked by the option's own argparse type and choices, then handed to argparse as
  if typed before the command line's own options, so the command line wins by argparse's own
  "last one wins"; ``true`` gives a flag (``quiet = true``), ``false`` leaves it off; a mapping
  (``storage-options``) is passed as JSON, a list as comma-separated text (``write``);
* positional arguments (INPUT, DATASET, FEATURES) stay on the command line.

YAML needs PyYAML (a runtime dependency); TOML uses the standard library's ``tomllib`` (Python
3.11+) or, on 3.10, the ``tomli`` package when installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["add_config_option", "load_config", "parse_args"]

_NOT_FROM_A_FILE = {"help", "config"}


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Declare ``--config`` on a command, so its ``--help`` documents it (the file is read by :func:`parse_args`)."""
    parser.add_argument("--config", metavar="FILE",
                        help="read options from a YAML (.yaml/.yml) or TOML (.toml) file whose keys are the long option "
                        "names (top level: every command; a [COMMAND] table: that command); options on the command "
                        "line win, then the file, then the bank's settings, then the defaults")


def load_config(path: str) -> dict[str, Any]:
    """The mapping in a YAML or TOML file (a local path or any fsspec URL), chosen by its extension."""
    from spade_ray.storage.urls import read_bytes

    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".toml"):
        raise ValueError(f"--config {path}: use a .yaml, .yml or .toml file")
    try:
        text = read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    try:
        data = _parse_toml(text) if ext == ".toml" else _parse_yaml(text)
    except ValueError as exc:
        raise ValueError(f"--config {path}: not valid {ext[1:].upper()}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _parse_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)  # safe_load: plain data only, never Python objects
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def _parse_toml(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ValueError("TOML needs Python 3.11+ or the tomli package; or write the file as YAML") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(str(exc)) from None


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``image-k`` -> the action of ``--image-k``, for every long option a file may set."""
    found = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option[2:] not in _NOT_FROM_A_FILE:
                found[option[2:]] = action
    return found


def _key(key: object) -> str:
    return str(key).replace("_", "-")


def _settings_for(command: str, commands: dict[str, argparse.ArgumentParser], data: dict[str, Any],
                  where: str) -> dict[str, Any]:
    """The file's settings for ``command``: top-level keys it has, then its own table's keys (which win)."""
    options = {name: _long_options(p) for name, p in commands.items()}
    parser = commands[command]
    shared: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = _key(raw_key)
        if key in commands and isinstance(value, dict):
            for inner_key, inner in value.items():
                if _key(inner_key) not in options[key]:
                    commands[key].error(f"{where}: [{raw_key}] {inner_key!r} is not an option of spade-ray {key} "
                                        "(keys are long option names without the dashes; positional arguments "
                                        "go on the command line)")
                if key == command:
                    own[_key(inner_key)] = inner
        elif key in options[command]:
            shared[key] = value
        elif not any(key in known for known in options.values()):
            parser.error(f"{where}: {raw_key!r} is not an option of any spade-ray command "
                         f"(nor a command's table: {', '.join(commands)})")
    return {key: value for key, value in {**shared, **own}.items() if value is not None}


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _tokens(parser: argparse.ArgumentParser, key: str, value: Any, where: str) -> list[str]:
    """The argv tokens of one setting, after checking it with the option's own type and choices."""
    action = _long_options(parser)[key]
    option = f"--{key}"
    if action.nargs == 0 or (action.nargs == "?" and isinstance(value, bool)):  # a flag (store_true, ...)
        if not isinstance(value, bool):
            parser.error(f"{where}: {key} is a flag: set it to true or false, not {value!r}")
        return [option] if value else []
    if isinstance(value, bool):
        parser.error(f"{where}: {key} takes a value ({action.metavar or action.dest.upper()}), not {str(value).lower()}")
    text = _text(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"{where}: {key}: invalid value {text!r} ({exc})")
    if action.choices is not None and converted not in action.choices:
        parser.error(f"{where}: {key}: {converted!r} is not one of {', '.join(map(str, action.choices))}")
    return [f"{option}={text}"]  # one token: a value starting with '-' is not taken for an option


def _given(args: Sequence[str], action: argparse.Action) -> bool:
    return any(arg == opt or arg.startswith(opt + "=") for arg in args for opt in action.option_strings)


def _drop_overridden_alternatives(parser: argparse.ArgumentParser, settings: dict[str, Any],
                                  args: Sequence[str]) -> dict[str, Any]:
    """Leave out file settings whose mutually exclusive alternative is on the command line (the flag wins).

    ``build-bank --add-to BANK`` with ``output`` in the file means "add to BANK", not a usage error.
    """
    options = _long_options(parser)
    for group in parser._mutually_exclusive_groups:
        given = [action for action in group._group_actions if _given(args, action)]
        if given:  # the file's same option stays (checked, then overridden by the command line's)
            settings = {k: v for k, v in settings.items() if options[k] not in group._group_actions or options[k] in given}
    return settings


def _find_config(argv: Sequence[str]) -> str | None:
    pre = argparse.ArgumentParser(prog="spade-ray", add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    return known.config


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the settings of ``--config FILE`` (if given) inserted before the command line's.

    ``argv`` is read once to find ``--config``; the file's settings become option tokens placed
    right after the command name, so argparse converts and checks them as usual and every option
    typed on the command line, coming later, wins.
    """
    argv = list(argv) if argv is not None else sys.argv[1:]
    path = _find_config(argv)
    commands = _commands(parser)
    at = next((i for i, arg in enumerate(argv) if arg in commands), None)
    if path is None or at is None:
        return parser.parse_args(argv)
    command, rest = argv[at], argv[at + 1:]
    try:
        data = load_config(path)
    except ValueError as exc:
        commands[command].error(str(exc))
    settings = _drop_overridden_alternatives(commands[command], _settings_for(command, commands, data, path), rest)
    tokens = [token for key, value in settings.items() for token in _tokens(commands[command], key, value, path)]
    args = parser.parse_args([*argv[: at + 1], *tokens, *rest])
    if args.config != path:
        parser.error(f"--config was read as {path!r} but parsed as {args.config!r}; spell it out as --config FILE")
    return args
