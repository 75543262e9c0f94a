"""User-facing errors and the one wrapper every CLI entry point runs under.

An `EhrlongError` is a problem with what the user gave us (a file, a column, a config key), not a bug.
Its message names the input, the rule it broke and the fix; the CLI prints it as one paragraph and
exits 2 without a traceback. `debug=true` on any command line (or EHRLONG_DEBUG=1 in the environment)
shows the traceback instead.

Input errors are raised where the input is read (a parquet shard, a YAML file, a checkpoint), so the
message can name the file, column or key; `run_cli` never turns other exceptions into clean messages,
because an exception nobody anticipated is a bug and its traceback is what fixes it (issue 8).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


class EhrlongError(Exception):
    """A problem with user input. The message must say what, where, and how to fix it."""


class ConfigError(EhrlongError):
    """A bad config key, value or preset name."""


class DataError(EhrlongError):
    """Bad MEDS data, labels or token store."""


EXIT_USER_ERROR = 2
DEBUG_KEY = "debug"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def first_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters: what a library said went wrong,
    short enough to quote inside one paragraph (polars appends query plans, torch a page of advice)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """(argv without `debug=...`, whether debug is on). The key is taken out before the command parses
    its own keys, so every command accepts it; EHRLONG_DEBUG=1 turns it on too."""
    rest, debug = [], bool(os.environ.get("EHRLONG_DEBUG", "").strip() not in ("", *_FALSE))
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == DEBUG_KEY:
            v = value.strip().lower()
            if v not in (*_TRUE, *_FALSE):
                raise ConfigError(
                    f"{arg!r}: debug takes true or false (debug=true shows the traceback of an error)."
                )
            debug = v in _TRUE
        else:
            rest.append(arg)
    return rest, debug


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main(argv)` and turn `EhrlongError` into a one-paragraph `error: ...` and exit code 2.

    With debug on (`debug=true` or EHRLONG_DEBUG=1) the error is re-raised, traceback and all."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    try:
        argv, debug = split_debug(argv)
        code = main(argv)
    except EhrlongError as e:
        if debug:
            raise
        # One paragraph: messages that list several problems keep them on one line each, no blank lines.
        text = "\n".join(line for line in str(e).splitlines() if line.strip())
        print(f"error: {text}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
