"""Initialisation strategies for new token rows (design.md §5).

Each strategy is a plain function `(ctx, old_rows) -> new_rows`, old_rows (n_old, d) -> (n_new, d).
`initialize_rows` applies it to the input matrix and, for an untied head, to the output matrix too:
the same rule on the head's own old rows (`hidden` is the exception, see there). GTI grounding
(gti.ground) then starts from whichever rows the strategy produced (paper: mean).

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

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gti.core.errors import ConfigError

KNOWN_OPTIONS = frozenset(
    {"k", "temperature", "space", "layer", "match_norm", "cov_scale", "max_texts", "max_text_tokens", "batch_size", "vocab_batch_size"}
)


@dataclass
class InitContext:
    old_input: torch.Tensor  # (n_old, d) input-embedding rows of the original vocabulary
    old_output: torch.Tensor | None  # (n_old, d) head rows when untied, else None
    tokenizer: object  # the ORIGINAL tokenizer: texts are split into old-vocabulary pieces
    model: object | None  # the HF causal LM (hidden / topk in hidden space need it)
    new_tokens: list[str]
    descriptions: list[list[str]]  # per new token: its texts (for an SID code: the items carrying it)
    dictionary: dict[str, list[str]] = field(default_factory=dict)  # new token -> existing words
    options: dict = field(default_factory=dict)  # see the module docstring
    generator: torch.Generator | None = None
    _cache: dict = field(default_factory=dict, repr=False)  # shared by the input and output passes


# ----------------------------------------------------------------------------------------- helpers
def _piece_ids(ctx: InitContext, text: str) -> list[int]:
    """Old-vocabulary ids of `text`, cached: an item's text recurs once per SID level."""
    cache = ctx._cache.setdefault("pieces", {})
    if text not in cache:
        ids = ctx.tokenizer(text, add_special_tokens=False)["input_ids"]
        cache[text] = [int(i) for i in ids if 0 <= int(i) < ctx.old_input.shape[0]]
    return cache[text]


def _mean_of_pieces(old_rows: torch.Tensor, ids: list[int]) -> torch.Tensor | None:
    return old_rows[ids].float().mean(0) if ids else None  # (d,)


def _texts(ctx: InitContext, i: int) -> list[str]:
    return [t for t in ctx.descriptions[i] if isinstance(t, str) and t.strip()]


def _require_descriptions(ctx: InitContext, name: str) -> None:
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


def _per_token(ctx: InitContext, old_rows: torch.Tensor, embed: Callable[[int], torch.Tensor | None], name: str) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------- strategies
def zero(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Zeros (seed 000's fallback)."""
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
    """Mean of the old rows of the token's own surface string split by the old tokenizer (seed 003, CPT).

    "<a_12>" -> pieces of the string "<a_12>" (e.g. "<", "a", "_", "12", ">").
    """
    return _per_token(ctx, old_rows, lambda i: _mean_of_pieces(old_rows, _piece_ids(ctx, ctx.new_tokens[i])), "subword")


def _description_vector(ctx: InitContext, old_rows: torch.Tensor, i: int) -> torch.Tensor | None:
    """Mean over token i's texts of (mean of the text's piece rows): (d,), or None without text."""
    vecs = [v for v in (_mean_of_pieces(old_rows, _piece_ids(ctx, t)) for t in _texts(ctx, i)) if v is not None]
    return torch.stack(vecs).mean(0) if vecs else None


def description(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean over the token's texts of the mean of each text's piece rows (seed 000, "description average").

    For an SID code token the texts are those of ALL items carrying the code (embedding look-ups
    only, so no cap): every text counts once, whatever its length.
    """
    _require_descriptions(ctx, "description")
    return _per_token(ctx, old_rows, lambda i: _description_vector(ctx, old_rows, i), "description")


def last_token(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Copy the last row of the old vocabulary (seed 004, Pleias)."""
    return old_rows[-1:].expand(len(ctx.new_tokens), -1).clone()


def dictionary(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean of the old rows of all pieces of the given existing words (translation dictionary, seed 003).

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
        return _mean_of_pieces(old_rows, [p for w in words for p in _piece_ids(ctx, w)])

    return _per_token(ctx, old_rows, embed, "dictionary")


# ----------------------------------------------------------------------------------------- model-based
def _spread(texts: list[str], cap: int) -> list[str]:
    """At most `cap` texts, evenly spaced (an SID code of level a can carry thousands of items)."""
    if len(texts) <= cap:
        return texts
    return [texts[round(j * (len(texts) - 1) / (cap - 1))] for j in range(cap)] if cap > 1 else texts[:1]


def _decoder(ctx: InitContext):
    """The transformer body: hidden states without the (n_vocab-wide) logits of the LM head."""
    if ctx.model is None:
        raise ConfigError("this init strategy needs the model (it reads hidden states); InitContext.model is None")
    m = ctx.model
    return m.get_decoder() if hasattr(m, "get_decoder") else m


class _Reached(Exception):
    """Raised by a forward hook once the wanted block has run: the blocks after it are wasted work."""


def _hidden_at(body, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """hidden_states[layer] of the decoder body: (B, T, d).

    For 0 < layer < n_layers the forward stops after block `layer` (the output of block l-1 is
    hidden_states[l]; layer 2 of a 30-block model costs 2 blocks, not 30). Layer 0 (embeddings) and
    the last layer (HF applies the final norm to it) go through the full forward.
    """
    blocks = getattr(body, "layers", None)
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if blocks is None or not 0 < layer < len(blocks):
        return body(**kw, output_hidden_states=True).hidden_states[layer]
    grabbed = {}

    def hook(_module, _args, output):
        grabbed["h"] = output[0] if isinstance(output, tuple) else output
        raise _Reached

    handle = blocks[layer - 1].register_forward_hook(hook)
    try:
        body(**kw)
    except _Reached:
        pass
    finally:
        handle.remove()
    return grabbed["h"]


def _check_layer(ctx: InitContext, layer: int) -> None:
    n_layers = getattr(getattr(ctx.model, "config", None), "num_hidden_layers", None)
    if layer < 0 or (n_layers is not None and layer > n_layers):
        raise ConfigError(f"init_options.layer={layer}: must be in 0..{n_layers} (0 = the embedding output)")


@torch.no_grad()
def _text_hidden(ctx: InitContext, texts: list[str], layer: int) -> dict[str, torch.Tensor]:
    """text -> mean-pooled hidden_states[layer] over its pieces, (d,) float32 on CPU.

    hidden_states[0] is the embedding output, hidden_states[l] the residual stream after block l.
    Texts are right-padded and sorted by length so a batch wastes little; padding is masked out of
    the pooling (with causal attention, right padding does not change the real positions).
    """
    body = _decoder(ctx)
    device = next(body.parameters()).device
    cap_tokens = int(ctx.options.get("max_text_tokens", 256))
    bs = int(ctx.options.get("batch_size", 32))
    todo = sorted({t for t in texts if _piece_ids(ctx, t)}, key=lambda t: len(_piece_ids(ctx, t)))
    out: dict[str, torch.Tensor] = {}
    was_training = body.training
    body.eval()
    try:
        for s in tqdm(range(0, len(todo), bs), desc=f"hidden states (layer {layer})", leave=False):
            batch = todo[s : s + bs]
            pieces = [_piece_ids(ctx, t)[:cap_tokens] for t in batch]
            width = max(len(p) for p in pieces)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for j, p in enumerate(pieces):
                ids[j, : len(p)] = torch.tensor(p)
                mask[j, : len(p)] = 1
            h = _hidden_at(body, layer, ids.to(device), mask.to(device)).float()  # (B, T, d)
            m = mask.to(device).unsqueeze(-1).float()  # (B, T, 1)
            pooled = ((h * m).sum(1) / m.sum(1)).cpu()  # (B, d)
            out.update(zip(batch, pooled))
    finally:
        body.train(was_training)
    return out


def _hidden_queries(ctx: InitContext, layer: int) -> list[torch.Tensor | None]:
    """Per new token: mean over its (capped) texts of the texts' pooled hidden states, or None."""
    key = ("hidden", layer)
    if key not in ctx._cache:
        _check_layer(ctx, layer)
        cap = int(ctx.options.get("max_texts", 64))  # model forwards are the cost: cap texts per token
        chosen = [_spread(_texts(ctx, i), cap) for i in range(len(ctx.new_tokens))]
        vec = _text_hidden(ctx, [t for ts in chosen for t in ts], layer)
        rows = []
        for ts in chosen:
            vs = [vec[t] for t in ts if t in vec]
            rows.append(torch.stack(vs).mean(0) if vs else None)
        ctx._cache[key] = rows
    return ctx._cache[key]


def hidden(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean-pooled hidden state of the description after block `layer` (default 2) (seed 004).

    Per text: mean over its pieces of hidden_states[layer]; per token: mean over its texts (at most
    max_texts, evenly spaced). The rows are hidden states, not embedding rows, so their norm follows
    the residual stream at that layer (often 10-30x the embedding norm); option match_norm=True
    rescales each row to the mean old-row norm. An untied head gets the SAME vectors as the input rows: the
    hidden state lives in the residual stream that the embedding writes and the head reads, and
    old_output plays no part (only the mean fallback of a textless token uses the head's rows).
    """
    _require_descriptions(ctx, "hidden")
    rows = _per_token(ctx, old_rows, lambda i: _hidden_queries(ctx, int(ctx.options.get("layer", 2)))[i], "hidden")
    if ctx.options.get("match_norm", False):
        # the residual stream is far larger than the embeddings (SmolLM2-135M, layer 2: ~80 vs ~3.2);
        # opt-in: keep the direction, give every row the mean norm of the old rows
        target = old_rows.float().norm(dim=-1).mean()
        rows = (F.normalize(rows.float(), dim=-1) * target).to(old_rows.dtype)
    return rows


@torch.no_grad()
def _vocab_hidden(ctx: InitContext, layer: int) -> torch.Tensor:
    """hidden_states[layer] of every old token fed ALONE (one position): (n_old, d) float32."""
    key = ("vocab_hidden", layer)
    if key not in ctx._cache:
        _check_layer(ctx, layer)
        body, n = _decoder(ctx), ctx.old_input.shape[0]
        device = next(body.parameters()).device
        was_training = body.training
        body.eval()
        out = []
        try:
            bs = int(ctx.options.get("vocab_batch_size", 4096))  # one position per row: wide batches are cheap
            for s in tqdm(range(0, n, bs), desc=f"vocab hidden states (layer {layer})", leave=False):
                ids = torch.arange(s, min(n, s + bs), device=device).unsqueeze(1)  # (B, 1)
                out.append(_hidden_at(body, layer, ids)[:, 0].float().cpu())  # (B, d)
        finally:
            body.train(was_training)
        ctx._cache[key] = torch.cat(out)
    return ctx._cache[key]


def topk(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Similarity-weighted mean of the k old rows nearest to the description (seed 004).

    space=input (default): query = the `description` vector in old_rows' own space, keys = old_rows.
    space=hidden: query = the `hidden` vector (pooled description hidden state at `layer`), keys =
    each old token's own hidden state at that layer (fed alone); the mixed rows are still old_rows.
    Similarity: cosine. Weights: softmax(top-k cosines / temperature), temperature default 0.1, so
    a clearly nearest row dominates and near-ties share the mass (temperature -> inf: plain mean).
    """
    _require_descriptions(ctx, "topk")
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
        keys = _vocab_hidden(ctx, layer)  # (n_old, d)
        queries = _hidden_queries(ctx, layer)
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

    return _per_token(ctx, old_rows, embed, "topk")


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


def initialize_rows(name: str, ctx: InitContext) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(new input rows (n_new, d), new output rows (n_new, d) or None when the head is tied)."""
    if name not in STRATEGIES:
        raise ConfigError(f"init: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    if ctx.old_output is not None and ctx.old_output.shape != ctx.old_input.shape:
        raise ConfigError(f"init: old_output {tuple(ctx.old_output.shape)} and old_input {tuple(ctx.old_input.shape)} differ")
    fn = STRATEGIES[name]
    rows_in = fn(ctx, ctx.old_input)
    rows_out = None if ctx.old_output is None else fn(ctx, ctx.old_output)
    for rows in (rows_in, rows_out):
        if rows is not None and not torch.isfinite(rows).all():
            raise ConfigError(f"init={name} produced non-finite rows")
    return rows_in, rows_out
