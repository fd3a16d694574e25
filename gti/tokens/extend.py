"""Extend a base model with the SID tokens and initialise their rows with a named strategy."""

from __future__ import annotations

import copy

import torch

from gti.data.dataset import Dataset
from gti.data.slices import item_texts
from gti.tokens.vocab import add_tokens, is_tied, read_tokens_file, resize, set_rows, sid_descriptions, sid_tokens


def extend_model(
    model_name: str,
    ds: Dataset,
    init: str,
    init_options: dict,
    tokens_file: str | None,
    seed: int,
    dtype: torch.dtype = torch.float32,
):
    """Base model + tokenizer -> (model, tokenizer, NewTokens) with the new rows initialised by `init`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gti.core.assets import resolve_model
    from gti.tokens.init_strategies import InitContext, initialize_rows

    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    base_tokenizer = copy.deepcopy(tokenizer)  # strategies tokenise with the old vocabulary
    n_old = model.get_input_embeddings().weight.shape[0]
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = None if is_tied(model) else model.get_output_embeddings().weight.detach().clone()

    tokens = sid_tokens(ds.index)
    descriptions = sid_descriptions(ds.index, item_texts(ds), tokens)
    if tokens_file:
        extra, extra_desc = read_tokens_file(tokens_file)
        tokens, descriptions = tokens + extra, descriptions + extra_desc
    new = add_tokens(tokenizer, tokens, descriptions)
    resize(model, tokenizer)
    # strategies read only the rows of the real old vocabulary (spare rows of Qwen-like models excluded)
    n_real = min(n_old, new.start)
    ctx = InitContext(
        old_input=old_input[:n_real],
        old_output=None if old_output is None else old_output[:n_real],
        tokenizer=base_tokenizer,
        model=model,
        new_tokens=new.tokens,
        descriptions=new.descriptions,
        dictionary=dict(init_options.get("dictionary", {})),
        options=dict(init_options),
        generator=torch.Generator().manual_seed(seed),
    )
    input_rows, output_rows = initialize_rows(init, ctx)
    set_rows(model, new, input_rows, output_rows)
    return model, tokenizer, new
