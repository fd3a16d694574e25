"""`gti COMMAND [args ...]` — the commands under one name: `gti ground k=v` is `python -m gti.ground k=v`.

`python -m gti COMMAND ...` is the same. `gti --help` lists the commands; `gti COMMAND --help` prints that
command's help (what it does and every config key), the same text as `python -m gti.COMMAND --help`.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path

from gti.core.cli import HELP_FLAGS, summary

COMMANDS = ("prepare", "sids", "ground", "finetune", "diagnose", "benchmark", "protocol", "sasrec")  # in pipeline order; sasrec: the ID-based reference


def overview() -> str:
    """`gti --help`: one line per command from its docstring, read without importing it (no torch to load)."""
    width = max(map(len, COMMANDS))
    lines = ["usage: gti COMMAND [args ...]    (gti COMMAND --help: what it does and its config keys)", "", "commands:"]
    for name in COMMANDS:
        source = Path(importlib.util.find_spec(f"gti.{name}").origin).read_text()
        lines.append(f"  {name:<{width}}  {summary(ast.get_docstring(ast.parse(source)))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS:  # no command at all is a usage error: the overview goes to stderr
        print(overview(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'; choose one of: {', '.join(COMMANDS)}{hint}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(f"gti.{name}").main(rest)


if __name__ == "__main__":
    main()
