"""`python -m gti.prepare [config.yaml] [key=value ...]` — raw files -> native dataset under data/NAME/.

`python -m gti.prepare dataset=ml-100k` converts the packaged MovieLens-100K copy;
`python -m gti.prepare configs/prepare.yaml dataset=ml-1m` MovieLens-1M; other datasets take source=FOLDER.
"""

from __future__ import annotations

import sys

from gti.core.config import PrepareConfig
from gti.data.convert import run


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import run_command

    run_command(argv, __doc__, PrepareConfig, run)


if __name__ == "__main__":
    main(sys.argv[1:])
