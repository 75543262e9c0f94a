"""`python -m ehrlong.data COMMAND key=value ...`

Each command lives in its own module, which exposes an `Args` dataclass (parsed by the shared
`ehrlong.config.parse`) and `run(args) -> int`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from ehrlong.config import parse
from ehrlong.errors import ConfigError, run_cli

# name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("ehrlong.data.validate", "check a MEDS root and print a one-screen summary"),
    "synth": (
        "ehrlong.data.synthetic",
        "write the synthetic MEDS cohort (with task labels and per-subject dials)",
    ),
    "fetch": (
        "ehrlong.data.datasets",
        "download a public MEDS dataset (mimic-iv-demo), verify and validate it",
    ),
    "tokenize": (
        "ehrlong.data.store",
        "fit a tokenizer recipe on train and encode a MEDS root into a token store",
    ),
    "benchmark": ("ehrlong.data.benchmark", "time the tokenizer against a per-subject Python loop"),
}


def _usage() -> str:
    lines = ["usage: python -m ehrlong.data COMMAND key=value ...", "", "commands:"]
    lines += [f"  {name:10s} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "python -m ehrlong.data COMMAND --help lists a command's keys."]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, *rest = argv
    if name not in COMMANDS:
        raise ConfigError(f"unknown command {name!r}. Valid commands: {', '.join(COMMANDS)}.")
    module = importlib.import_module(COMMANDS[name][0])
    args = parse(module.Args, rest, prog=f"python -m ehrlong.data {name}")
    return module.run(args)


if __name__ == "__main__":
    run_cli(main)
