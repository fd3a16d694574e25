import pytest

from gti.core.errors import ConfigError
from gti.tokens.vocab import add_tokens
from gti.train.rows import collate
from gti.train.templates import GROUNDING_TEMPLATES, REC_TEMPLATES, PromptFormatter, render

FIELDS = {"title": "Toy Story (1995)", "description": "Animation, Comedy", "sid": "<a_1><b_0>", "history": "<a_0><b_1>"}


@pytest.mark.parametrize("name", list(GROUNDING_TEMPLATES))
def test_each_grounding_template_renders_and_masks_the_prompt(tokenizer, name):
    add_tokens(tokenizer, ["<a_0>", "<a_1>", "<b_0>", "<b_1>"], [["x"]] * 4)
    fmt = PromptFormatter(tokenizer)
    prompt, response = render(GROUNDING_TEMPLATES[name], **FIELDS)
    assert "{" not in prompt + response
    enc = fmt.encode(prompt, response, max_length=128)
    n_prompt = sum(1 for x in enc.labels if x == -100)
    assert enc.labels[:n_prompt] == [-100] * n_prompt  # loss mask covers only the response
    supervised = [t for t in enc.labels if t != -100]
    assert supervised == enc.input_ids[n_prompt:]
    assert tokenizer.decode(supervised) == response + tokenizer.eos_token
    assert tokenizer.decode(enc.input_ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    # the space before an SID is absorbed by the lstrip AddedToken, so decoding drops it
    assert prompt.replace(" <", "<") in tokenizer.decode(enc.input_ids[:n_prompt])


@pytest.mark.parametrize("template", REC_TEMPLATES)
def test_rec_templates_render(template):
    prompt, response = render(template, **FIELDS)
    assert FIELDS["history"] in prompt and response == FIELDS["sid"]


def test_plain_format_without_chat_template(tokenizer):
    fmt = PromptFormatter(tokenizer, use_chat_template=False)
    enc = fmt.encode("Q?", "A", 32)
    assert tokenizer.decode(enc.input_ids).startswith("Q?\nAnswer:")


def test_encode_never_cuts_a_row_too_long(tokenizer):
    # cutting the prompt's head drops SIDs and the chat frame (docs/traps.md): encode raises instead,
    # naming the length needed; rows with free text are fitted by encode_fields (tests/test_truncation.py)
    fmt = PromptFormatter(tokenizer)
    need = len(fmt.encode("word " * 200, "the answer", 10_000).input_ids)
    with pytest.raises(ConfigError, match=f"max_length=24 is too short: a row needs {need} tokens"):
        fmt.encode("word " * 200, "the answer", 24)
    assert len(fmt.encode("word " * 200, "the answer", need).input_ids) == need


def test_collate_left_and_right(tokenizer):
    fmt = PromptFormatter(tokenizer)
    rows = [vars(fmt.encode("a", "b", 64)), vars(fmt.encode("a longer prompt here", "b", 64))]
    right = collate(rows, 0)
    left = collate(rows, 0, left=True)
    assert right["attention_mask"][0, 0] == 1 and left["attention_mask"][0, -1] == 1
    assert left["attention_mask"][0, 0] == 0 and (right["labels"][0, right["attention_mask"][0] == 0] == -100).all()


def test_history_loss_supervises_each_history_item_after_the_first(tokenizer):
    from gti.train.recommender import supervise_history

    new = add_tokens(tokenizer, ["<a_0>", "<a_1>", "<b_0>", "<b_1>"], [["x"]] * 4)
    fmt = PromptFormatter(tokenizer)
    prompt, response = render(REC_TEMPLATES[0], history="<a_0><b_1>,<a_1><b_0>,<a_0><b_0>", sid="<a_1><b_1>")
    plain = fmt.encode(prompt, response, max_length=128)
    enc = supervise_history(plain, 2, new.start)
    assert enc.input_ids == plain.input_ids
    history_targets = tokenizer.convert_tokens_to_ids(["<a_1>", "<b_0>", "<a_0>", "<b_0>"])
    assert [t for t in enc.labels if t != -100] == history_targets + [t for t in plain.labels if t != -100]
    assert all(lab in (-100, tok) for lab, tok in zip(enc.labels, enc.input_ids))  # labels stay on their own token

