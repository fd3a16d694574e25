"""Training batches: a resumable per-epoch shuffle, optionally grouped by length, and how much of it is padding."""

from __future__ import annotations

from functools import partial

import torch


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order as an
    uninterrupted one (a DataLoader generator would restart from the seed). Lightning calls
    `set_epoch` (and wraps the sampler for DDP). After a mid-epoch resume (`resume`, called by
    ResumableLoader.load_state_dict), the next pass of that epoch skips the batches already trained on.

    `lengths` (tokens per row; trainer.group_by_length): each batch holds rows of similar length, so
    little of it is padding (see `group_by_length`). Rows are grouped by optimizer step (`accumulate`
    batches of `batch_size` on each rank): which rows make a step does not depend on how it is split."""

    def __init__(self, n: int, seed: int, batch_size: int, lengths: torch.Tensor | list[int] | None = None, accumulate: int = 1):
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths has {len(lengths)} entries for {n} rows")
        self.n, self.seed, self.batch_size, self.accumulate = n, seed, batch_size, accumulate
        self.lengths = None if lengths is None else torch.as_tensor(lengths)  # (n,), once: lists of 1M ints are slow
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches per rank already trained in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches: int) -> None:
        """Continue `epoch` after its first `batches` batches (per rank); a later epoch starts from its beginning."""
        self.epoch, self.resume_at = epoch, (epoch, batches)

    def batches_to_skip(self) -> int:
        """Batches the next pass skips: those already trained when it is the interrupted epoch, else none."""
        return self.resume_at[1] if self.resume_at is not None and self.resume_at[0] == self.epoch else 0

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

    def positions(self, world_size: int = 1) -> list[int]:
        """One pass: the epoch's order without the rows of the batches a resume skips (once only).

        Alone, the rest of the order, so the last batch is as short as in the uninterrupted pass. Under DDP,
        Lightning's DistributedSamplerWrapper reads `len(self)` positions and pads the last ranks by wrapping
        round to position 0: the skipped rows go to the end, so the wrapper's padding is the uninterrupted
        pass's padding (the order's first rows), and a rank stops after its remaining batches before reaching them."""
        skip = self.batches_to_skip() * self.batch_size * world_size
        self.resume_at = None
        order = self.order(self.epoch, world_size)
        return order[skip:] + order[:skip] if world_size > 1 else order[skip:]

    def __iter__(self):
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return iter(self.positions(world))

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


def padded_share(lengths, batch_size: int, order, multiple: int = 1) -> float:
    """Share of the (B, T) token slots that are padding when `order` is cut into batches padded to their longest row
    (rounded up to a `multiple`: trainer.pad_to_multiple_of)."""
    from gti.train.rows import padded_width

    lens = torch.as_tensor(lengths, dtype=torch.float64)[torch.as_tensor(order, dtype=torch.long)]  # (n,)
    full = len(lens) // batch_size * batch_size
    slots = 0.0
    for batches in (lens[:full].view(-1, batch_size), lens[full:].view(1, -1)):  # (n // B, B), the last (1, n % B)
        if batches.numel():
            slots += float(padded_width(batches.amax(dim=1), multiple).sum()) * batches.shape[1]
    return 1 - float(lens.sum()) / slots if slots else 0.0


def padding_summary(sampler: EpochShuffleSampler, lengths, multiple: int = 1) -> str:
    """The stages' start-up line: padding of plain shuffled batches and, when grouped, of the sampler's (epoch 0),
    with widths rounded up to a `multiple` (trainer.pad_to_multiple_of)."""
    lengths = torch.as_tensor(lengths)
    plain = EpochShuffleSampler(sampler.n, sampler.seed, sampler.batch_size).order_tensor(0)  # the shuffle alone
    line = f"padded share {padded_share(lengths, sampler.batch_size, plain, multiple):.0%}"
    if multiple > 1:
        line += f" (widths a multiple of {multiple})"
    if sampler.lengths is None:
        return line + " (trainer.group_by_length=false)"
    grouped = padded_share(lengths, sampler.batch_size, sampler.order_tensor(0), multiple)
    return line + f" -> {grouped:.0%} (batches grouped by length)"


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader over an EpochShuffleSampler that knows where it is in the epoch.

    Lightning's fit loop saves `state_dict()` of every training loader that has one into each checkpoint
    (FitLoop.on_save_checkpoint, under "combined_loader") and, when a fit restarts from a checkpoint, hands it
    back to `load_state_dict` before the epoch's first batch is drawn (FitLoop.setup_data). Batches are counted
    as they leave the loader: with a loader of known length Lightning fetches no batch ahead, so at a checkpoint
    the count is the batches trained in this epoch, per rank.

    `epoch_sampler` is kept by name: under DDP Lightning rebuilds the loader from its attributes with the sampler
    wrapped (DistributedSamplerWrapper), and the rebuilt loader must still reach the shuffle."""

    def __init__(self, dataset, epoch_sampler: EpochShuffleSampler, **kwargs):
        super().__init__(dataset, **{"sampler": epoch_sampler, **kwargs})
        self.epoch_sampler = epoch_sampler
        self._batches = 0  # batches of the current epoch that have left the loader

    def __iter__(self):
        # a generator: nothing runs until the first batch is asked for, after Lightning's set_epoch
        self._batches = self.epoch_sampler.batches_to_skip()
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch_sampler.epoch, "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_sampler.resume(state["epoch"], state["batches"])


def training_loader(rows, pad_id: int, seed: int, batch_size: int, t) -> tuple:
    """Both stages' training DataLoader over stored rows (gti.train.rows): the resumable shuffle, grouped by length
    unless trainer.group_by_length=false, by optimizer step (trainer.accumulate_grad_batches), widths padded to a
    multiple of trainer.pad_to_multiple_of; under trainer.compile a short last batch filled with blank rows.
    Returns (loader, the start-up line on padding)."""
    from gti.train.rows import StoredRows, collate, row_lengths

    lengths = row_lengths(rows)
    sampler = EpochShuffleSampler(len(rows), seed, batch_size, lengths if t.group_by_length else None, t.accumulate_grad_batches)
    pad = partial(collate, pad_id=pad_id, multiple=t.pad_to_multiple_of, fill_to=batch_size if t.compile else 0)
    loader = ResumableLoader(StoredRows(rows), sampler, batch_size=batch_size, num_workers=t.num_workers, collate_fn=pad)
    return loader, padding_summary(sampler, lengths, t.pad_to_multiple_of)
