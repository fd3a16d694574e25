"""Tokenised rows on `datasets` (gti.train.rows): the same rows as the tokenizer path, cached and keyed by settings."""

from __future__ import annotations

import json
import random

import pytest
import torch
from fixtures import write_toy_dataset

from gti.core.config import DataConfig, FinetuneConfig
from gti.data.dataset import leave_one_out, load_dataset
from gti.testing import grounding_examples, last_per_user, train_rows
from gti.tokens.vocab import add_tokens, sid_tokens
from gti.train.compose import RecComposer
from gti.train.recommender import rec_prompt
from gti.train.rows import StoredRows, collate, eval_rows, grounding_rows, rec_train_rows, train_table
from gti.train.templates import GROUNDING_TEMPLATES, PromptFormatter


@pytest.fixture()
def toy(tmp_path, tokenizer):
    """The toy dataset with a varied SID index (2- to 4-token SIDs) and the real tokenizer extended with it."""
    write_toy_dataset(tmp_path / "data")
    index_path = tmp_path / "data" / "toy" / "toy.index.json"
    index = {str(i): [f"<a_{i % 4}>", f"<b_{i // 4}>", f"<c_{i % 3}>", f"<d_{i}>"][: 2 + i % 3] for i in range(12)}
    index_path.write_text(json.dumps(index))
    ds = load_dataset(tmp_path / "data", "toy", need_index=True)
    tokens = sid_tokens(ds.index)
    new = add_tokens(tokenizer, tokens, [["x"] for _ in tokens])
    return ds, new, PromptFormatter(tokenizer)


def as_lists(rows) -> list[tuple[list[int], list[int]]]:
    return [(r["input_ids"], r["labels"]) for r in rows]


@pytest.mark.parametrize(
    "options",
    [{}, {"train_per_user": 2, "history_loss": True, "max_history": 2}, {"multitask": True, "templates": [2, 0]}],
)
def test_rec_rows_equal_the_tokenizer_rows(toy, options):
    ds, new, fmt = toy
    history = options.pop("max_history", 20)
    cfg = FinetuneConfig(data=DataConfig(name="toy", max_history=history), max_length=96, **options)
    train = leave_one_out(ds.inter, history)["train"]
    if cfg.train_per_user:
        train = last_per_user(train, cfg.train_per_user, history if cfg.history_loss else 1)
    want = [(r.input_ids, r.labels) for r in train_rows(ds, train, fmt, cfg, new)]
    assert as_lists(rec_train_rows(ds, fmt, cfg, new)) == want
    assert as_lists(rec_train_rows(ds, fmt, cfg, new)) == want  # and again from the cache


def test_row_by_row_path_gives_the_same_rows(toy, monkeypatch):
    """Templates that are not a plain join for a tokenizer are composed row by row, with the same result."""
    ds, new, fmt = toy
    cfg = FinetuneConfig(data=DataConfig(name="toy", max_history=2), max_length=96, history_loss=True, train_per_user=2)
    fast = as_lists(rec_train_rows(ds, fmt, cfg, new))
    monkeypatch.setattr(RecComposer, "_probe", lambda self, template: None)
    cfg.templates = [0, 1, 2][::-1][::-1]  # same settings, but a fresh cache folder is needed: change the data root
    other = ds.root.parent / "again"
    write_toy_dataset(other)
    (other / "toy" / "toy.index.json").write_text(ds.path("index").read_text())
    assert as_lists(rec_train_rows(load_dataset(other, "toy", need_index=True), fmt, cfg, new)) == fast


def test_train_table_is_leave_one_out_without_examples():
    rng = random.Random(0)
    inter = {u: [rng.randrange(50) for _ in range(rng.randrange(1, 15))] for u in range(40)}
    for per_user, stride in ((0, 1), (1, 1), (3, 1), (2, 4)):
        train = leave_one_out(inter, 5)["train"]
        if per_user:
            train = last_per_user(train, per_user, stride)
        table = train_table(inter, per_user, stride)
        got = list(zip(table.user, table.index, (inter[u][p] for u, p in zip(table.user, table.target_pos))))
        assert got == [(ex.user, ex.index, ex.target) for ex in train]


def test_grounding_rows_equal_grounding_examples(toy):
    ds, new, fmt = toy
    templates = list(GROUNDING_TEMPLATES)
    want = [(r.input_ids, r.labels) for r in grounding_examples(ds, new, fmt, templates, 40)]
    assert as_lists(grounding_rows(ds, new, fmt, templates, 40, "test")) == want


def test_cache_is_keyed_by_settings_and_data(toy, capsys):
    ds, new, fmt = toy
    cfg = FinetuneConfig(data=DataConfig(name="toy"), max_length=96)
    rec_train_rows(ds, fmt, cfg, new)
    rec_train_rows(ds, fmt, cfg, new)
    out = capsys.readouterr().out
    assert "rows tokenised, cached in" in out and "rows from the cache" in out
    cache = ds.root / "toy" / "cache"
    assert len(list(cache.iterdir())) == 1
    cfg.templates = [1]  # another setting: another folder, the first one left as it was
    rec_train_rows(ds, fmt, cfg, new)
    ds.path("inter").write_text(json.dumps({str(u): s[::-1] for u, s in ds.inter.items()}))  # other data, same name
    reversed_ds = load_dataset(ds.root, "toy", need_index=True)
    rows = rec_train_rows(reversed_ds, fmt, cfg, new)
    assert len(list(cache.iterdir())) == 3
    first = rows[0]["input_ids"]
    assert fmt.tok.convert_tokens_to_ids(ds.index[reversed_ds.inter[0][1]]) == first[-4:-1][-len(ds.index[reversed_ds.inter[0][1]]):]


def test_half_written_cache_is_never_read(toy, capsys):
    ds, new, fmt = toy
    cfg = FinetuneConfig(data=DataConfig(name="toy"), max_length=96)
    rows = rec_train_rows(ds, fmt, cfg, new)
    (folder,) = (ds.root / "toy" / "cache").iterdir()
    (folder / "gti_rows.json").unlink()  # as if killed before the end: the folder does not count as a cache
    assert as_lists(rec_train_rows(ds, fmt, cfg, new)) == as_lists(rows)
    assert capsys.readouterr().out.count("rows tokenised") == 2


def test_too_long_history_is_a_config_error_naming_the_user(toy):
    from gti.core.errors import ConfigError

    ds, new, fmt = toy
    with pytest.raises(ConfigError, match="max_length=40 is too short: user"):
        rec_train_rows(ds, fmt, FinetuneConfig(data=DataConfig(name="toy"), max_length=40), new)


def test_eval_rows_longest_first_and_left_padded(toy):
    ds, new, fmt = toy
    test = leave_one_out(ds.inter, 3)["test"]
    rows = eval_rows(ds, test, fmt, 1)
    lengths = [len(r["input_ids"]) for r in rows]
    assert lengths == sorted(lengths, reverse=True) and sorted(rows["index"]) == [ex.index for ex in test]
    for r in rows:
        ex = test[r["index"]]
        assert r["input_ids"] == fmt.prompt_ids(rec_prompt(ds, ex, 1)[0]) and (r["target"], r["user"]) == (ex.target, ex.user)
    batch = collate([rows[0], rows[len(rows) - 1]], pad_id=0, left=True)
    assert "labels" not in batch and batch["attention_mask"][:, -1].all()  # left padded: every prompt ends at the edge
    assert batch["index"].tolist() == [rows[0]["index"], rows[len(rows) - 1]["index"]]


def padded_by_hand(rows: list[dict], key: str, fill: int, left: bool) -> list[list[int]]:
    width = max(len(r["input_ids"]) for r in rows)
    pad = [[fill] * (width - len(r[key])) for r in rows]
    return [p + r[key] if left else r[key] + p for p, r in zip(pad, rows)]


@pytest.mark.parametrize("left", [False, True])
def test_stored_rows_collate_to_the_padded_rows(toy, left):
    """The training loader's batches (StoredRows: arrow columns, padded without a per-row loop) hold each row's
    tokens and labels at its own positions; a shuffled subset (an indices mapping over the arrow table) too."""
    ds, new, fmt = toy
    cfg = FinetuneConfig(data=DataConfig(name="toy", max_history=3), max_length=96, train_per_user=2)
    rows = rec_train_rows(ds, fmt, cfg, new).shuffle(seed=1).select(range(7))
    picked = [5, 0, 3, 3]
    want = [rows[i] for i in picked]
    for batch in (collate(StoredRows(rows).__getitems__(picked), 9, left), collate(want, 9, left)):
        assert batch["input_ids"].tolist() == padded_by_hand(want, "input_ids", 9, left)
        assert batch["labels"].tolist() == padded_by_hand(want, "labels", -100, left)
        ones = [{"input_ids": [1] * len(r["input_ids"])} for r in want]
        assert batch["attention_mask"].tolist() == padded_by_hand(ones, "input_ids", 0, left)
        assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
        labelled = [(i, t) for i, row in enumerate(batch["labels"].tolist()) for t in range(len(row) - 1) if row[t + 1] != -100]
        assert list(zip(*batch["predict_at"].tolist())) == labelled  # the logits the loss reads, found on the host
    # trainer.pad_to_multiple_of: the same rows in a batch as wide as the next multiple, the extra slots padding
    longest = max(len(r["input_ids"]) for r in want)
    wide = collate(StoredRows(rows).__getitems__(picked), 9, left, multiple=16)
    assert wide["input_ids"].shape == (4, -(-longest // 16) * 16) and wide["input_ids"].shape[1] > longest
    narrow = collate(want, 9, left)
    cut = slice(wide["input_ids"].shape[1] - longest, None) if left else slice(0, longest)
    for k in ("input_ids", "labels", "attention_mask"):
        assert wide[k][:, cut].tolist() == narrow[k].tolist()
    assert int(wide["attention_mask"].sum()) == int(narrow["attention_mask"].sum())
    if not left:  # the stages' training loader pads this way under trainer.pad_to_multiple_of
        from gti.core.config import TrainerConfig
        from gti.train.batching import training_loader

        loader, line = training_loader(rows, 9, 0, 3, TrainerConfig(pad_to_multiple_of=16))
        assert {b["input_ids"].shape[1] % 16 for b in loader} == {0} and "(widths a multiple of 16)" in line
        # trainer.compile: 7 rows in batches of 3, the last one filled with blank rows to keep its shape
        assert [b["input_ids"].shape[0] for b in loader] == [3, 3, 1]
        compiled, _ = training_loader(rows, 9, 0, 3, TrainerConfig(pad_to_multiple_of=16, compile=True))
        assert [b["input_ids"].shape[0] for b in compiled] == [3, 3, 3]


def test_a_short_batch_filled_to_size_keeps_its_rows_and_loss_positions(toy):
    """collate(fill_to=N): the real rows as they were, then blank rows of one attended pad token and no label, so
    the loss reads the same positions."""
    ds, new, fmt = toy
    rows = rec_train_rows(ds, fmt, FinetuneConfig(data=DataConfig(name="toy", max_history=3), max_length=96), new)
    short = [rows[0], rows[1]]
    plain, filled = collate(short, 9), collate(short, 9, fill_to=5)
    assert filled["input_ids"].shape == (5, plain["input_ids"].shape[1])
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(filled[k][:2], plain[k])
    assert (filled["input_ids"][2:] == 9).all() and (filled["labels"][2:] == -100).all()
    assert filled["attention_mask"][2:].tolist() == [[1] + [0] * (plain["input_ids"].shape[1] - 1)] * 3
    assert torch.equal(filled["predict_at"], plain["predict_at"])
    assert torch.equal(collate(short, 9, fill_to=2)["input_ids"], plain["input_ids"])  # a full batch stays as it is


def test_chat_frame_matches_the_template_and_falls_back(tokenizer):
    fmt = PromptFormatter(tokenizer)
    for prompt in ("Which item is <a_1>?", "  spaces and {braces} ", ""):
        assert fmt.prompt_text(prompt) == fmt._render_chat(prompt)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | trim }}|{% endfor %}"
    trimmed = PromptFormatter(tokenizer)  # a template that edits the text is not a plain frame
    assert trimmed.prompt_text("  x ") == "|x|"


def test_composer_uses_the_tokenizer_when_the_prompt_is_not_a_plain_join(toy):
    ds, new, fmt = toy
    comp = RecComposer(fmt, ds.index, [0])
    comp.pieces[0] = None
    ex = leave_one_out(ds.inter, 20)["test"][0]
    assert comp.prompt(list(ex.history), 0) == fmt.prompt_ids(rec_prompt(ds, ex, 0)[0])
