"""Initialisation strategies for new token rows (design.md §5).

Each strategy is a plain function `(ctx, old_rows) -> new_rows` with old_rows (n_old, d) and
new_rows (n_new, d). `initialize_rows` applies it to the input matrix and, for an untied head, to
the output matrix too (same rule, the head's own old rows). GTI grounding (gti.ground) then starts
from whichever rows the strategy produced (paper: mean).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from gti.errors import ConfigError


@dataclass
class InitContext:
    old_input: torch.Tensor  # (n_old, d) input-embedding rows of the original vocabulary
    old_output: torch.Tensor | None  # (n_old, d) head rows when untied, else None
    tokenizer: object  # the ORIGINAL tokenizer: descriptions are split into old-vocabulary pieces
    model: object | None  # the HF causal LM (hidden / topk-in-hidden-space need it)
    new_tokens: list[str]
    descriptions: list[list[str]]  # per new token: texts describing it (items carrying an SID code)
    dictionary: dict[str, list[str]] = field(default_factory=dict)  # new token -> existing words
    options: dict = field(default_factory=dict)  # k, space, layer, max_texts
    generator: torch.Generator | None = None
    _cache: dict = field(default_factory=dict, repr=False)


def _piece_ids(ctx: InitContext, text: str) -> list[int]:
    ids = ctx.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [i for i in ids if i < ctx.old_input.shape[0]]


def _mean_of_pieces(old_rows: torch.Tensor, ids: list[int]) -> torch.Tensor | None:
    return old_rows[ids].mean(0) if ids else None


def _texts(ctx: InitContext, i: int) -> list[str]:
    texts = [t for t in ctx.descriptions[i] if t and t.strip()]
    cap = int(ctx.options.get("max_texts", 64))  # an SID code can carry thousands of items
    return texts[:cap]


def _per_token(ctx: InitContext, old_rows: torch.Tensor, embed: Callable[[int], torch.Tensor | None], name: str) -> torch.Tensor:
    """Rows from a per-token rule; a token the rule cannot embed falls back to the mean (warned once)."""
    mean = old_rows.mean(0)
    rows, missing = [], []
    for i, tok in enumerate(ctx.new_tokens):
        v = embed(i)
        if v is None:
            missing.append(tok)
            v = mean
        rows.append(v)
    if missing:
        warnings.warn(f"init={name}: {len(missing)} tokens have no usable text (e.g. {missing[:3]}); they start at the mean", stacklevel=3)
    return torch.stack(rows).to(old_rows.dtype)


# ----------------------------------------------------------------------------------------- strategies
def zero(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Zeros (seed 000 fallback)."""
    return old_rows.new_zeros(len(ctx.new_tokens), old_rows.shape[1])


def random(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """N(0, sigma^2) with sigma = the global std of the old rows (common baseline)."""
    std = old_rows.float().std()
    noise = torch.randn(len(ctx.new_tokens), old_rows.shape[1], generator=ctx.generator)
    return (noise * std).to(old_rows.dtype)


def mean(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Every new row = the mean of the old rows (HF default; the paper's baseline)."""
    return old_rows.mean(0, keepdim=True).expand(len(ctx.new_tokens), -1).clone()


def mean_cov(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """HF `mean_resizing=True`: sample from N(mean, 1e-5 * Cov(old rows)) (Hewitt 2021)."""
    x = old_rows.double()
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / x.shape[0]  # (d, d)
    dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=1e-5 * cov + 1e-12 * torch.eye(len(mu), dtype=x.dtype))
    with torch.random.fork_rng():
        if ctx.generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)))
        return dist.sample((len(ctx.new_tokens),)).to(old_rows.dtype)


def subword(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean of the old rows of the token's own surface string split by the old tokenizer (seed 003, CPT)."""
    return _per_token(ctx, old_rows, lambda i: _mean_of_pieces(old_rows, _piece_ids(ctx, ctx.new_tokens[i])), "subword")


def _description_vector(ctx: InitContext, old_rows: torch.Tensor, i: int) -> torch.Tensor | None:
    vecs = [v for v in (_mean_of_pieces(old_rows, _piece_ids(ctx, t)) for t in _texts(ctx, i)) if v is not None]
    return torch.stack(vecs).mean(0) if vecs else None


def description(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean over the token's description texts of the mean of each text's piece rows (seed 000).

    For an SID code token the texts are those of the items carrying the code ("description average").
    """
    return _per_token(ctx, old_rows, lambda i: _description_vector(ctx, old_rows, i), "description")


def last_token(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Copy the last row of the old vocabulary (seed 004, Pleias)."""
    return old_rows[-1:].expand(len(ctx.new_tokens), -1).clone()


@torch.no_grad()
def _hidden_mean(ctx: InitContext, texts: list[str], layer: int) -> torch.Tensor:
    """Mean-pooled hidden state after `layer` of each text: (len(texts), d)."""
    model = ctx.model
    if model is None:
        raise ConfigError("this init strategy needs the model (hidden states)")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), 32):
        batch = [_piece_ids(ctx, t) or [0] for t in texts[start : start + 32]]
        width = max(len(b) for b in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, b in enumerate(batch):
            ids[j, : len(b)] = torch.tensor(b)
            mask[j, : len(b)] = 1
        h = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True).hidden_states[layer]
        m = mask.to(device).unsqueeze(-1).to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1)).float().cpu())
    return torch.cat(out)


def hidden(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean-pooled hidden state of the description after layer `layer` (default 2) (seed 004).

    Input and output rows both get the hidden-state vector: it lives in the residual stream that the
    embedding feeds and the head reads.
    """
    layer = int(ctx.options.get("layer", 2))
    key = ("hidden", layer)
    if key not in ctx._cache:
        flat, owner = [], []
        for i in range(len(ctx.new_tokens)):
            for t in _texts(ctx, i):
                flat.append(t)
                owner.append(i)
        vecs = _hidden_mean(ctx, flat, layer) if flat else torch.empty(0, old_rows.shape[1])
        per = [[] for _ in ctx.new_tokens]
        for v, i in zip(vecs, owner):
            per[i].append(v)
        ctx._cache[key] = [torch.stack(p).mean(0) if p else None for p in per]
    rows = ctx._cache[key]
    return _per_token(ctx, old_rows, lambda i: rows[i], "hidden")


def topk(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Similarity-weighted mean of the k vocabulary rows nearest to the description (seed 004).

    space=input (default): the description vector is the mean of its piece rows, compared by cosine
    with every old row. space=hidden: the description's mean hidden state at `layer` is compared with
    each vocabulary token's own hidden state at that layer (one forward over the vocabulary).
    Weights: softmax of the top-k cosines / temperature (default 0.1), so near-ties share mass.
    """
    k = int(ctx.options.get("k", 8))
    temp = float(ctx.options.get("temperature", 0.1))
    space = ctx.options.get("space", "input")
    if space == "input":
        keys = old_rows.float()
        queries = [_description_vector(ctx, old_rows, i) for i in range(len(ctx.new_tokens))]
    elif space == "hidden":
        layer = int(ctx.options.get("layer", 2))
        keys = _vocab_hidden(ctx, layer)
        hid = hidden(ctx, ctx.old_input)  # (n_new, d) description hidden states (fallback: mean)
        queries = list(hid)
    else:
        raise ConfigError(f"init_options.space must be 'input' or 'hidden', got {space!r}")
    keys_n = torch.nn.functional.normalize(keys, dim=-1)

    def embed(i: int) -> torch.Tensor | None:
        q = queries[i]
        if q is None:
            return None
        sims = keys_n @ torch.nn.functional.normalize(q.float(), dim=0)  # (n_old,)
        top = sims.topk(min(k, len(sims)))
        w = torch.softmax(top.values / temp, dim=0)
        return (w.unsqueeze(1) * old_rows[top.indices].float()).sum(0)

    return _per_token(ctx, old_rows, embed, "topk")


@torch.no_grad()
def _vocab_hidden(ctx: InitContext, layer: int) -> torch.Tensor:
    key = ("vocab_hidden", layer)
    if key not in ctx._cache:
        model, n = ctx.model, ctx.old_input.shape[0]
        device = next(model.parameters()).device
        out = []
        for s in tqdm(range(0, n, 1024), desc="vocab hidden states", leave=False):
            ids = torch.arange(s, min(n, s + 1024), device=device).unsqueeze(1)  # each token alone
            out.append(model(input_ids=ids, output_hidden_states=True).hidden_states[layer][:, 0].float().cpu())
        ctx._cache[key] = torch.cat(out)
    return ctx._cache[key]


def dictionary(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean of the old rows of the given existing words' pieces (translation dictionary, seed 003)."""
    missing = [t for t in ctx.new_tokens if not ctx.dictionary.get(t)]
    if missing:
        raise ConfigError(f"init=dictionary: no dictionary entry for {len(missing)} tokens, e.g. {missing[:3]} (init_options.dictionary)")

    def embed(i: int) -> torch.Tensor | None:
        ids = [p for w in ctx.dictionary[ctx.new_tokens[i]] for p in _piece_ids(ctx, w)]
        return _mean_of_pieces(old_rows, ids)

    return _per_token(ctx, old_rows, embed, "dictionary")


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
    """(new input rows, new output rows or None when the head is tied)."""
    if name not in STRATEGIES:
        raise ConfigError(f"init: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    fn = STRATEGIES[name]
    rows_in = fn(ctx, ctx.old_input)
    rows_out = None if ctx.old_output is None else fn(ctx, ctx.old_output)
    return rows_in, rows_out
