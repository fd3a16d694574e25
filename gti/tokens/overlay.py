"""Train only the new rows: a small trainable table in front of frozen matrices (docs/method.md).

The resized embedding / head stay frozen. `NewRowsEmbedding` overlays rows `start .. start+n` of
the input embedding with a trainable (n, d) table; `NewRowsHead` recomputes the logits of those
ids from the same table (tied model) or its own table (untied). The optimiser and DDP see only
n x d parameters (or 2 n x d untied). `merge_overlay` writes the rows back and removes the wrappers
before saving: saving with wrappers installed would reload with re-initialised rows. `FrozenBf16` holds
the frozen matrices in bf16 while training in bf16 and puts the exact weights back afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gti.tokens.vocab import is_tied


class NewRowsEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, start: int, n: int):
        super().__init__()
        self.base, self.start, self.n = base, start, n
        self.rows = nn.Parameter(base.weight.detach()[start : start + n].clone())  # (n, d)

    @property
    def weight(self) -> torch.Tensor:  # HF code inspects embed.weight (dtype, device, shape)
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)  # (B, T, d), frozen rows
        if out.dtype != self.rows.dtype and torch.is_autocast_enabled(ids.device.type):
            # base held in bf16 (FrozenBf16) under bf16-mixed: the residual stream stays fp32, as with fp32 weights
            out = out.to(self.rows.dtype)
        is_new = (ids >= self.start) & (ids < self.start + self.n)
        local = (ids - self.start).clamp(0, self.n - 1)
        return torch.where(is_new.unsqueeze(-1), F.embedding(local, self.rows).to(out.dtype), out)


class NewRowsHead(nn.Module):
    def __init__(self, base: nn.Linear, start: int, rows: nn.Parameter):
        super().__init__()
        self.base, self.start = base, start
        self.rows = rows  # (n, d): the embedding's table when tied, a second table when untied

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.base(h)  # (B, T, V); columns of the new ids are stale here
        end = self.start + self.rows.shape[0]
        b = getattr(self.base, "bias", None)
        bias = None if b is None else b[self.start : end].to(h.dtype)  # heads with a bias (Phi)
        new = F.linear(h, self.rows.to(h.dtype), bias)  # (B, T, n)
        return torch.cat([logits[..., : self.start], new, logits[..., end:]], dim=-1)


def install_overlay(model, start: int, n: int) -> list[nn.Parameter]:
    """Freeze the model, install the overlay, return the trainable tables."""
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = is_tied(model)
    wrapped_emb = NewRowsEmbedding(emb, start, n)
    model.set_input_embeddings(wrapped_emb)
    params = [wrapped_emb.rows]
    if head is not None:
        if tied:
            rows = wrapped_emb.rows  # one tensor for a tied model, and it must stay one
        else:
            rows = nn.Parameter(head.weight.detach()[start : start + n].clone())
            params.append(rows)
        model.set_output_embeddings(NewRowsHead(head, start, rows))
    return params


def has_overlay(model) -> bool:
    return isinstance(model.get_input_embeddings(), NewRowsEmbedding)


@torch.no_grad()
def overlay_rows(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Current (input rows, output rows or None when tied) of an installed overlay."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    out = head.rows if isinstance(head, NewRowsHead) and head.rows is not emb.rows else None
    return emb.rows.detach().clone(), None if out is None else out.detach().clone()


@torch.no_grad()
def merge_overlay(model) -> None:
    """Write the trained rows into the real matrices and restore the plain modules."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, NewRowsEmbedding):
        return
    head = model.get_output_embeddings()
    emb.base.weight[emb.start : emb.start + emb.n] = emb.rows.to(emb.base.weight.dtype)
    model.set_input_embeddings(emb.base)
    if isinstance(head, NewRowsHead):
        model.set_output_embeddings(head.base)
        if not is_tied(model):  # a tied head is the input matrix, written above
            head.base.weight[head.start : head.start + head.rows.shape[0]] = head.rows.to(head.base.weight.dtype)


class FrozenBf16:
    """bf16 training with a frozen backbone (overlay rows, LoRA): the frozen matrices held in bf16 (docs/traps.md).

    Under bf16-mixed, autocast casts every fp32 weight matrix to bf16 at each forward (its cast cache keeps only
    weights that require grad), so a frozen backbone is re-cast every step; held in bf16 it is cast once, and
    takes half the device memory. Only matrices are held (projections, embeddings: what autocast casts);
    vectors (norms, biases) stay fp32, and NewRowsEmbedding returns fp32 under autocast, so the residual stream
    stays fp32 as with fp32 weights. Trainable tables are left alone: fp32 master weights under bf16-mixed
    (bf16-true: Lightning casts the whole module to bf16, with or without this).
    The frozen weights as loaded stay on the CPU (no copy when the model is there); `exact()` puts them back
    for ranking, merging and saving, so a saved model is the base weights + trained tables, bit for bit.
    Full fine-tuning (nothing frozen) and non-bf16 precisions are unchanged.
    """

    def __init__(self, model):
        self.model = model
        self.originals: dict[str, torch.Tensor] = {}  # parameter name -> its frozen weights as loaded, on the CPU

    def hold(self, precision: str) -> None:
        """Frozen fp32 matrices -> bf16 when `precision` (Lightning's, e.g. "bf16-mixed") is a bf16 mode."""
        params = list(self.model.named_parameters())
        if not str(precision).startswith("bf16") or all(p.requires_grad for _, p in params):
            return
        everything = str(precision) == "bf16-true"  # no autocast there: vectors must match the bf16 activations
        with torch.inference_mode(False):  # hooks of Lightning's eval loops run in inference mode: no inference weights
            for name, p in params:
                if p.requires_grad or not p.is_floating_point():
                    continue
                # every frozen tensor, vectors too: bf16-true casts the whole module after this (Lightning)
                self.originals.setdefault(name, p.data if p.device.type == "cpu" else p.data.cpu())
                if (p.ndim >= 2 or everything) and p.dtype == torch.float32:
                    p.data = p.data.to(torch.bfloat16)

    def exact(self) -> None:
        """The frozen weights as loaded, on the device they are on now; idempotent, cheap when nothing is held."""
        with torch.inference_mode(False):
            for name, p in self.model.named_parameters():
                original = self.originals.get(name)
                if original is not None and p.dtype != original.dtype:
                    p.data = original.to(p.device)
