"""The GTI guarantees: only new rows train, old rows bit-identical, merged folder reloads exactly."""

import pytest
import torch

from gti.tokens.overlay import install_overlay, merge_overlay, overlay_rows
from gti.tokens.vocab import add_tokens, is_tied, resize, set_rows

NEW = ["<a_0>", "<a_1>", "<b_0>", "<b_1>"]


def extend(model, tokenizer):
    new = add_tokens(tokenizer, NEW, [["x"]] * len(NEW))
    resize(model, tokenizer)
    d = model.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    set_rows(model, new, torch.randn(len(NEW), d, generator=g), None if is_tied(model) else torch.randn(len(NEW), d, generator=g))
    return new


def train_steps(model, params, tokenizer, new, steps=5, weight_decay=0.1):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    ids = torch.tensor([[tokenizer.eos_token_id, 100, new.start, new.start + 1, 200, new.start + 3]])
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("tied", [True, False])
def test_only_new_rows_change_with_weight_decay(tokenizer, tied):
    from gti.testing import make_tiny_llama

    model = make_tiny_llama(len(tokenizer), tied=tied)
    new = extend(model, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = install_overlay(model, new.start, len(new))
    assert len(params) == (1 if tied else 2)
    assert sum(p.numel() for p in params) == len(NEW) * 64 * (1 if tied else 2)
    assert [p for p in model.parameters() if p.requires_grad] == params
    train_steps(model, params, tokenizer, new)
    merge_overlay(model)
    after = model.state_dict()
    assert set(after) == set(before)
    s, e = new.start, new.start + len(new)
    for k in before:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(after[k][:s], before[k][:s]), f"{k}: old rows moved"
            assert not torch.equal(after[k][s:e], before[k][s:e]), f"{k}: new rows did not train"
        else:
            assert torch.equal(after[k], before[k]), f"{k} changed"
    assert is_tied(model) == tied


def test_overlay_forward_matches_plain_model(tokenizer, tiny_model):
    new = extend(tiny_model, tokenizer)
    ids = torch.tensor([[5, new.start, new.start + 2, 7]])
    ref = tiny_model(input_ids=ids).logits
    install_overlay(tiny_model, new.start, len(new))
    assert torch.allclose(tiny_model(input_ids=ids).logits, ref, atol=1e-6)
    rows_in, rows_out = overlay_rows(tiny_model)
    assert rows_out is None and rows_in.shape == (len(NEW), 64)


@pytest.mark.parametrize("tied", [True, False])
def test_saved_folder_reloads_new_rows_exactly(tmp_path, tokenizer, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gti.testing import make_tiny_llama

    model = make_tiny_llama(len(tokenizer), tied=tied)
    new = extend(model, tokenizer)
    params = install_overlay(model, new.start, len(new))
    train_steps(model, params, tokenizer, new, steps=2)
    trained_in, trained_out = overlay_rows(model)
    merge_overlay(model)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    re = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.convert_tokens_to_ids(NEW) == new.ids
    assert torch.equal(re.get_input_embeddings().weight[new.start :], trained_in)
    head = re.get_output_embeddings().weight[new.start :]
    assert torch.equal(head, trained_in if tied else trained_out)


def test_no_stray_space_tokens(tokenizer):
    new = add_tokens(tokenizer, NEW, [["x"]] * len(NEW))
    for text, sids in [("Item: <a_1><b_0>", ["<a_1>", "<b_0>"]), ("items <a_0><b_1>, <a_1><b_0>", ["<a_0>", "<b_1>", "<a_1>", "<b_0>"])]:
        toks = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert "Ġ" not in toks, toks  # the space before an SID is absorbed (lstrip), never a token of its own
        assert [t for t in toks if t in NEW] == sids
    ids = tokenizer("<a_1><b_0>", add_special_tokens=False)["input_ids"]
    assert ids == [new.start + 1, new.start + 2]


def test_existing_tokens_are_rejected(tokenizer):
    from gti.core.errors import DataError

    with pytest.raises(DataError, match="already exist"):
        add_tokens(tokenizer, ["hello", "<a_0>"], [["x"], ["y"]])


def test_resize_never_shrinks_spare_rows(tokenizer):
    from gti.testing import make_tiny_llama

    model = make_tiny_llama(len(tokenizer) + 64)  # Qwen-style spare rows
    add_tokens(tokenizer, NEW, [["x"]] * len(NEW))
    resize(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) - len(NEW) + 64


@pytest.mark.parametrize("tied", [True, False])
def test_every_new_id_reads_the_overlay_table_after_it_changes(tokenizer, tied):
    """First and last new id included: an off-by-one in the overlay's id range would read a stale frozen row,
    which is invisible before training (the table starts as a copy of those rows)."""
    import torch.nn.functional as F

    from gti.testing import make_tiny_llama

    model = make_tiny_llama(len(tokenizer), tied=tied)
    new = extend(model, tokenizer)
    s, e = new.start, new.start + len(new)
    params = install_overlay(model, s, len(new))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct values, far from the frozen rows the table was copied from
        for p in params:
            p.copy_(10 + torch.randn(p.shape, generator=g))
    table_in, table_out = params[0].detach(), params[-1].detach()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()

    ids = torch.arange(s - 1, e)  # the last old id, then every new id
    with torch.no_grad():
        got = emb(ids[None])[0]  # (1 + n, d)
    assert torch.equal(got[0], emb.base.weight[s - 1])  # an old id still reads its frozen row
    for i in range(len(new)):
        assert torch.equal(got[1 + i], table_in[i]), f"new id {s + i} (#{i}) does not read its table row"

    h = torch.randn(2, 3, 64, generator=g)  # (B, T, d)
    with torch.no_grad():
        logits = head(h)  # (B, T, V)
    assert logits.shape[-1] == head.base.weight.shape[0]
    assert torch.allclose(logits[..., s:e], F.linear(h, table_out), atol=1e-5)  # every new column from the table
    assert torch.equal(logits[..., :s], head.base(h)[..., :s])

    # end to end: the overlay model equals the plain model with the table written into its matrices
    seq = torch.tensor([[tokenizer.eos_token_id, 100, *range(s, e), 200]])
    with torch.no_grad():
        overlaid = model(input_ids=seq).logits
        merge_overlay(model)
        plain = model(input_ids=seq).logits
    assert torch.allclose(overlaid, plain, atol=1e-5)
