"""Initialisation strategies for new token rows (docs/method.md).

Each strategy is a plain function `(ctx, old_rows) -> new_rows`, old_rows (n_old, d) -> (n_new, d).
`initialize_rows` applies it to the input matrix and, for an untied head, to the output matrix too:
the same rule on the head's own old rows (`hidden` is the exception, see there). GTI grounding
(gti.ground) then starts from whichever rows the strategy produced (paper: mean). `STRATEGIES` names them
all; `InitContext` and the helpers they share are in `gti.tokens.init_context`, the strategies that run the
model (`hidden`, topk's hidden space) in `gti.tokens.hidden_init`.

Texts are split into old-vocabulary pieces with `ctx.tokenizer(text, add_special_tokens=False)`
(the ORIGINAL tokenizer, so a description never contains a new token).

Fallback rule: a token whose description list is empty (or holds only blank texts / texts with no
old-vocabulary piece) starts at `mean`; one warning per strategy names how many and a few examples.
A `descriptions` list that does not cover every new token is a ConfigError naming the first token
without one: that is a wiring bug, not missing data.

Options (ctx.options, all optional; KNOWN_OPTIONS lists them): k (topk, 8), temperature (topk, 0.1),
space (topk, "input" | "hidden"), layer (hidden / topk-hidden, 2), match_norm (hidden, False),
cov_scale (mean_cov, 1e-5), max_texts (texts per token that go through the model, 64),
max_text_tokens (pieces per text that go through the model, 256), batch_size (description
forwards, 32), vocab_batch_size (topk-hidden vocabulary forwards, 4096).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gti.core.errors import ConfigError
from gti.tokens.hidden_init import hidden, hidden_queries, vocab_hidden
from gti.tokens.init_context import InitContext, mean_of_pieces, per_token, piece_ids, require_descriptions, texts_of

KNOWN_OPTIONS = frozenset(
    {"k", "temperature", "space", "layer", "match_norm", "cov_scale", "max_texts", "max_text_tokens", "batch_size", "vocab_batch_size"}
)


# ----------------------------------------------------------------------------------------- strategies
def zero(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Zeros (a common fallback)."""
    return old_rows.new_zeros(len(ctx.new_tokens), old_rows.shape[1])


def random(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """N(0, sigma^2) with sigma = the ONE global std of all old entries (common baseline).

    A global scalar, not per dimension: the baseline is "random at the right scale"; copying the
    per-dimension shape of the old rows is what `mean_cov` does.
    """
    std = old_rows.float().std()
    noise = torch.randn(len(ctx.new_tokens), old_rows.shape[1], generator=ctx.generator)  # (n_new, d)
    return (noise.to(old_rows.device) * std).to(old_rows.dtype)


def mean(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Every new row = the mean of the old rows (HF default; the paper's baseline)."""
    return old_rows.float().mean(0, keepdim=True).expand(len(ctx.new_tokens), -1).to(old_rows.dtype).clone()


def mean_cov(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Sample from N(mu, s * Sigma) of the old rows, s = cov_scale (default 1e-5).

    Hewitt (2021, "Initializing new word embeddings") proposes s = 1e-5; HF's `mean_resizing=True`
    uses the same construction with s = 1e-9 and falls back to the plain mean when s * Sigma is not
    positive definite. Here a singular Sigma (n_old < d) is sampled through its eigenvectors
    instead, so every token still gets its own small perturbation.
    """
    scale = float(ctx.options.get("cov_scale", 1e-5))
    x = old_rows.float()  # (n_old, d)
    mu = x.mean(0)
    xc = x - mu
    # (d, d) population covariance as in HF; the n_old x d^2 product in float32, the factorisation in
    # float64 where a tiny eigenvalue must not turn negative
    cov = scale * (xc.T @ xc).double() / x.shape[0]
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:  # not positive definite: cov = V diag(lam) V^T, use V diag(sqrt(lam_+))
        lam, V = torch.linalg.eigh(cov)
        L = V * lam.clamp(min=0).sqrt()
    z = torch.randn(len(ctx.new_tokens), x.shape[1], generator=ctx.generator, dtype=torch.float64)
    return (mu.double() + z.to(L.device) @ L.T).to(old_rows.dtype)  # (n_new, d); Cov = L L^T = cov


def subword(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean of the old rows of the token's own surface string split by the old tokenizer (as in CPT).

    "<a_12>" -> pieces of the string "<a_12>" (e.g. "<", "a", "_", "12", ">").
    """
    return per_token(ctx, old_rows, lambda i: mean_of_pieces(old_rows, piece_ids(ctx, ctx.new_tokens[i])), "subword")


def _description_vector(ctx: InitContext, old_rows: torch.Tensor, i: int) -> torch.Tensor | None:
    """Mean over token i's texts of (mean of the text's piece rows): (d,), or None without text."""
    vecs = [v for v in (mean_of_pieces(old_rows, piece_ids(ctx, t)) for t in texts_of(ctx, i)) if v is not None]
    return torch.stack(vecs).mean(0) if vecs else None


def description(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean over the token's texts of the mean of each text's piece rows ("description average").

    For an SID code token the texts are those of ALL items carrying the code (embedding look-ups
    only, so no cap): every text counts once, whatever its length.
    """
    require_descriptions(ctx, "description")
    return per_token(ctx, old_rows, lambda i: _description_vector(ctx, old_rows, i), "description")


def last_token(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Copy the last row of the old vocabulary (as Pleias does)."""
    return old_rows[-1:].expand(len(ctx.new_tokens), -1).clone()


def dictionary(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean of the old rows of all pieces of the given existing words (a translation dictionary).

    One word -> a copy of its row when it is a single old token; several -> their mean.
    """
    missing = [t for t in ctx.new_tokens if not ctx.dictionary.get(t)]
    if missing:
        raise ConfigError(
            f"init=dictionary: no dictionary entry for {len(missing)} new tokens, e.g. {missing[:3]} "
            "(init_options.dictionary maps each new token to a list of existing words)"
        )

    def embed(i: int) -> torch.Tensor | None:
        words = ctx.dictionary[ctx.new_tokens[i]]
        words = [words] if isinstance(words, str) else words
        return mean_of_pieces(old_rows, [p for w in words for p in piece_ids(ctx, w)])

    return per_token(ctx, old_rows, embed, "dictionary")


def topk(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Similarity-weighted mean of the k old rows nearest to the description.

    space=input (default): query = the `description` vector in old_rows' own space, keys = old_rows.
    space=hidden: query = the `hidden` vector (pooled description hidden state at `layer`), keys =
    each old token's own hidden state at that layer (fed alone); the mixed rows are still old_rows.
    Similarity: cosine. Weights: softmax(top-k cosines / temperature), temperature default 0.1, so
    a clearly nearest row dominates and near-ties share the mass (temperature -> inf: plain mean).
    """
    require_descriptions(ctx, "topk")
    k = int(ctx.options.get("k", 8))
    temp = float(ctx.options.get("temperature", 0.1))
    space = ctx.options.get("space", "input")
    if k < 1 or not temp > 0:
        raise ConfigError(f"init=topk: need k >= 1 and temperature > 0, got k={k}, temperature={temp}")
    if space == "input":
        keys = old_rows.float()  # (n_old, d)
        queries = [_description_vector(ctx, old_rows, i) for i in range(len(ctx.new_tokens))]
    elif space == "hidden":
        layer = int(ctx.options.get("layer", 2))
        keys = vocab_hidden(ctx, layer)  # (n_old, d)
        queries = hidden_queries(ctx, layer)
    else:
        raise ConfigError(f"init_options.space must be 'input' or 'hidden', got {space!r}")
    keys_n = F.normalize(keys, dim=-1)

    def embed(i: int) -> torch.Tensor | None:
        q = queries[i]
        if q is None:
            return None
        sims = keys_n @ F.normalize(q.float(), dim=0)  # (n_old,)
        top = sims.topk(min(k, sims.numel()))
        w = torch.softmax(top.values / temp, dim=0)  # (k,)
        return w @ old_rows[top.indices].float()  # (d,)

    return per_token(ctx, old_rows, embed, "topk")


STRATEGIES: dict[str, Callable[[InitContext, torch.Tensor], torch.Tensor]] = {
    "zero": zero,
    "random": random,
    "mean": mean,
    "mean_cov": mean_cov,
    "subword": subword,
    "description": description,
    "last_token": last_token,
    "topk": topk,
    "hidden": hidden,
    "dictionary": dictionary,
}


def init_problems(name: str, options: dict) -> list[str]:
    """What is wrong with `init` / `init_options`, found before any compute (a misspelt option would be ignored)."""
    problems = [] if name in STRATEGIES else [f"init: unknown strategy '{name}' (known: {', '.join(STRATEGIES)})"]
    for key in sorted(set(options) - KNOWN_OPTIONS - {"dictionary"}):
        close = difflib.get_close_matches(key, KNOWN_OPTIONS | {"dictionary"}, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(sorted(KNOWN_OPTIONS | {'dictionary'}))})"
        problems.append(f"init_options.{key}: unknown option{hint}")
    return problems


def initialize_rows(name: str, ctx: InitContext) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(new input rows (n_new, d), new output rows (n_new, d) or None when the head is tied)."""
    if problems := init_problems(name, ctx.options):
        raise ConfigError.listing(problems)
    if ctx.old_output is not None and ctx.old_output.shape != ctx.old_input.shape:
        raise ConfigError(f"init: old_output {tuple(ctx.old_output.shape)} and old_input {tuple(ctx.old_input.shape)} differ")
    fn = STRATEGIES[name]
    rows_in = fn(ctx, ctx.old_input)
    rows_out = None if ctx.old_output is None else fn(ctx, ctx.old_output)
    for rows in (rows_in, rows_out):
        if rows is not None and not torch.isfinite(rows).all():
            raise ConfigError(f"init={name} produced non-finite rows")
    return rows_in, rows_out
