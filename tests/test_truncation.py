"""Rows too long for max_length: free text is shortened, SIDs / chat frame / EOS never cut (docs/traps.md)."""

from pathlib import Path

import pytest

from gti.core.config import FinetuneConfig
from gti.core.errors import ConfigError
from gti.data.dataset import Dataset, leave_one_out
from gti.testing import grounding_examples, train_rows
from gti.tokens.vocab import add_tokens
from gti.train.recommender import check_prompt_lengths, rec_prompt
from gti.train.templates import PromptFormatter

SENTENCE = (
    "A retired lighthouse keeper returns to the island where he grew up and finds the town changed beyond recognition. "
)
DESC = (SENTENCE * 4 + "It is a slow, warm film about memory.").strip()  # ~90 tokens
TITLE = "The Extraordinary and Thoroughly Unlikely Adventures of a Very Small Dog in a Very Large City (1998)"
HEADER = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"
GENERATION_PROMPT = "<|im_end|>\n<|im_start|>assistant\n"


def toy(tokenizer, items: dict[int, dict], extra: dict[str, str] | None = None):
    """Items with 4-token SIDs (<a_i><b_0><c_0><d_0>), one user who saw them all, and the formatter."""
    index = {i: [f"<a_{i}>", "<b_0>", "<c_0>", "<d_0>"] for i in items}
    tokens = sorted({t for s in index.values() for t in s}) + list(extra or {})
    new = add_tokens(tokenizer, tokens, [[(extra or {}).get(t, "x")] for t in tokens])
    ds = Dataset("toy", Path("."), {0: sorted(items)}, items, index)
    return ds, new, PromptFormatter(tokenizer)


def parts(tokenizer, row) -> tuple[str, str]:
    n = row.labels.count(-100)
    assert row.labels[n:] == row.input_ids[n:]  # the loss still covers exactly the response
    return tokenizer.decode(row.input_ids[:n]), tokenizer.decode(row.input_ids[n:])


def assert_whole(tokenizer, row, sid_ids: list[int], max_length: int) -> None:
    prompt, response = parts(tokenizer, row)
    assert len(row.input_ids) <= max_length
    assert [t for t in row.input_ids if t in sid_ids] == sid_ids  # every SID token, once, in order
    assert row.input_ids[-1] == tokenizer.eos_token_id and row.labels[-1] == tokenizer.eos_token_id
    assert prompt.startswith(HEADER) and prompt.endswith(GENERATION_PROMPT)


def sid_ids(tokenizer, ds, item) -> list[int]:
    return tokenizer.convert_tokens_to_ids(ds.index[item])


def test_sid2desc_with_a_long_description_keeps_sid_header_and_eos(tokenizer):
    assert 80 <= len(tokenizer(DESC)["input_ids"]) <= 100
    ds, new, fmt = toy(tokenizer, {0: {"title": "Keeper (1998)", "description": DESC}})
    (row,) = grounding_examples(ds, new, fmt, ["sid2desc"], 96)
    assert_whole(tokenizer, row, sid_ids(tokenizer, ds, 0), 96)
    _, response = parts(tokenizer, row)
    text = response.removesuffix(tokenizer.eos_token)
    assert len(text) > 100 and DESC.startswith(text) and text != DESC  # the description is what got shorter
    assert len(row.input_ids) >= 95  # and only as much as needed


def test_sid2both_shortens_description_first_then_title(tokenizer):
    ds, new, fmt = toy(tokenizer, {0: {"title": TITLE, "description": DESC}})
    full = len(
        fmt.encode(
            "What is item <a_0><b_0><c_0><d_0>? Give its title and description.", f"{TITLE}. {DESC}", 10_000
        ).input_ids
    )
    (row,) = grounding_examples(ds, new, fmt, ["sid2both"], full - 40)  # description loses ~40 of ~90 tokens
    assert_whole(tokenizer, row, sid_ids(tokenizer, ds, 0), full - 40)
    title, desc = parts(tokenizer, row)[1].removesuffix(tokenizer.eos_token).split(". ", 1)
    assert title == TITLE and DESC.startswith(desc) and 0 < len(desc) < len(DESC)

    (row,) = grounding_examples(ds, new, fmt, ["sid2both"], full - 100)  # description gone, title cut too
    assert_whole(tokenizer, row, sid_ids(tokenizer, ds, 0), full - 100)
    title = parts(tokenizer, row)[1].removesuffix(tokenizer.eos_token).removesuffix(". ")
    assert title and TITLE.startswith(title) and title != TITLE and "lighthouse" not in title


def test_response_longer_than_max_length_keeps_its_eos(tokenizer):
    ds, new, fmt = toy(tokenizer, {0: {"title": "Keeper (1998)", "description": DESC * 3}})
    (row,) = grounding_examples(ds, new, fmt, ["sid2desc"], 40)  # the response alone is ~270 tokens
    assert_whole(tokenizer, row, sid_ids(tokenizer, ds, 0), 40)


def test_prompt_side_free_text_is_shortened_not_the_header(tokenizer):
    ds, new, fmt = toy(tokenizer, {0: {"title": TITLE, "description": DESC}})
    (row,) = grounding_examples(ds, new, fmt, ["both2sid"], 48)
    assert_whole(tokenizer, row, sid_ids(tokenizer, ds, 0), 48)
    assert parts(tokenizer, row)[1] == "<a_0><b_0><c_0><d_0>" + tokenizer.eos_token


def test_a_row_that_cannot_fit_names_the_item_and_the_length_needed(tokenizer):
    ds, new, fmt = toy(tokenizer, {7: {"title": TITLE, "description": DESC}})
    need = len(fmt.encode("What is item <a_7><b_0><c_0><d_0>? Give its title and description.", ". ", 100).input_ids)
    with pytest.raises(ConfigError, match=f"item 7: the sid2both row needs {need} tokens .*at least {need}"):
        grounding_examples(ds, new, fmt, ["sid2both"], need - 1)
    assert len(grounding_examples(ds, new, fmt, ["sid2both"], need)[0].input_ids) == need


def test_the_count_of_shortened_rows_is_reported(tokenizer, capsys):
    items = {
        0: {"title": "Keeper (1998)", "description": DESC},
        1: {"title": "Toy Story (1995)", "description": "Comedy"},
    }
    ds, new, fmt = toy(tokenizer, items)
    rows = grounding_examples(ds, new, fmt, ["sid2desc", "title2sid"], 48)
    assert len(rows) == 4
    assert "[gti.ground] 1 of 4 grounding rows shortened to fit max_length=48" in capsys.readouterr().out


def test_token_rows_keep_the_token_and_shorten_its_description(tokenizer):
    ds, new, fmt = toy(tokenizer, {0: {"title": "Keeper (1998)", "description": "Drama"}}, extra={"<brand_x>": DESC})
    rows = grounding_examples(ds, new, fmt, [], 40)
    assert len(rows) == 2  # token2desc, desc2token
    token = tokenizer.convert_tokens_to_ids(["<brand_x>"])
    for row in rows:
        assert_whole(tokenizer, row, token, 40)


def rec_case(tokenizer, history_len: int = 6):
    items = {i: {"title": f"Movie {i}", "description": "Drama"} for i in range(history_len + 3)}
    ds, new, fmt = toy(tokenizer, items)
    splits = leave_one_out(ds.inter, max_history=history_len + 2)
    return ds, new, fmt, splits


def test_check_prompt_lengths_covers_every_configured_template(tokenizer):
    ds, new, fmt, splits = rec_case(tokenizer)
    ex = splits["test"][0]
    need = [len(fmt.encode(*rec_prompt(ds, ex, t), 10_000).input_ids) for t in (0, 1)]
    assert need[1] > need[0]  # template 1 is the longer phrasing
    cfg = FinetuneConfig(templates=[0, 1], max_length=need[0])
    with pytest.raises(ConfigError, match=f"needs {need[1]} tokens with rec template 1"):
        check_prompt_lengths(ds, splits["test"], fmt, cfg)
    check_prompt_lengths(ds, splits["test"], fmt, FinetuneConfig(templates=[0, 1], max_length=need[1]))


def test_rec_training_rows_raise_instead_of_cutting_the_history(tokenizer):
    ds, new, fmt, splits = rec_case(tokenizer)
    longest = max(splits["train"], key=lambda ex: len(ex.history))
    need = max(len(fmt.encode(*rec_prompt(ds, longest, t), 10_000).input_ids) for t in (0, 1, 2))
    with pytest.raises(ConfigError, match=f"user 0's history of {len(longest.history)} items needs {need} tokens"):
        train_rows(ds, splits["train"], fmt, FinetuneConfig(max_length=need - 1), new)
    rows = train_rows(ds, splits["train"], fmt, FinetuneConfig(max_length=need), new)
    assert max(len(r.input_ids) for r in rows) <= need


def test_multitask_rows_obey_the_same_rule(tokenizer, capsys):
    items = {i: {"title": TITLE, "description": DESC} for i in range(5)}
    ds, new, fmt = toy(tokenizer, items)
    splits = leave_one_out(ds.inter, max_history=3)
    cfg = FinetuneConfig(max_length=56, multitask=True)
    rows = train_rows(ds, splits["train"], fmt, cfg, new)
    grounding = rows[len(splits["train"]) :]
    assert len(grounding) == 5 * 6
    for k, row in enumerate(grounding):
        assert_whole(tokenizer, row, sid_ids(tokenizer, ds, k // 6), 56)
    out = capsys.readouterr().out
    assert "[gti.finetune] " in out and " of 30 grounding rows shortened to fit max_length=56" in out
