"""Training batches: a resumable per-epoch shuffle, optionally grouped by length, and how much of it is padding."""

from __future__ import annotations

from functools import partial

import torch


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order as an
    uninterrupted one (a DataLoader generator would restart from the seed). Lightning calls
    `set_epoch` (and wraps the sampler for DDP). After a mid-epoch resume, `resume_after` makes the
    next pass skip the examples of the batches already trained on.

    `lengths` (tokens per row; trainer.group_by_length): each batch holds rows of similar length, so
    little of it is padding (see `group_by_length`). Rows are grouped by optimizer step (`accumulate`
    batches of `batch_size` on each rank): which rows make a step does not depend on how it is split."""

    def __init__(self, n: int, seed: int, batch_size: int, lengths: torch.Tensor | list[int] | None = None, accumulate: int = 1):
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths has {len(lengths)} entries for {n} rows")
        self.n, self.seed, self.batch_size, self.accumulate = n, seed, batch_size, accumulate
        self.lengths = None if lengths is None else torch.as_tensor(lengths)  # (n,), once: lists of 1M ints are slow
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_after(self, checkpoint: dict) -> None:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
        self.skip_batches = progress["processed"]  # batches (per rank) of the interrupted epoch

    def order(self, epoch: int, world_size: int = 1) -> list[int]:
        """Every index once: the epoch's order for `world_size` ranks, before any resume skip."""
        return self.order_tensor(epoch, world_size).tolist()

    def order_tensor(self, epoch: int, world_size: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g)  # (n,)
        if self.lengths is None:
            return order
        # under DDP Lightning deals this order out by stride (rank r takes positions r, r+W, ...), so each
        # rank's batch j is drawn from positions [j*B*W, (j+1)*B*W): group units of B*W rows, not of B; and
        # a unit of `accumulate` such spans is one optimizer step, the same rows as one batch of B*accumulate
        return group_by_length(order, self.lengths, self.batch_size * world_size * self.accumulate, g)

    def __iter__(self):
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        skip, self.skip_batches = self.skip_batches * self.batch_size * world, 0
        return iter(self.order(self.epoch, world)[skip:])

    def __len__(self) -> int:
        return self.n


def group_by_length(order, lengths, unit: int, g: torch.Generator, chunk_units: int = 50) -> torch.Tensor:
    """A shuffled `order` regrouped into units of `unit` rows of similar length, the units in random order.

    Rows are sorted by length only within chunks of `chunk_units` units, so a batch still mixes rows from
    across the data set, not the epoch's shortest or longest. A last partial unit stays last: the DataLoader
    cuts batches by position, so one short unit anywhere else would shift every batch after it.
    `order`, `lengths`: (n,) tensors or lists; returns the (n,) regrouped order."""
    idx = torch.as_tensor(order)
    if len(idx) == 0:
        return idx
    lens = torch.as_tensor(lengths)[idx]
    chunk = unit * chunk_units
    # stable sort: rows of equal length keep their shuffled order
    idx = torch.cat([idx[s : s + chunk][lens[s : s + chunk].sort(stable=True).indices] for s in range(0, len(idx), chunk)])
    full = len(idx) // unit * unit  # chunks are whole units, so only the last one can end in a partial unit
    units = idx[:full].view(-1, unit)[torch.randperm(full // unit, generator=g)]
    return torch.cat([units.flatten(), idx[full:]])


def padded_share(lengths, batch_size: int, order) -> float:
    """Share of the (B, T) token slots that are padding when `order` is cut into batches padded to their longest row."""
    lens = torch.as_tensor(lengths, dtype=torch.float64)[torch.as_tensor(order, dtype=torch.long)]  # (n,)
    full = len(lens) // batch_size * batch_size
    slots = 0.0
    for batches in (lens[:full].view(-1, batch_size), lens[full:].view(1, -1)):  # (n // B, B), the last (1, n % B)
        if batches.numel():
            slots += float(batches.amax(dim=1).sum()) * batches.shape[1]
    return 1 - float(lens.sum()) / slots if slots else 0.0


def padding_summary(sampler: EpochShuffleSampler, lengths) -> str:
    """The stages' start-up line: padding of plain shuffled batches and, when grouped, of the sampler's (epoch 0)."""
    lengths = torch.as_tensor(lengths)
    plain = EpochShuffleSampler(sampler.n, sampler.seed, sampler.batch_size).order_tensor(0)  # the shuffle alone
    line = f"padded share {padded_share(lengths, sampler.batch_size, plain):.0%}"
    if sampler.lengths is None:
        return line + " (trainer.group_by_length=false)"
    return line + f" -> {padded_share(lengths, sampler.batch_size, sampler.order_tensor(0)):.0%} (batches grouped by length)"


def training_loader(rows, pad_id: int, seed: int, batch_size: int, t) -> tuple:
    """Both stages' training DataLoader over stored rows (gti.train.rows): the resumable shuffle, grouped by length
    unless trainer.group_by_length=false. Returns (loader, sampler, the start-up line on padding)."""
    from gti.train.rows import collate, row_lengths

    lengths = row_lengths(rows)
    sampler = EpochShuffleSampler(len(rows), seed, batch_size, lengths if t.group_by_length else None)
    loader = torch.utils.data.DataLoader(
        rows, batch_size=batch_size, sampler=sampler, num_workers=t.num_workers, collate_fn=partial(collate, pad_id=pad_id)
    )
    return loader, sampler, padding_summary(sampler, lengths)
