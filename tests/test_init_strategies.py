"""Every strategy on a tiny example with hand-computed rows."""

import pytest
import torch

from gti.errors import ConfigError
from gti.init_strategies import STRATEGIES, InitContext, initialize_rows

# 6 old rows in 2-d, easy numbers: mean = (2.5, 1.0)
OLD = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 2.0], [3.0, 1.0], [4.0, 0.0], [5.0, 3.0]])
WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


class WordTokenizer:
    """Splits on spaces and maps known words to fixed ids; `<x_1>` -> pieces 'x' and 'one'."""

    def __call__(self, text, add_special_tokens=False):
        text = text.replace("<x_1>", "four one")
        return {"input_ids": [WORDS[w] for w in text.split() if w in WORDS]}

    def decode(self, ids):
        inv = {v: k for k, v in WORDS.items()}
        return " ".join(inv[i] for i in ids)


def ctx(**kw):
    base = dict(
        old_input=OLD, old_output=None, tokenizer=WordTokenizer(), model=None,
        new_tokens=["<x_1>", "<y_2>"], descriptions=[["one two", "three"], ["five"]],
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    base.update(kw)
    return InitContext(**base)


def rows(name, **kw):
    r, out = initialize_rows(name, ctx(**kw))
    return r, out


def test_zero_mean_last_token():
    assert torch.equal(rows("zero")[0], torch.zeros(2, 2))
    assert torch.equal(rows("mean")[0], torch.tensor([[2.5, 1.0], [2.5, 1.0]]))
    assert torch.equal(rows("last_token")[0], torch.tensor([[5.0, 3.0], [5.0, 3.0]]))


def test_random_uses_old_std_and_seed():
    a, b = rows("random")[0], rows("random")[0]
    assert torch.equal(a, b)  # same generator seed -> same rows
    big = initialize_rows("random", ctx(new_tokens=[f"t{i}" for i in range(4000)], descriptions=[[]] * 4000))[0]
    assert abs(float(big.std()) - float(OLD.std())) < 0.05 and abs(float(big.mean())) < 0.05


def test_mean_cov_is_close_to_the_mean():
    r = rows("mean_cov")[0]
    assert torch.allclose(r, torch.tensor([[2.5, 1.0]] * 2), atol=0.05)
    assert not torch.equal(r[0], r[1])


def test_subword_means_the_surface_pieces():
    # "<x_1>" -> pieces four, one -> mean of rows 4 and 1 = (2.5, 0); "<y_2>" has no known piece -> mean
    with pytest.warns(UserWarning, match="no usable text"):
        r = rows("subword")[0]
    assert torch.equal(r, torch.tensor([[2.5, 0.0], [2.5, 1.0]]))


def test_description_average():
    # token 0: mean( mean(rows 1, 2), row 3 ) = mean((1.5, 1.0), (3, 1)) = (2.25, 1.0); token 1: row 5
    assert torch.equal(rows("description")[0], torch.tensor([[2.25, 1.0], [5.0, 3.0]]))


def test_untied_output_rows_use_the_head():
    head = OLD * 10
    r_in, r_out = rows("description", old_output=head)
    assert torch.equal(r_out, r_in * 10)


def test_topk_input_space_similarity_weighted():
    # description of token 1 = row 5 = (5, 3); with k=1 the nearest row by cosine is row 5 itself
    r = rows("topk", options={"k": 1})[0]
    assert torch.allclose(r[1], torch.tensor([5.0, 3.0]))
    # k=2, temperature -> very large: the weights become uniform over the 2 nearest rows
    q = torch.tensor([5.0, 3.0])
    sims = torch.nn.functional.normalize(OLD[1:], dim=-1) @ torch.nn.functional.normalize(q, dim=0)
    top2 = (sims.topk(2).indices + 1).tolist()  # row 0 is the zero vector: skip it
    r2 = rows("topk", options={"k": 2, "temperature": 1e9})[0]
    assert torch.allclose(r2[1], OLD[top2].mean(0), atol=1e-5)


def test_dictionary_and_missing_entries():
    r = rows("dictionary", dictionary={"<x_1>": ["two", "four"], "<y_2>": ["zero"]})[0]
    assert torch.equal(r, torch.tensor([[3.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ConfigError, match="<y_2>"):
        rows("dictionary", dictionary={"<x_1>": ["two"]})


def test_hidden_matches_manual_forward(tokenizer, tiny_model):
    old = tiny_model.get_input_embeddings().weight.detach()
    c = InitContext(old_input=old, old_output=None, tokenizer=tokenizer, model=tiny_model, new_tokens=["<n>"],
                    descriptions=[["a funny movie", "a sad film"]], options={"layer": 1})  # fmt: skip
    got = initialize_rows("hidden", c)[0]
    vecs = []
    for text in ["a funny movie", "a sad film"]:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            vecs.append(tiny_model(input_ids=ids, output_hidden_states=True).hidden_states[1][0].mean(0))
    assert torch.allclose(got[0], torch.stack(vecs).mean(0), atol=1e-5)


def test_unknown_strategy():
    with pytest.raises(ConfigError, match="unknown strategy"):
        rows("nope")
    assert {"zero", "random", "mean", "mean_cov", "subword", "description", "last_token", "topk", "hidden", "dictionary"} <= set(STRATEGIES)
