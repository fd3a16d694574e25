"""`python -m gti.protocol CONFIG.yaml source=FOLDER [dry_run=false]` — one published setting end to end.

A preset such as configs/tiger-beauty.yaml becomes the four stage commands a user could type:

  gti.prepare -> gti.sids -> gti.ground (arm "gti") -> gti.finetune (one run per arm)

dry_run=true (default) checks the config, the data files (present, first records parse) and every
stage's arguments against that stage's schema, then prints the commands. dry_run=false checks the
same, then runs them in order (`sys.executable -m gti.X ...`) and stops at the first failure.
Arms: gti (ground, then fine-tune from the grounded model), mean (fine-tune from mean-initialised
rows, no grounding), multitask (mean init + LC-Rec's text<->SID tasks mixed into fine-tuning).
"""

from __future__ import annotations

import sys

from gti.experiments.protocol import ProtocolConfig, run


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import run_command

    run_command(argv, __doc__, ProtocolConfig, run)


if __name__ == "__main__":
    main(sys.argv[1:])
