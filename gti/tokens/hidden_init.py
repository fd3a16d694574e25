"""The init strategies that read the model's hidden states: `hidden`, and the queries and keys of `topk` with
space=hidden. Registered, with the others, in `gti.tokens.init_strategies`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gti.core.errors import ConfigError
from gti.tokens.init_context import InitContext, per_token, piece_ids, require_descriptions, texts_of


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


def hidden_at(body, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
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
    todo = sorted({t for t in texts if piece_ids(ctx, t)}, key=lambda t: len(piece_ids(ctx, t)))
    out: dict[str, torch.Tensor] = {}
    was_training = body.training
    body.eval()
    try:
        for s in tqdm(range(0, len(todo), bs), desc=f"hidden states (layer {layer})", leave=False):
            batch = todo[s : s + bs]
            pieces = [piece_ids(ctx, t)[:cap_tokens] for t in batch]
            width = max(len(p) for p in pieces)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for j, p in enumerate(pieces):
                ids[j, : len(p)] = torch.tensor(p)
                mask[j, : len(p)] = 1
            h = hidden_at(body, layer, ids.to(device), mask.to(device)).float()  # (B, T, d)
            m = mask.to(device).unsqueeze(-1).float()  # (B, T, 1)
            pooled = ((h * m).sum(1) / m.sum(1)).cpu()  # (B, d)
            out.update(zip(batch, pooled))
    finally:
        body.train(was_training)
    return out


def hidden_queries(ctx: InitContext, layer: int) -> list[torch.Tensor | None]:
    """Per new token: mean over its (capped) texts of the texts' pooled hidden states, or None."""
    key = ("hidden", layer)
    if key not in ctx._cache:
        _check_layer(ctx, layer)
        cap = int(ctx.options.get("max_texts", 64))  # model forwards are the cost: cap texts per token
        chosen = [_spread(texts_of(ctx, i), cap) for i in range(len(ctx.new_tokens))]
        vec = _text_hidden(ctx, [t for ts in chosen for t in ts], layer)
        rows = []
        for ts in chosen:
            vs = [vec[t] for t in ts if t in vec]
            rows.append(torch.stack(vs).mean(0) if vs else None)
        ctx._cache[key] = rows
    return ctx._cache[key]


def hidden(ctx: InitContext, old_rows: torch.Tensor) -> torch.Tensor:
    """Mean-pooled hidden state of the description after block `layer` (default 2).

    Per text: mean over its pieces of hidden_states[layer]; per token: mean over its texts (at most
    max_texts, evenly spaced). The rows are hidden states, not embedding rows, so their norm follows
    the residual stream at that layer (often 10-30x the embedding norm); option match_norm=True
    rescales each row to the mean old-row norm. An untied head gets the SAME vectors as the input rows: the
    hidden state lives in the residual stream that the embedding writes and the head reads, and
    old_output plays no part (only the mean fallback of a textless token uses the head's rows).
    """
    require_descriptions(ctx, "hidden")
    rows = per_token(ctx, old_rows, lambda i: hidden_queries(ctx, int(ctx.options.get("layer", 2)))[i], "hidden")
    if ctx.options.get("match_norm", False):
        # the residual stream is far larger than the embeddings (SmolLM2-135M, layer 2: ~80 vs ~3.2);
        # opt-in: keep the direction, give every row the mean norm of the old rows
        target = old_rows.float().norm(dim=-1).mean()
        rows = (F.normalize(rows.float(), dim=-1) * target).to(old_rows.dtype)
    return rows


@torch.no_grad()
def vocab_hidden(ctx: InitContext, layer: int) -> torch.Tensor:
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
                out.append(hidden_at(body, layer, ids)[:, 0].float().cpu())  # (B, d)
        finally:
            body.train(was_training)
        ctx._cache[key] = torch.cat(out)
    return ctx._cache[key]
