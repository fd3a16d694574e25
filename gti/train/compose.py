"""Recommendation rows composed from tokenised pieces instead of tokenising every prompt's text.

A rec prompt is template text around SID tokens, and the tokenizer splits text at added tokens, so its ids are
`head + sid(h1) + sep + sid(h2) + ... + sid(hn) + tail`. The pieces are probed once per template, and each build
checks a sample of rows against the tokenizer itself (`RecComposer.check`). `RecRowBatch` composes a whole batch
of the training split with array ops: ML-1M's 981k training prefixes in seconds, not minutes.
"""

from __future__ import annotations

import numpy as np

from gti.core.errors import ConfigError
from gti.data.dataset import Dataset
from gti.train.templates import Encoded, PromptFormatter, render_rec


class RecComposer:
    """Token ids of rec prompts from pieces: `head + sid(h1) + sep + ... + sid(hn) + tail` per template."""

    def __init__(self, fmt: PromptFormatter, index: dict[int, list[str]], templates: list[int]):
        self.fmt, self.index, self.eos = fmt, index, fmt.eos
        self.sid = {i: fmt.tok.convert_tokens_to_ids(toks) for i, toks in index.items()}
        self.pieces = {t: self._probe(t) for t in sorted(set(templates))}
        self.pool_cache: tuple | None = None

    def _probe(self, template: int) -> tuple[list[int], list[int], list[int]] | None:
        """(head, sep, tail) of a template, read off a two-item prompt; None when the ids are not a plain join."""
        a, b = sorted(self.index)[:2] if len(self.index) > 1 else (next(iter(self.index)),) * 2
        ids = self.fmt.prompt_ids(self._text([a, b], template))
        sa, sb = self.sid[a], self.sid[b]
        for i in range(len(ids) - len(sa) + 1):
            if ids[i : i + len(sa)] == sa:
                for j in range(i + len(sa), len(ids) - len(sb) + 1):
                    if ids[j : j + len(sb)] == sb:
                        head, sep, tail = ids[:i], ids[i + len(sa) : j], ids[j + len(sb) :]
                        return head, sep, tail
        return None

    def _text(self, history: list[int], template: int) -> str:
        return render_rec(self.index, history, None, template)[0]

    def prompt(self, history: list[int], template: int) -> list[int]:
        pieces = self.pieces.get(template)
        if pieces is None:  # not a plain join for this tokenizer: tokenise the text
            return self.fmt.prompt_ids(self._text(history, template))
        head, sep, tail = pieces
        ids = list(head)
        for n, item in enumerate(history):
            if n:
                ids += sep
            ids += self.sid[item]
        return ids + tail

    def row(self, history: list[int], target: int, template: int) -> Encoded:
        p, r = self.prompt(history, template), self.sid[target] + [self.eos]
        return Encoded(p + r, [-100] * len(p) + r)

    def pool(self) -> tuple[np.ndarray, dict]:
        """Every piece's ids in one array, and where each piece starts and how long it is. Items are 0..N-1."""
        n = len(self.index)
        sid_len = np.array([len(self.sid[i]) for i in range(n)])
        parts = [np.concatenate([self.sid[i] for i in range(n)]), [self.eos]]
        spans = {"sid_start": np.cumsum(sid_len) - sid_len, "sid_len": sid_len, "eos": (len(parts[0]), 1)}
        at = len(parts[0]) + 1
        for t, (head, sep, tail) in ((t, p) for t, p in self.pieces.items() if p is not None):
            for name, ids in (("head", head), ("sep", sep), ("tail", tail)):
                spans[name, t] = (at, len(ids))
                parts.append(ids)
                at += len(ids)
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]), spans

    def compose(self, flat: np.ndarray, starts: np.ndarray, counts: np.ndarray, targets: np.ndarray,
                templates: np.ndarray, history_loss: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows `row` composes, for many at once with array ops. Row r's history is flat[starts[r] : starts[r] +
        counts[r]]. Returns (row offsets (R+1,), input ids (T,), labels (T,)) of the concatenated rows."""
        pool, spans = self.pool_cache or self.pool()
        self.pool_cache = pool, spans
        # each row is 2n + 3 pieces: head, item, sep, item, ..., sep, item, tail, target, eos
        per_row = 2 * counts + 3
        row = np.repeat(np.arange(len(counts)), per_row)  # (P,) the row of each piece
        k = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)  # piece number within its row
        n = counts[row]
        is_item = (k % 2 == 1) & (k < 2 * n)
        item = np.where(is_item, flat[np.minimum(starts[row] + (k - 1) // 2, len(flat) - 1)], targets[row])
        start, length = spans["sid_start"][item], spans["sid_len"][item]
        tpl = templates[row]
        for t in self.pieces:  # template text: head first, seps between items, tail after the last item
            for name, where in (("head", k == 0), ("sep", (k % 2 == 0) & (k > 0) & (k < 2 * n)), ("tail", k == 2 * n)):
                hit = where & (tpl == t)
                start, length = np.where(hit, spans[name, t][0], start), np.where(hit, spans[name, t][1], length)
        eos = k == 2 * n + 2
        start, length = np.where(eos, spans["eos"][0], start), np.where(eos, 1, length)
        labelled = k > 2 * n  # target SID and EOS; with history_loss also every history item after the first
        if history_loss:
            labelled |= is_item & (k > 1)
        first = np.cumsum(length) - length  # (P,) where each piece starts in the output
        piece = np.repeat(np.arange(len(row)), length)
        ids = pool[np.repeat(start, length) + np.arange(len(piece)) - first[piece]]
        labels = np.where(labelled[piece], ids, -100)
        offsets = np.concatenate([[0], np.cumsum(np.bincount(row, weights=length, minlength=len(counts)))]).astype(np.int64)
        return offsets, ids, labels

    def check(self, samples: list[tuple[list[int], int, int]]) -> None:
        """The composed rows must be the tokenizer's rows exactly; a mismatch is a bug, not a user error."""
        for history, target, template in samples:
            want = self.fmt._encode(*render_rec(self.index, history, target, template))
            if self.row(history, target, template).input_ids != want.input_ids:
                raise RuntimeError(f"composed rec row differs from the tokenizer's (template {template}, history {history})")


class RecRowBatch:
    """A batch of the train table (arrow) -> its rows (arrow), for `Dataset.map`: composed with array ops
    (RecComposer.compose), or row by row when a template is not a plain join for this tokenizer."""

    def __init__(self, ds: Dataset, comp: RecComposer, cfg, new_start: int, plain: bool):
        users = sorted(ds.inter)
        self.flat = np.concatenate([np.asarray(ds.inter[u], dtype=np.int64) for u in users])  # every sequence, end to end
        lengths = np.array([len(ds.inter[u]) for u in users])
        self.ptr = np.zeros(max(users) + 1, dtype=np.int64)
        self.ptr[users] = np.cumsum(lengths) - lengths  # where each user's sequence starts in flat
        self.ds, self.comp, self.cfg, self.new_start, self.plain = ds, comp, cfg, new_start, plain
        self.templates = np.asarray(cfg.templates)

    def __call__(self, batch):
        import pyarrow as pa

        user, pos, index = (batch[c].to_numpy() for c in ("user", "target_pos", "index"))
        h = self.cfg.data.max_history
        first = np.maximum(0, pos - h) if h > 0 else np.zeros_like(pos)
        starts, counts, targets = self.ptr[user] + first, pos - first, self.flat[self.ptr[user] + pos]
        templates = self.templates[index % len(self.templates)]
        if self.plain:
            offsets, ids, labels = self.comp.compose(self.flat, starts, counts, targets, templates, self.cfg.history_loss)
        else:
            offsets, ids, labels = self._row_by_row(starts, counts, targets, templates)
        self._check_lengths(np.diff(offsets), user, counts)
        offsets = pa.array(offsets.astype(np.int32))
        return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.astype(np.int32))),
                         "labels": pa.ListArray.from_arrays(offsets, pa.array(labels.astype(np.int32)))})  # fmt: skip

    def _row_by_row(self, starts, counts, targets, templates):
        from gti.train.recommender import supervise_history

        rows = []
        for s, c, target, t in zip(starts, counts, targets, templates):
            history = self.flat[s : s + c].tolist()
            row = self.comp.row(history, int(target), int(t))
            if self.cfg.history_loss:
                row = supervise_history(row, len(self.ds.index[history[0]]), self.new_start)
            rows.append(row)
        lengths = [len(r.input_ids) for r in rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return offsets, np.concatenate([r.input_ids for r in rows]), np.concatenate([r.labels for r in rows])

    def _check_lengths(self, lengths, user, counts) -> None:
        over = np.flatnonzero(lengths > self.cfg.max_length)
        if len(over):
            i = over[0]
            raise ConfigError(
                f"max_length={self.cfg.max_length} is too short: user {user[i]}'s history of {counts[i]} items needs "
                f"{lengths[i]} tokens; raise max_length or lower data.max_history={self.cfg.data.max_history}"
            )
