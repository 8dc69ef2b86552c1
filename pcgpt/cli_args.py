"""How the `pcgpt` command parses: one-line errors, help that shows defaults, and argument types
that reject a bad value while parsing. Nothing here imports torch or the server, so `--help` and a
mistyped flag are answered before either loads."""

import argparse
import math
import re
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr, naming the flag, and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Formatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless the help already says it or there is none."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=100)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or default == []
                or "(default" in text or "default:" in text
                or action.option_strings == []
                or isinstance(action, argparse._HelpAction)):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".lstrip() if text else f"default: {shown}"


class SubcommandParser(Parser):
    """A subcommand's parser: one-line errors, and help that shows each flag's default."""

    def __init__(self, *args, formatter_class=None, **kwargs):
        super().__init__(*args, formatter_class=formatter_class or Formatter, **kwargs)


def _check(parse, test, what):
    """An argparse type: parse, then test, else 'must be WHAT'."""
    def convert(text):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value
    convert.__name__ = what
    return convert


def _finite(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


positive_int = _check(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _check(int, lambda v: v >= 0, "an integer >= 0")
nonnegative_float = _check(_finite, lambda v: v >= 0, "a number >= 0")
temperature = _check(_finite, lambda v: 0 <= v <= 100, "a number in [0, 100]")
top_p = _check(_finite, lambda v: 0 < v <= 1, "a number in (0, 1]")
unit_interval = _check(_finite, lambda v: 0 <= v <= 1, "a number in [0, 1]")
port = _check(int, lambda v: 0 <= v <= 65535, "a port number (0-65535)")


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}" if not Path(text).exists()
                                          else f"{text} is not a file")
    return text


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return text


def writable_file(text: str) -> str:
    """A file to be written at the end of a long command: its directory must exist now."""
    parent = Path(text).parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"the directory {parent} does not exist")
    return text


def device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: must be auto, cpu, cuda, cuda:N or mps")
    return text


def int_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2], each >= 0."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be integers >= 0, e.g. 0,1,2,4")
    return values


def count_or_all(text: str) -> int | None:
    """A positive count, or 'all' (None)."""
    if text == "all":
        return None
    return positive_int(text)


DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")  # pcgpt/model/device.py's names
