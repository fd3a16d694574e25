"""Train only the new rows: a small trainable table in front of frozen matrices (design.md §6).

The resized embedding / head stay frozen. `NewRowsEmbedding` overlays rows `start .. start+n` of
the input embedding with a trainable (n, d) table; `NewRowsHead` recomputes the logits of those
ids from the same table (tied model) or its own table (untied). The optimiser and DDP see only
n x d parameters (or 2 n x d untied). `merge_overlay` writes the rows back and removes the wrappers
before saving: saving with wrappers installed would reload with re-initialised rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    tied = head is None or head.weight.data_ptr() == emb.weight.data_ptr()
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
        if head.base.weight.data_ptr() != emb.base.weight.data_ptr():
            head.base.weight[head.start : head.start + head.rows.shape[0]] = head.rows.to(head.base.weight.dtype)
        model.set_output_embeddings(head.base)
