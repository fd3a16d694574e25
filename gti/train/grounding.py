"""Stage-1 pieces: the grounding LightningModule and the paired text <-> SID examples (docs/method.md)."""

from __future__ import annotations

import lightning as L

from gti.data.dataset import Dataset
from gti.tokens.overlay import FrozenBf16, install_overlay
from gti.tokens.vocab import NewTokens
from gti.train.step import lm_training_step, start_fit
from gti.train.templates import GROUNDING_TEMPLATES, sid_string
from gti.train.trainer import adamw_with_warmup, clip_gradients

TOKEN_TEMPLATES = {  # for tokens.jsonl entries (domain words, special tokens, another language)
    "token2desc": ("What does {token} mean?", "{description}"),
    "desc2token": ("Which word means: {description}?", "{token}"),
}


class GroundingModule(L.LightningModule):
    """Only the overlay tables are parameters the optimiser sees; the LM is frozen (docs/method.md)."""

    def __init__(self, model, new: NewTokens, lr: float, weight_decay: float, warmup_steps: int, full: bool = False,
                 lean_step: bool = True, compile_mode: str | None = None):  # fmt: skip
        super().__init__()
        self.model, self.lean_step = model, lean_step  # lean_step: see lm_training_step
        self.compile_mode = compile_mode  # None, or trainer.compile_mode under trainer.compile (gti.train.step.compile_mode)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as found
        self.lr, self.weight_decay, self.warmup_steps, self.full = lr, weight_decay, warmup_steps, full
        if full:  # optional second phase (paper §4.1): everything trains
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            install_overlay(model, new.start, len(new))
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.frozen_bf16 = FrozenBf16(model)

    def setup(self, stage):
        if stage == "fit":
            start_fit(self)  # bf16: the frozen LM held in bf16; trainer.compile

    def on_fit_end(self):
        self.frozen_bf16.exact()  # the saved model is the base weights + trained rows, bit for bit

    def training_step(self, batch, batch_idx):
        return lm_training_step(self, batch)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # FSDP, fused AdamW (gti.train.trainer)

    def configure_optimizers(self):
        return adamw_with_warmup(self.parameters(), self.lr, self.weight_decay, self.warmup_steps, self._trainer)

    def on_save_checkpoint(self, checkpoint):
        # frozen weights are the base model's: keep checkpoints |V_new| x d, not the whole LM
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def grounding_specs(ds: Dataset, new: NewTokens, templates: list[str]) -> list[tuple[tuple[str, str], dict, str]]:
    """(template, fields, what) of every grounding row: each item under each template, then each extra token."""
    specs = []
    for item in sorted(ds.items):
        meta = ds.items[item]
        fields = {
            "title": str(meta.get("title", "")).strip(),
            "description": str(meta.get("description", "")).strip() or "(no description)",
            "sid": sid_string(ds.index[item]),
        }
        specs += [(GROUNDING_TEMPLATES[name], fields, f"item {item}: the {name} row") for name in templates]
    sid_set = {t for toks in ds.index.values() for t in toks}
    for token, descs in zip(new.tokens, new.descriptions):
        if token not in sid_set:
            fields = {"token": token, "description": descs[0]}
            specs += [(template, fields, f"token {token}: the {name} row") for name, template in TOKEN_TEMPLATES.items()]
    return specs


def shortened_note(shortened: int, total: int, max_length: int) -> str:
    return (
        f"{shortened} of {total} grounding rows shortened to fit max_length={max_length} "
        "(description/title trimmed); every row keeps its SID, chat frame and EOS"
    )
