"""Custom 4D attention masks, for the decoders that take them: the tree masks of ranking, the causal mask of a
training batch. Where a model cannot take one, its callers fall back to transformers' own (B, T) mask."""

from __future__ import annotations

import torch

# model types whose decoder uses a 4D mask as given: they pass the (B, T) mask only to transformers' mask builder,
# where a 4D one is returned as it is. Others read the (B, T) mask for more (OPT's learned positions are a cumsum of
# it; Falcon's ALiBi) and fail or differ with a 4D one. Each checked on a tiny random model: the same hidden states
# with either mask, on a right-padded batch.
TAKES_4D_MASK = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma3_text", "phi", "phi3", "olmo2",
    "granite", "stablelm", "cohere", "starcoder2", "smollm3", "gpt2",
})  # fmt: skip


def takes_tree_mask(config, span: int) -> bool:
    """Whether the model takes a custom 4D mask (a model type in TAKES_4D_MASK; sdpa: bool, eager: additive; flash
    and flex take none) and a full-attention mask is exact: no sliding window shorter than the `span` positions."""
    window = getattr(config, "sliding_window", None)
    return (
        config.model_type in TAKES_4D_MASK
        and config._attn_implementation in ("sdpa", "eager")
        and (window is None or span <= window)
    )


def as_attention_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A (B, 1, Q, K) bool mask (True: attend) as the model's attention takes it (see takes_tree_mask): as it is for
    sdpa; for eager, which adds its mask to the attention scores, 0 where allowed and the dtype's minimum elsewhere."""
    if model.config._attn_implementation != "eager":
        return allowed
    bias = torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(model.dtype).min)


def causal_mask(model, attention_mask: torch.Tensor) -> torch.Tensor:
    """The (B, 1, T, T) causal mask of a padded (B, T) training batch, built here on the device. transformers builds
    the same mask itself, but first asks whether the batch has any padding (`mask.all()` read on the host): a device
    sync twice a forward. Each position may also attend to itself, so that no row is empty (a padding position's
    output is never read). A model that takes no custom mask (see takes_tree_mask) gets the (B, T) mask."""
    width = attention_mask.shape[1]
    if not takes_tree_mask(model.config, width):
        return attention_mask
    eye = torch.eye(width, dtype=torch.bool, device=attention_mask.device)
    allowed = torch.ones_like(eye).tril() & (attention_mask.bool()[:, None, None, :] | eye)  # earlier real keys, itself
    return as_attention_mask(model, allowed)
