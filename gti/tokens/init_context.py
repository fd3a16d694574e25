"""What every init strategy reads (`InitContext`) and the helpers they share: text -> old-vocabulary pieces, the
per-token loop with its mean fallback. The strategies and their rules are in `gti.tokens.init_strategies`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gti.core.errors import ConfigError


@dataclass
class InitContext:
    old_input: torch.Tensor  # (n_old, d) input-embedding rows of the original vocabulary
    old_output: torch.Tensor | None  # (n_old, d) head rows when untied, else None
    tokenizer: object  # the ORIGINAL tokenizer: texts are split into old-vocabulary pieces
    model: object | None  # the HF causal LM (hidden / topk in hidden space need it)
    new_tokens: list[str]
    descriptions: list[list[str]]  # per new token: its texts (for an SID code: the items carrying it)
    dictionary: dict[str, list[str]] = field(default_factory=dict)  # new token -> existing words
    options: dict = field(default_factory=dict)  # see gti.tokens.init_strategies
    generator: torch.Generator | None = None
    _cache: dict = field(default_factory=dict, repr=False)  # shared by the input and output passes


def piece_ids(ctx: InitContext, text: str) -> list[int]:
    """Old-vocabulary ids of `text`, cached: an item's text recurs once per SID level."""
    cache = ctx._cache.setdefault("pieces", {})
    if text not in cache:
        ids = ctx.tokenizer(text, add_special_tokens=False)["input_ids"]
        cache[text] = [int(i) for i in ids if 0 <= int(i) < ctx.old_input.shape[0]]
    return cache[text]


def mean_of_pieces(old_rows: torch.Tensor, ids: list[int]) -> torch.Tensor | None:
    return old_rows[ids].float().mean(0) if ids else None  # (d,)


def texts_of(ctx: InitContext, i: int) -> list[str]:
    """New token i's non-blank texts."""
    return [t for t in ctx.descriptions[i] if isinstance(t, str) and t.strip()]


def require_descriptions(ctx: InitContext, name: str) -> None:
    if len(ctx.descriptions) < len(ctx.new_tokens):
        tok = ctx.new_tokens[len(ctx.descriptions)]
        raise ConfigError(
            f"init={name} needs descriptions: new token {tok!r} has none "
            f"({len(ctx.descriptions)} description lists for {len(ctx.new_tokens)} new tokens)"
        )


def _warn_once(ctx: InitContext, name: str, missing: list[str]) -> None:
    # the untied head runs the strategy a second time on the same tokens: one warning is enough
    warned = ctx._cache.setdefault("warned", set())
    if missing and name not in warned:
        warned.add(name)
        warnings.warn(
            f"init={name}: {len(missing)} of {len(ctx.new_tokens)} tokens have no usable text "
            f"(e.g. {missing[:3]}); they start at the mean of the old rows",
            UserWarning,
            stacklevel=4,
        )


def per_token(ctx: InitContext, old_rows: torch.Tensor, embed: Callable[[int], torch.Tensor | None], name: str) -> torch.Tensor:
    """Rows from a per-token rule; a token the rule cannot embed falls back to the mean (warned once)."""
    mean_row = old_rows.float().mean(0)  # (d,)
    rows, missing = [], []
    for i, tok in enumerate(ctx.new_tokens):
        v = embed(i)
        if v is None:
            missing.append(tok)
            v = mean_row
        rows.append(v.float())
    _warn_once(ctx, name, missing)
    if not rows:
        return old_rows.new_zeros(0, old_rows.shape[1])
    return torch.stack(rows).to(old_rows.dtype)  # (n_new, d)
