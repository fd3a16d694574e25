"""`python -m gti.prepare dataset=ml-100k` — raw files -> native dataset under data/NAME/.

Run `python -m gti.prepare configs/prepare.yaml dataset=ml-1m` for MovieLens-1M.
"""

from __future__ import annotations

import sys

from gti.core.config import PrepareConfig, load_config
from gti.data.convert import run


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import guarded

    guarded(lambda: run(load_config(PrepareConfig, argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
