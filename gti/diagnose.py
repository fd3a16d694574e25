"""`python -m gti.diagnose RUN_DIR` — geometry of the new-token rows of any checkpoint (design.md §8).

Also called by the stages: after initialisation and at the end of grounding / fine-tuning.
Writes diagnostics_<tag>.json, spectrum_<tag>.png and cosine_<tag>.png into the folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gti.analysis.report import diagnose_rows, public
from gti.tokens.vocab import NewTokens


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gti.core.cli import guarded
    from gti.core.errors import ConfigError
    from gti.data.dataset import load_dataset

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m gti.diagnose RUN_DIR")
    run = Path(argv[0])
    meta_path = run / "gti.json"

    def go():
        if not meta_path.is_file():
            raise ConfigError(f"{run}: not a gti run folder (no gti.json)")
        meta = json.loads(meta_path.read_text())
        tok = AutoTokenizer.from_pretrained(run / "model")
        model = AutoModelForCausalLM.from_pretrained(run / "model")
        nt = meta["new_tokens"]
        new = NewTokens(nt["tokens"], nt["start"], [[] for _ in nt["tokens"]])
        d = meta["dataset"]
        ds = load_dataset(d["root"], d["name"], need_index=False) if Path(d["root"], d["name"]).is_dir() else None
        out = public(diagnose_rows(model, tok, new, ds, run, "checkpoint"))
        print(json.dumps(out, indent=2))

    guarded(go)


if __name__ == "__main__":
    main()
