"""Command-line parsing shared by the entry points: absl's flags parser and argparse's value types.

`parse_flags` is the `flags_parser` of the absl entry points (`tam_jax.main`, `tam_jax.reproduce`): a
config file that fails, an override of a key the config does not have, or a value of the wrong type ends in
one `error:` line that names the flag and the fix (exit status 2, as absl and argparse use for usage
errors), instead of the traceback ml_collections raises.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from absl import flags

from tam_jax.errors import BUG_STATUS, UserError, bug_message

USAGE_STATUS = 2
# absl / Python conversion messages -> what the value should have been.
_EXPECTED = (("invalid literal for int()", "an integer"), ("could not convert string to float", "a number"),
             ("Non-boolean argument", "true or false"), ("not a valid bool", "true or false"))


def _overrides(argv: list[str]) -> list[str]:
    """The `--config.a.b=value` arguments of `argv`, as given."""
    return [arg for arg in argv if arg.startswith("--config.")]


def _unknown_key_message(argv: list[str], error: Exception) -> str:
    """One line for an override of a key the config does not have (ml_collections' AttributeError or
    KeyError, whose text holds the missing name and, when close, a "Did you mean")."""
    while isinstance(error, Exception) and error.args and isinstance(error.args[0], Exception):
        error = error.args[0]  # ml_collections wraps the KeyError that holds the text in an AttributeError
    text = str(error.args[0] if error.args else error)
    missing = text.split("\n")[0].strip("'\"")
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    for arg in _overrides(argv):
        path = arg[len("--config."):].split("=")[0]
        if missing in path.split("."):
            hint = ""
            if suggestion:
                hint = f" Did you mean --config.{path.replace(missing, suggestion.group(1), 1)}?"
            return f"{arg}: the config has no key {path!r}.{hint or _known_keys(path)}"
    return f"a --config override names a key the config does not have ({missing!r})."


def _known_keys(path: str) -> str:
    """A sentence listing the keys of `path`'s section in the default config (or its top-level keys)."""
    from tam_jax.configuration import default_config

    section = path.split(".")[0]
    defaults = default_config()
    if "." in path and section in defaults and hasattr(defaults[section], "keys"):
        return f" The keys of config.{section} are: {', '.join(defaults[section].keys())}."
    return f" The config's top-level keys are: {', '.join(defaults.keys())}."


def _user_error_inside(error: BaseException) -> UserError | None:
    """The innermost UserError among `error` and the exceptions it was raised while handling: what a
    config file raised, under the copies ml_collections and absl wrap around it."""
    found = None
    while error is not None:
        if isinstance(error, UserError):
            found = error
        error = error.__context__
    return found


def _unloadable_config_message() -> str | None:
    """One line for a config file flag whose file could not be loaded (ml_collections keeps the error
    until the config is read), or None."""
    for name in flags.FLAGS:
        value = flags.FLAGS[name].value
        error = vars(value).get("_error") if hasattr(value, "__dict__") else None
        if isinstance(error, Exception):
            reason = [line.strip() for line in str(error).split("\n") if line.strip()][-1]
            given = flags.FLAGS[name].serialize().split("=", 1)[-1]
            return (f"--{name}={given}: cannot load the config file ({reason}); give the path of a config "
                    "file such as configs/demo.py.")
    return None


def _flag_error_message(error: flags.Error) -> str:
    """absl's message for a flag, on one line: the expected type where a value did not convert."""
    first = str(error).strip().split("\n")[0]
    for needle, expected in _EXPECTED:
        if needle in str(error):
            flag = re.match(r"flag (--\S+?)(?::|$)", first)
            return f"{flag.group(1) if flag else first}: expected {expected}."
    if "Error whilst parsing config file" in first:
        last = [line for line in str(error).strip().split("\n") if line.strip()][-1].strip()
        return f"{first.rstrip(':')}: {last}"
    return first


def _make_configs_importable(argv: list[str]) -> None:
    """Put the folder above a `--config=DIR/configs/x.py` file on `sys.path`, so that config files import
    their shared settings as `from configs import common` (as the Flax examples do) from any directory."""
    for arg in argv:
        if arg.startswith("--config="):
            folder = Path(arg[len("--config="):].split(":")[0]).resolve().parent
            if folder.name == "configs" and str(folder.parent) not in sys.path:
                sys.path.insert(0, str(folder.parent))


_METHOD_OVERRIDE = "--config.methods."


def apply_method_options(config, overrides: list[str]) -> None:
    """Give `config.methods` a section per registered method (after importing `config.plugins`), holding
    its defaults, then apply `--config.methods.NAME.KEY=VALUE` overrides, each typed as its default.
    Raises UserError naming the argument."""
    from tam_jax import methods
    from tam_jax.configuration import typed_value
    from tam_jax.errors import ConfigError

    methods.import_plugins(config.plugins)
    with config.unlocked():
        for name in methods.names():
            config.methods[name] = methods.options(config, methods.get(name)).as_configdict()
    for arg in overrides:
        path, sep, text = arg[len(_METHOD_OVERRIDE):].partition("=")
        name, _, key = path.partition(".")
        if not sep or name not in config.methods:
            raise ConfigError(f"{arg}: expected --config.methods.NAME.KEY=VALUE with NAME one of "
                              f"{', '.join(methods.names())}.")
        if key not in config.methods[name]:
            known = ", ".join(config.methods[name].keys()) or "none"
            raise ConfigError(f"{arg}: method {name!r} has no option {key!r}; its options are {known}.")
        config.methods[name][key] = typed_value(text, config.methods[name][key], arg.split("=")[0])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's `flags_parser`: parse `argv`, or print one `error:` line and exit with status 2.

    `--config.methods.NAME.KEY=VALUE` overrides are applied after the config file is loaded and the
    registered methods' options are filled in (`apply_method_options`)."""
    _make_configs_importable(argv)
    method_overrides = [arg for arg in argv if arg.startswith(_METHOD_OVERRIDE)]
    argv = [arg for arg in argv if not arg.startswith(_METHOD_OVERRIDE)]
    # ml_collections finds `--config.*` overrides in sys.argv itself: it must not see these.
    sys.argv = [arg for arg in sys.argv if not arg.startswith(_METHOD_OVERRIDE)]
    try:
        remaining = flags.FLAGS(argv)
        message = _unloadable_config_message()
        if message is None:
            if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
                apply_method_options(flags.FLAGS["config"].value, method_overrides)
            return remaining
    except Exception as e:
        inner = _user_error_inside(e)
        if inner is not None:  # a config file's own check, e.g. a bad `configs/x.py:shot=abc`
            message = str(inner)
        elif isinstance(e, flags.Error):
            message = _flag_error_message(e)
        elif isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override of a missing key
            message = _unknown_key_message(argv, e)
        else:
            print(bug_message(e), file=sys.stderr)
            sys.exit(BUG_STATUS)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_STATUS)


# ----------------------------------------------------------------------------------------------------
# argparse types: a bad value is argparse's `error: argument --FLAG: ...` line (status 2), before any work.


def int_at_least(minimum: int, note: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`; `note` says what the minimum means, e.g. "0: all"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            meaning = f" ({note})" if note else ""
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{meaning}, got {value}")
        return value

    return parse


def lam_value(text: str) -> float:
    """An argparse type: a soft-min temperature, a number >= 0 (0: the hard minimum)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"lambda must be >= 0 (0: the hard minimum), got {text!r}")
    return value


def comma_separated(parse: Callable[[str], object], what: str) -> Callable[[str], list]:
    """An argparse type: comma-separated values, each read by the argparse type `parse`; `what` names
    them in the error, e.g. "integers >= 1"."""

    def parse_all(text: str) -> list:
        try:
            values = [parse(part.strip()) for part in text.split(",") if part.strip()]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r} ({e})") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values

    return parse_all
