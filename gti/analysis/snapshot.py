"""A snapshot of the new-token rows' geometry written into a run folder (json + plots), at each stage's checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gti.analysis.diagnostics import level_of, movement, plot_cosine_map, plot_spectrum, rsa, summarize
from gti.core.io import write_json
from gti.data.dataset import Dataset, parse_sid_token
from gti.tokens.vocab import NewTokens


def code_vectors(tokens: list[str], codebooks: np.ndarray | None) -> tuple[list[int], np.ndarray] | None:
    """Rows of `tokens` that have a quantiser code vector (the dedup level and extra tokens have none)."""
    if codebooks is None:
        return None
    keep, vecs = [], []
    for i, tok in enumerate(tokens):
        level = level_of(tok)
        code = parse_sid_token(tok)[1] if level >= 0 else -1
        if 0 <= level < codebooks.shape[0] and 0 <= code < codebooks.shape[1]:
            keep.append(i)
            vecs.append(codebooks[level, code])
    return (keep, np.stack(vecs)) if len(keep) > 2 else None


def new_rows(model, new: NewTokens) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()[new.start : new.start + len(new)].float().clone()


def diagnose_rows(model, tokenizer, new: NewTokens, ds: Dataset | None, out_dir: Path, tag: str, before: dict | None = None) -> dict:
    """Summary of the new rows (JSON + plots in out_dir). Returns the compact summary.

    `before`: the rows the stage started from (an earlier summary, or `start_rows`): the spectrum plot shows both,
    and "moved" says how far each row went (gti.analysis.diagnostics.movement)."""
    E = new_rows(model, new)
    old = model.get_input_embeddings().weight.detach()[: new.start].float()
    levels = [level_of(t) for t in new.tokens]
    summary = summarize(E, levels=levels, old_rows=old, tokenizer=tokenizer, token_names=new.tokens, sample=3)
    cb = None
    if ds is not None and ds.path("codebooks").is_file():
        cb = np.load(ds.path("codebooks"), allow_pickle=False)
    cv = code_vectors(new.tokens, cb)
    if cv is not None:
        keep, C = cv
        summary["rsa"] = rsa(E[keep], torch.from_numpy(C).float())
    if before is not None:
        summary["moved"] = movement(before["_E"], E)
    write_json(out_dir / f"diagnostics_{tag}.json", summary)
    plot_spectrum({tag: E} if before is None else {before["_tag"]: before["_E"], tag: E}, out_dir / f"spectrum_{tag}.png")
    order = sorted(range(len(new.tokens)), key=lambda i: (levels[i], i))
    plot_cosine_map(E, order, out_dir / f"cosine_{tag}.png", f"cosine of new rows ({tag})")
    keys = ("effective_rank", "effective_rank_centered", "participation_ratio", "mean_cosine", "level_cosine", "rsa", "moved")
    compact = {k: summary[k] for k in keys if k in summary}
    compact["_E"], compact["_tag"] = E, tag  # kept in memory for the next snapshot, dropped before JSON
    return compact


def start_rows(model, new: NewTokens) -> dict:
    """The new rows as a stage starts from them, for `diagnose_rows(..., before=)` (no files written)."""
    return {"_E": new_rows(model, new), "_tag": "start"}


def public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}
