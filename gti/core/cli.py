"""Shared command-line plumbing: user errors print one clear message and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from gti.core.errors import GtiError


def guarded(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except GtiError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
