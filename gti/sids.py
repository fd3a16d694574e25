"""`python -m gti.sids [configs/sids.yaml] [key=value ...]` — item text -> embedding -> Semantic IDs.

Build (docs/data.md): embed `item_text` of every item (MiniLM by default, or the backbone LM's
mean-pooled hidden states), quantise (residual k-means or RQ-VAE), append the dedup level, write
into data/NAME/:
  NAME.index.json          {"<item>": ["<a_12>", "<b_7>", "<c_3>", "<d_0>"]}
  NAME.sids_report.json    usage, collisions before dedup, wall times, input hash
  NAME.emb-<encoder>.npy   embedding cache (n_items, d); a file placed there by the user is used as is
  NAME.sid_codevecs.npy    (n_items, d) sum over levels of the chosen code vectors (RSA diagnostics)
  NAME.codebooks.npy       (levels, codes, d) codebooks (d = embedding dim for rqkmeans, code dim for rqvae)
A second run with the same inputs (item texts, encoder, quantiser settings) is skipped; force=true rebuilds.

An index on disk is never replaced silently (docs/traps.md): runs grounded on it record its hash.
Other quantiser settings than the report records are an error naming each setting (on disk vs
requested) unless force=true; changed item texts or outputs that differ from the report are rebuilt.
The stages (gti.ground / gti.finetune, via `gti.indexing.ensure.ensure_dataset`) build a missing index, use a
matching, imported or unreported one, and stop with a message for any other (only sids.force=true
rebuilds). The full table is in gti/indexing/guard.py.

Import: `python -m gti.sids import_index=PATH [repair=true]` validates a foreign index.json against
item.json, reports collisions, appends a dedup level when repair=true and writes NAME.index.json.
"""

from __future__ import annotations

import sys

from gti.core.config import SidsConfig
from gti.indexing.build import run


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import run_command

    run_command(argv, __doc__, SidsConfig, run)


if __name__ == "__main__":
    main(sys.argv[1:])
