"""Shared command-line plumbing: `--help` read from the config schema, and user errors as one message with exit 2.

A command's help is its module docstring, then every config key of its schema, dotted, with the type, the default
and the `# comment` written beside the field in the dataclass: the help is read from the schema's source, so the
two cannot drift apart. The docstring's first line reads "`usage` — what the command does"; `gti --help` shows the
part after the dash.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import sys
import textwrap
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gti.core.config import not_read
from gti.core.errors import GtiError

HELP_FLAGS = ("-h", "--help")
WIDTH = 110  # help text wraps comments at this column


def guarded(fn: Callable[[], Any]) -> Any:
    """`fn()`; a user error (GtiError) prints `error: message` on stderr, without a traceback, and exits 2."""
    try:
        return fn()
    except GtiError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_command(argv: Sequence[str] | None, doc: str | None, schema: type, run: Callable[[Any], Any], log_as: str = "") -> Any:
    """A command's main(): `--help`, the config parsed and checked (every problem at once), logged as
    `[gti.<log_as>] config:` when `log_as` is given, then `run(cfg)`; user errors print one message and exit 2."""
    from gti.core.config import load_config, to_yaml
    from gti.core.log import get_logger

    exit_on_help(argv, doc, schema)
    cfg = guarded(lambda: load_config(schema, None if argv is None else list(argv)))
    if log_as:
        get_logger(log_as).info("config:\n%s", to_yaml(cfg).rstrip())
    return guarded(lambda: run(cfg))


def exit_on_help(argv: Sequence[str] | None, doc: str | None, schema: type | None = None) -> None:
    """`-h` / `--help` among the arguments (None: the command line): print the help and exit 0.
    Each command's main() calls it first: `exit_on_help(argv, __doc__, GroundConfig)`."""
    if any(a in HELP_FLAGS for a in (sys.argv[1:] if argv is None else argv)):
        try:
            print(help_text(doc, schema))
        except BrokenPipeError:  # `--help | head`: the reader left, nothing to report
            sys.stdout = None
        raise SystemExit(0)


def help_text(doc: str | None, schema: type | None = None) -> str:
    """The command's docstring, then (with a schema) one entry per config key: `key: type = default` and its comment."""
    text = inspect.cleandoc(doc or "")
    if schema is None:
        return text
    keys = describe(schema)
    required = " ??? marks a required value." if any(k.default == "???" for k in keys) else ""
    lines = [text, "", "Config keys: set any as key=value (a list as key=[a,b]); a YAML file given first sets many at once." + required]
    indent = " " * 6
    for k in keys:
        lines.append(f"  {k.key}: {k.type}" + ("" if k.section else f" = {_show(k.default)}"))
        lines += textwrap.wrap(k.comment, WIDTH, initial_indent=indent, subsequent_indent=indent)
    return "\n".join(lines)


def summary(doc: str | None) -> str:
    """What the command does in one line: its docstring's first line after the usage and the " — "."""
    first = inspect.cleandoc(doc or "").split("\n", 1)[0]
    return first.split(" — ", 1)[-1].strip().rstrip(".")


def _show(v: Any) -> str:
    """A default as it would be typed on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return v or "''"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    return str(v)


# ----------------------------------------------------------------------------------------- describing
@dataclass(frozen=True)
class KeyDoc:
    """One config key as the schema declares it (what `--help` prints)."""

    key: str  # dotted, e.g. "trainer.precision"
    type: str  # the annotation as written: "str", "list[int]", "str | None"
    default: Any  # the schema's default ("???" where a value is required); a section's own dataclass instance
    comment: str  # the comment beside the field or on the lines directly above it; "" when there is none
    section: bool = False  # a nested dataclass: its keys follow, prefixed with this key


def describe(schema: type) -> list[KeyDoc]:
    """Every key of `schema` in declaration order, sub-configs expanded (a section entry, then its keys).

    Defaults come from an instance, so a parent's `default_factory=lambda: OptimConfig(warmup_steps=10)` shows 10.
    """

    def walk(obj: Any, prefix: str) -> list[KeyDoc]:
        comments = field_comments(type(obj))
        out = []
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), prefix + f.name
            if not_read(key):  # a section the stage never reads is not offered, nor its keys
                continue
            nested = dataclasses.is_dataclass(value)
            out.append(KeyDoc(key, _type_name(f.type), value, comments.get(f.name, ""), nested))
            if nested:
                out += walk(value, key + ".")
        return out

    return walk(schema(), "")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """field name -> the `# comment` written beside it in the class source (lines directly above, then trailing
    ones, joined). Read with ast (where each field starts and ends) and tokenize (where the comments are)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (defined in a REPL / `python -c`): no comments to show
        return {}
    lines = src.splitlines()
    comments = {
        t.start[0]: t.string.lstrip("#").strip()
        for t in tokenize.generate_tokens(io.StringIO(src).readline)
        if t.type == tokenize.COMMENT
    }
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row, above = node.lineno - 1, []
        while row in comments and lines[row - 1].lstrip().startswith("#"):  # whole comment lines, no gap
            above.insert(0, comments[row])
            row -= 1
        beside = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments]
        out[node.target.id] = " ".join(c for c in above + beside if c)
    return out


def _type_name(t: Any) -> str:
    if isinstance(t, str):  # `from __future__ import annotations`: the annotation as written
        return t
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")
