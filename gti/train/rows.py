"""Tokenised rows on `datasets`, cached on disk and keyed by everything that changes them (docs/traps.md).

Building rows in Python cost every process minutes at ML-1M scale (981k training prefixes) before the GPU was
touched. Here each stage's rows are a `datasets.Dataset` (columns `input_ids`, `labels`) built once with a
batched `map` and kept under `data/NAME/cache/`; the second run of a stage, and every later benchmark cell,
loads it memory-mapped. The folder name is a hash of the key (tokenizer, chat frame, templates, max_length,
the data and SID files, options): different settings get a different folder, nothing is rebuilt in place.
Recommendation rows are composed from tokenised pieces (gti.train.compose), not tokenised one by one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gti.core.io import file_sha256, write_json
from gti.core.log import get_logger
from gti.data.dataset import Dataset, Example
from gti.train.compose import RecComposer, RecRowBatch
from gti.train.templates import PromptFormatter

ROWS_VERSION = 1  # bump when the way rows are built changes: old caches are then simply not found


# ----------------------------------------------------------------------------------------- cache
def tokenizer_fingerprint(fmt: PromptFormatter) -> str:
    tok = fmt.tok
    backend = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else json.dumps(tok.get_vocab(), sort_keys=True)
    frame = fmt.prompt_text("{prompt}")  # chat template + system prompt, as the rows see them
    return hashlib.sha256(f"{type(tok).__name__}\n{backend}\n{frame}".encode()).hexdigest()


def data_fingerprint(ds: Dataset) -> dict:
    """The files rows are made of, plus the users a subset kept (data.max_users / max_items)."""
    users = hashlib.sha256(json.dumps(sorted(ds.inter)).encode()).hexdigest()
    return {k: file_sha256(ds.path(k)) for k in ("inter", "item", "index")} | {"users": users}


def cached(ds: Dataset, key: dict, build: Callable[[], torch.utils.data.Dataset], stage: str, what: str):
    """Load `what` from data/NAME/cache/<kind>-<hash of key>, or build it and store it there atomically.

    Concurrent builders (benchmark cells, DDP ranks) each write a private folder and rename it into place;
    the first rename wins and the others use its result. Returns (rows, info saved with them).
    `stage` names the command the rows are for ("gti.ground"): its lines read `[gti.ground] ...`."""
    import datasets

    log = get_logger(stage.removeprefix("gti."))

    digest = hashlib.sha256(json.dumps({"version": ROWS_VERSION, **key}, sort_keys=True).encode()).hexdigest()[:16]
    folder = ds.root / ds.name / "cache" / f"{key['kind']}-{digest}"
    if not (folder / "gti_rows.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a folder without its marker was not written by `cached`
        rows, info = build()
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        rows.save_to_disk(str(tmp))
        write_json(tmp / "gti_rows.json", {"key": key, "info": info, "rows": len(rows)})
        try:
            os.replace(tmp, folder)
        except OSError:  # another process got there first: its rows are the same rows
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.info("%s: %d rows tokenised, cached in %s", what, len(rows), folder)
            return rows, info
    meta = json.loads((folder / "gti_rows.json").read_text())
    log.info("%s: %d rows from the cache %s", what, meta["rows"], folder)
    return datasets.load_from_disk(str(folder)), meta["info"]


def row_features():
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))  # half of int64's disk and page cache
    return datasets.Features({"input_ids": ids, "labels": ids})


def row_lengths(rows) -> torch.Tensor:
    """Tokens per stored row (n,), read from the arrow offsets: no row is decoded, no list of n ints is built.
    A selected or shuffled dataset (an indices mapping) gives its own rows' lengths, in its order."""
    import pyarrow.compute as pc

    column = rows.with_format("arrow")["input_ids"]  # a zero-copy slice of the table, a take through a mapping
    return torch.tensor(pc.list_value_length(column).to_numpy())


class StoredRows(torch.utils.data.Dataset):
    """Stored rows for a DataLoader that fetches a batch at a time: `__getitems__` hands `collate` the batch as
    arrow columns. `datasets.Dataset.__getitems__` returns one Python dict of lists per row, and turning those
    back into tensors took 32 ms for a 256-row ML-1M batch on a 2-core machine (5 ms as columns): host time inside
    every step when the loader has no workers (trainer.num_workers=0)."""

    def __init__(self, rows):
        self.rows = rows.with_format("arrow")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[[i]]

    def __getitems__(self, indices: list[int]):
        return self.rows[indices]  # a pyarrow Table, one row per index


def collate(rows, pad_id: int, left: bool = False, multiple: int = 1, fill_to: int = 0) -> dict:
    """Stored rows -> padded (B, T) tensors, T the longest row rounded up to a `multiple` (trainer.pad_to_multiple_of);
    left padding for generation. Rows without labels are prompts; rows with labels also get "predict_at".
    `rows`: a pyarrow Table (StoredRows) or row dicts (a list, a `datasets.Dataset`).
    `fill_to` > B: a short batch gets blank rows up to that many (trainer.compile: the batch keeps its shape, so an
    epoch's last batch is no new shape to compile). A blank row is one attended pad token and no label: rows never
    see each other, so loss and gradients are those of the real rows."""
    import pyarrow as pa

    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist([dict(r) for r in rows])
    ids, spots = _padded(table.column("input_ids"), pad_id, left, multiple)
    real = ids.shape[0]
    if fill_to > real:
        ids = torch.cat([ids, ids.new_full((fill_to - real, ids.shape[1]), pad_id)])
    mask = torch.zeros(ids.shape, dtype=torch.long)
    mask[spots] = 1
    mask[real:, -1 if left else 0] = 1  # blank rows: one token each, so no attention row is empty
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in table.column_names:  # a row's labels are as long as its input_ids: the same positions
        batch["labels"] = torch.full(ids.shape, -100, dtype=torch.long)
        batch["labels"][spots] = torch.from_numpy(_flat(table.column("labels").combine_chunks()))
        # (2, N) (row, position) of the logits the loss reads, position t predicting token t + 1: found here on the
        # host, as the lean step (gti.train.step.lean_lm_loss) needs N, which on the device costs a sync each step
        batch["predict_at"] = (batch["labels"][:, 1:] != -100).nonzero().T.contiguous()
    for k in ("index", "target", "user"):  # evaluation prompts carry who they are
        if k in table.column_names:
            batch[k] = torch.from_numpy(table.column(k).to_numpy().astype("int64"))
    return batch


def prompt_loader(rows, pad_id: int, batch_size: int):
    """Evaluation prompts (eval_rows) in batches of `batch_size`, left padded, in the rows' order (longest first)."""
    from functools import partial

    return torch.utils.data.DataLoader(StoredRows(rows), batch_size=batch_size, collate_fn=partial(collate, pad_id=pad_id, left=True))


def padded_width(longest, multiple: int = 1):
    """The width a batch is padded to: its longest row rounded up to a `multiple` (trainer.pad_to_multiple_of);
    `longest` an int or a tensor of them (gti.train.batching.padded_share)."""
    return -(-longest // multiple) * multiple


def _padded(column, fill: int, left: bool, multiple: int = 1) -> tuple[torch.Tensor, tuple]:
    """A list column -> (B, T) int64 tensor padded with `fill` on the right (left: on the left), T the longest row
    rounded up to a `multiple`, and the (row, column) indices of the real tokens. Vectorised over the flat values:
    no per-row Python."""
    import numpy as np
    import pyarrow.compute as pc

    column = column.combine_chunks()
    n = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)  # (B,)
    flat = _flat(column)
    width = padded_width(int(n.max(initial=0)), multiple)
    row = np.repeat(np.arange(len(n)), n)
    col = np.arange(len(flat)) - np.repeat(np.cumsum(n) - n, n)  # position inside its own row
    if left:
        col += np.repeat(width - n, n)
    out = np.full((len(n), width), fill, dtype=np.int64)
    out[row, col] = flat
    return torch.from_numpy(out), (torch.from_numpy(row), torch.from_numpy(col))


def _flat(column):
    """A list array's values end to end (offsets applied), int64."""
    return column.flatten().to_numpy(zero_copy_only=False).astype("int64")


# ----------------------------------------------------------------------------------------- grounding rows
def grounding_rows(ds: Dataset, new, fmt: PromptFormatter, templates: list[str], max_length: int, stage: str):
    """The grounding rows of gti.testing.grounding_examples (each row tokenised from its text), as a cached dataset (same rows, same order)."""
    from gti.train.grounding import grounding_specs, shortened_note

    key = {"kind": "ground", "tokenizer": tokenizer_fingerprint(fmt), "data": data_fingerprint(ds),
           "templates": list(templates), "max_length": max_length, "tokens": new.tokens,
           "descriptions": hashlib.sha256(json.dumps(new.descriptions).encode()).hexdigest()}  # fmt: skip

    def build():
        import datasets

        specs = grounding_specs(ds, new, templates)
        shortened = 0

        def encode(batch: dict) -> dict:
            nonlocal shortened
            rows, cut = fmt.encode_many([specs[i] for i in batch["spec"]], max_length)
            shortened += cut
            return {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}

        table = datasets.Dataset.from_dict({"spec": list(range(len(specs)))})
        rows = table.map(encode, batched=True, batch_size=2000, remove_columns=["spec"], features=row_features(),
                         desc="tokenising grounding rows")
        return rows, {"shortened": shortened}

    rows, info = cached(ds, key, build, stage, "grounding rows")
    get_logger(stage.removeprefix("gti.")).info(shortened_note(info["shortened"], len(rows), max_length))
    return rows


# ----------------------------------------------------------------------------------------- recommendation rows
@dataclass
class TrainTable:
    """The training split as arrays, one entry per row: user, position of the target in the user's sequence,
    and the row's index in the full split (picks its template, as Example.index does)."""

    user: list[int]
    target_pos: list[int]
    index: list[int]


def train_table(inter: dict[int, list[int]], per_user: int = 0, stride: int = 1) -> TrainTable:
    """leave_one_out's train split (every prefix of seq[:-2]) without an Example per prefix; per_user > 0 keeps
    each user's last per_user rows, stride apart, as gti.testing.last_per_user picks them."""
    users, positions, indices, offset = [], [], [], 0
    for user in sorted(inter):
        n = len(inter[user]) - 3  # targets at positions 1 .. len-3
        if n < 1:
            offset += max(n, 0)
            continue
        picked = range(n, 0, -stride)[:per_user][::-1] if per_user > 0 else range(1, n + 1)
        users += [user] * len(picked)
        positions += list(picked)
        indices += [offset + t - 1 for t in picked]
        offset += n
    return TrainTable(users, positions, indices)


def history_of(seq: list[int], pos: int, max_history: int) -> list[int]:
    return seq[max(0, pos - max_history) : pos] if max_history > 0 else seq[:pos]


def rec_train_rows(ds: Dataset, fmt: PromptFormatter, cfg, new, stage: str = "gti.finetune"):
    """Fine-tuning rows (rec rows, history_loss labels, multitask grounding rows) as a cached dataset."""

    stride = max(cfg.data.max_history, 1) if cfg.history_loss else 1
    key = {"kind": "finetune", "tokenizer": tokenizer_fingerprint(fmt), "data": data_fingerprint(ds),
           "templates": list(cfg.templates), "max_length": cfg.max_length, "max_history": cfg.data.max_history,
           "train_per_user": cfg.train_per_user, "history_loss": cfg.history_loss, "new_start": new.start}  # fmt: skip

    def build():
        import datasets

        table = train_table(ds.inter, cfg.train_per_user, stride)
        comp = RecComposer(fmt, ds.index, cfg.templates)
        n = len(table.user)
        sample = sorted({0, n // 2, n - 1} if n else set())
        comp.check([(history_of(ds.inter[table.user[i]], table.target_pos[i], cfg.data.max_history),
                     ds.inter[table.user[i]][table.target_pos[i]], cfg.templates[table.index[i] % len(cfg.templates)])
                    for i in sample])  # fmt: skip
        rows = datasets.Dataset.from_dict({"user": table.user, "target_pos": table.target_pos, "index": table.index})
        encode = RecRowBatch(ds, comp, cfg, new.start, plain=all(p is not None for p in comp.pieces.values()))
        rows = rows.with_format("arrow").map(encode, batched=True, batch_size=8192, remove_columns=["user", "target_pos", "index"],
                                             features=row_features(), num_proc=_procs(n), desc="composing fine-tuning rows")  # fmt: skip
        return rows.with_format(None), {}

    rows, _ = cached(ds, key, build, stage, "fine-tuning rows")
    if cfg.multitask:  # LC-Rec multi-task baseline: also learn text <-> SID
        import datasets

        from gti.train.templates import GROUNDING_TEMPLATES

        extra = grounding_rows(ds, new, fmt, list(GROUNDING_TEMPLATES), cfg.max_length, stage)
        rows = datasets.concatenate_datasets([rows, extra])
    return rows


def _procs(n: int) -> int | None:
    """Worker processes for a big build: they pay off only past ~100k rows, and only with spare cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8) if n > 100_000 and cores > 2 else None


def eval_rows(ds: Dataset, examples: list[Example], fmt: PromptFormatter, template: int):
    """Evaluation prompts (no response), longest first: batches of similar length, and the largest batch
    comes first, so a batch size too big for memory fails at once. Metrics are keyed by `index`."""
    import datasets

    comp = RecComposer(fmt, ds.index, [template])
    if examples:
        comp.check([(list(examples[0].history), examples[0].target, template)])
    prompts = [comp.prompt(list(ex.history), template) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    return datasets.Dataset.from_dict({
        "input_ids": [prompts[i] for i in order],
        "index": [examples[i].index for i in order],
        "target": [examples[i].target for i in order],
        "user": [examples[i].user for i in order],
    })  # fmt: skip
