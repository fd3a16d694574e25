"""`python -m gti.diagnose RUN_DIR` — geometry of the new-token rows of any checkpoint.

RUN_DIR is a gti.ground or gti.finetune output folder. Spectrum, effective rank, cosine maps and RSA
against the SID codebook vectors when the dataset's codebooks are on disk (docs/evaluation.md); the
JSON summary is printed. Also called by the stages: after initialisation and at the end of
grounding / fine-tuning. Writes diagnostics_<tag>.json, spectrum_<tag>.png and cosine_<tag>.png into the folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gti.analysis.snapshot import diagnose_rows, public
from gti.tokens.vocab import NewTokens


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import exit_on_help, guarded
    from gti.core.runs import read_run
    from gti.data.dataset import load_dataset

    argv = sys.argv[1:] if argv is None else argv
    exit_on_help(argv, __doc__)
    if len(argv) != 1:
        print("error: usage: python -m gti.diagnose RUN_DIR (a finished gti.ground or gti.finetune folder)", file=sys.stderr)
        raise SystemExit(2)

    def go():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        run = read_run(argv[0], what="RUN_DIR")
        tok = AutoTokenizer.from_pretrained(run.model_dir)
        model = AutoModelForCausalLM.from_pretrained(run.model_dir)
        start, tokens = run.new_tokens
        new = NewTokens(tokens, start, [[] for _ in tokens])
        root, name = run.dataset
        ds = load_dataset(root, name, need_index=False) if Path(root, name).is_dir() else None
        out = public(diagnose_rows(model, tok, new, ds, run.folder, "checkpoint"))
        print(json.dumps(out, indent=2))

    guarded(go)


if __name__ == "__main__":
    main()
