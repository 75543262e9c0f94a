"""User-facing errors and the one wrapper every CLI entry point runs under.

An `EhrlongError` is a problem with what the user gave us (a file, a column, a config key), not a bug.
Its message names the input, the rule it broke and the fix; the CLI prints it as one paragraph and
exits 2 without a traceback (set EHRLONG_DEBUG=1 to see one).
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


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main(argv)` and turn `EhrlongError` into a clean message and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(argv)
    except EhrlongError as e:
        if os.environ.get("EHRLONG_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
