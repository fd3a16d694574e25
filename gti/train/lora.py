"""LoRA fine-tuning (lora.enabled): adapters on the projections, the new token rows trained through the overlay."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gti.core.config import FinetuneConfig
    from gti.tokens.vocab import NewTokens


def apply_lora(model, cfg: FinetuneConfig, new: NewTokens):
    """LoRA adapters on the attention/MLP projections; the new rows train through the grounding overlay.

    Not peft's `modules_to_save=[embed_tokens, lm_head]`: that gives each its own full copy, so a tied
    model trains two drifting tables and merges untied (docs/traps.md). The overlay (gti.tokens.overlay)
    holds one (n, d) table of the new rows for a tied model, two for an untied one; old rows stay frozen.
    """
    from peft import LoraConfig, get_peft_model

    from gti.tokens.overlay import install_overlay

    rows = install_overlay(model, new.start, len(new))  # freezes the model, returns the new-row table(s)
    lc = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    model = get_peft_model(model, lc)  # leaves only lora_* parameters trainable ...
    for p in rows:
        p.requires_grad_(True)  # ... so the new rows are switched back on
    return model


def merge_lora(model):
    """The plain HF model: LoRA deltas merged into the projections, overlay rows into embedding / head."""
    from gti.tokens.overlay import merge_overlay

    model = model.merge_and_unload()
    merge_overlay(model)  # a tied model stays tied: the rows go into its one shared matrix
    return model
