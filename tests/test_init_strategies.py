"""Every init strategy on a tiny example with hand-computed rows (docs/method.md)."""

import math

import pytest
import torch

from gti.core.errors import ConfigError
from gti.tokens.init_strategies import STRATEGIES, InitContext, initialize_rows

# 6 old rows in 2-d, easy numbers: mean = (15/6, 6/6) = (2.5, 1.0)
OLD = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 2.0], [3.0, 1.0], [4.0, 0.0], [5.0, 3.0]])
WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


class WordTokenizer:
    """Splits on spaces and maps known words to fixed ids (unknown words vanish); `<x_1>` -> 'four one'."""

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False  # strategies must not add BOS/EOS pieces
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
    return initialize_rows(name, ctx(**kw))


def test_zero_mean_last_token():
    r, out = rows("zero")
    assert torch.equal(r, torch.zeros(2, 2)) and out is None  # tied: no output rows
    assert torch.equal(rows("mean")[0], torch.tensor([[2.5, 1.0], [2.5, 1.0]]))
    assert torch.equal(rows("last_token")[0], torch.tensor([[5.0, 3.0], [5.0, 3.0]]))
    half = rows("mean", old_input=OLD.bfloat16())[0]
    assert half.dtype == torch.bfloat16 and torch.equal(half.float(), torch.tensor([[2.5, 1.0]] * 2))


def test_random_uses_the_global_old_std_and_the_generator():
    # 12 entries 0,0,1,0,2,2,3,1,4,0,5,3: sum 21, sum of squares 69 -> unbiased var = (69 - 12 * 1.75^2) / 11
    std = math.sqrt((69 - 12 * 1.75**2) / 11)
    expected = torch.randn(2, 2, generator=torch.Generator().manual_seed(0)) * std
    assert torch.allclose(rows("random")[0], expected)
    n = 20000
    big = initialize_rows("random", ctx(new_tokens=[f"t{i}" for i in range(n)], descriptions=[[]] * n))[0]
    assert abs(float(big.std()) - std) < 0.03 and abs(float(big.mean())) < 0.03


def test_mean_cov_samples_the_scaled_old_covariance():
    # centred x: -2.5 -1.5 -.5 .5 1.5 2.5; centred y: -1 -1 1 0 -1 2 -> population cov = [[17.5, 7], [7, 8]] / 6
    cov = torch.tensor([[17.5, 7.0], [7.0, 8.0]]) / 6
    n = 40000
    many = ctx(new_tokens=[f"t{i}" for i in range(n)], descriptions=[[]] * n, options={"cov_scale": 1.0})
    r = initialize_rows("mean_cov", many)[0].double()
    assert torch.allclose(r.mean(0), torch.tensor([2.5, 1.0], dtype=torch.float64), atol=0.03)
    assert torch.allclose(torch.cov(r.T), cov.double(), atol=0.06)
    # default scale 1e-5: within a few 1e-3 of the mean, but every token distinct; same seed -> same rows
    a, b = rows("mean_cov")[0], rows("mean_cov")[0]
    assert torch.allclose(a, torch.tensor([[2.5, 1.0]] * 2), atol=0.02) and not torch.equal(a[0], a[1])
    assert torch.equal(a, b)


def test_mean_cov_with_a_singular_covariance_stays_on_the_old_rows_subspace():
    line = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])  # cov has rank 1: Cholesky fails, eigh path
    r = initialize_rows("mean_cov", ctx(old_input=line, options={"cov_scale": 1.0}))[0]
    assert torch.allclose(r[:, 0], r[:, 1], atol=1e-5) and not torch.equal(r[0], r[1])


def test_subword_means_the_surface_pieces():
    # "<x_1>" -> pieces four, one -> mean of rows 4 and 1 = (2.5, 0); "<y_2>" has no known piece -> mean
    with pytest.warns(UserWarning, match="no usable text"):
        r = rows("subword")[0]
    assert torch.equal(r, torch.tensor([[2.5, 0.0], [2.5, 1.0]]))


def test_description_average():
    # token 0: mean( mean(rows 1, 2), row 3 ) = mean((1.5, 1.0), (3, 1)) = (2.25, 1.0); token 1: row 5
    assert torch.equal(rows("description")[0], torch.tensor([[2.25, 1.0], [5.0, 3.0]]))


def test_empty_description_falls_back_to_the_mean_with_one_warning():
    import warnings

    descs = [["one two", ""], ["   ", "no known words"]]  # token 0: blank text skipped; token 1: nothing usable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r_in, r_out = rows("description", descriptions=descs, old_output=OLD * 10)
    assert [str(w.message) for w in caught if "no usable text" in str(w.message)] == [
        "init=description: 1 of 2 tokens have no usable text (e.g. ['<y_2>']); they start at the mean of the old rows"
    ]  # one warning, although the untied head ran the strategy twice
    assert torch.equal(r_in, torch.tensor([[1.5, 1.0], [2.5, 1.0]]))
    assert torch.equal(r_out, r_in * 10)  # the head's fallback is the head's own mean


@pytest.mark.parametrize("name", ["description", "topk", "hidden"])
def test_missing_descriptions_name_the_token(name):
    with pytest.raises(ConfigError, match=r"'<y_2>' has none"):
        rows(name, descriptions=[["one"]])


@pytest.mark.filterwarnings("ignore:init=subword")  # "<y_2>" has no known piece: mean fallback
@pytest.mark.parametrize("name", ["mean", "subword", "description", "last_token", "topk", "dictionary", "zero"])
def test_untied_output_rows_use_the_head(name):
    # head = OLD with its columns swapped: every rule here is an average of rows (topk: cosines are
    # invariant under the swap), so the head's new rows are the input rows with columns swapped
    head = OLD.flip(-1)
    kw = {"dictionary": {"<x_1>": ["two", "four"], "<y_2>": ["zero"]}}
    r_in, r_out = rows(name, old_output=head, **kw)
    assert torch.allclose(r_out, r_in.flip(-1))


def test_topk_input_space_similarity_weighted():
    # token 1's description = row 5 = (5, 3). Cosines with it: row 5 -> 1, row 3 (3, 1) -> 18 / sqrt(10 * 34),
    # row 2 (2, 2) -> 16 / sqrt(8 * 34) (smaller), rows 1, 4 -> 5 / sqrt(34), row 0 (zero) -> 0.
    # k=2 keeps rows 5 and 3, weights softmax((1, c3) / 0.1).
    c3 = 18 / math.sqrt(340)
    w5 = 1 / (1 + math.exp((c3 - 1) / 0.1))
    r = rows("topk", options={"k": 2})[0]
    assert torch.allclose(r[1], w5 * OLD[5] + (1 - w5) * OLD[3])
    # token 0's description (2.25, 1) is closest in angle to row 3 (3, 1): with k=1 it is that row
    assert torch.allclose(rows("topk", options={"k": 1})[0][0], OLD[3])
    # temperature -> inf: the plain mean of the top 2, (5, 3) and (3, 1) -> (4, 2)
    assert torch.allclose(rows("topk", options={"k": 2, "temperature": 1e9})[0][1], torch.tensor([4.0, 2.0]))
    with pytest.raises(ConfigError, match="space"):
        rows("topk", options={"space": "output"})


def test_dictionary_and_missing_entries():
    r = rows("dictionary", dictionary={"<x_1>": ["two", "four"], "<y_2>": "five"})[0]
    assert torch.equal(r, torch.tensor([[3.0, 1.0], [5.0, 3.0]]))  # mean(rows 2, 4); row 5
    with pytest.raises(ConfigError, match="<y_2>"):
        rows("dictionary", dictionary={"<x_1>": ["two"]})


def _manual_hidden(model, tokenizer, text, layer):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0].mean(0)  # (d,)


def _hidden_ctx(model, tokenizer, descriptions, **options):
    return InitContext(
        old_input=model.get_input_embeddings().weight.detach(),
        old_output=None if model.config.tie_word_embeddings else model.get_output_embeddings().weight.detach(),
        tokenizer=tokenizer, model=model, new_tokens=[f"<n_{i}>" for i in range(len(descriptions))],
        descriptions=descriptions, options=options,
    )  # fmt: skip


def test_hidden_matches_manual_forward(tokenizer, tiny_model):
    # texts of different lengths share a padded batch: the padding must not leak into the pooling
    texts = ["a funny movie about two cats", "a sad film", "jazz"]
    got = initialize_rows("hidden", _hidden_ctx(tiny_model, tokenizer, [texts], layer=1))[0]
    expected = torch.stack([_manual_hidden(tiny_model, tokenizer, t, 1) for t in texts]).mean(0)
    assert torch.allclose(got[0], expected, atol=1e-5)
    # max_texts=2 of 3 texts: evenly spaced -> the first and the last
    got2 = initialize_rows("hidden", _hidden_ctx(tiny_model, tokenizer, [texts], layer=2, max_texts=2))[0]
    expected2 = (_manual_hidden(tiny_model, tokenizer, texts[0], 2) + _manual_hidden(tiny_model, tokenizer, texts[2], 2)) / 2
    assert torch.allclose(got2[0], expected2, atol=1e-5)


def test_hidden_untied_uses_the_same_vectors_and_errors(tokenizer, tiny_untied_model):
    c = _hidden_ctx(tiny_untied_model, tokenizer, [["a sad film"]])
    r_in, r_out = initialize_rows("hidden", c)
    assert r_out is not None and torch.equal(r_in, r_out)
    assert torch.allclose(r_in[0], _manual_hidden(tiny_untied_model, tokenizer, "a sad film", 2), atol=1e-5)
    scaled = initialize_rows("hidden", _hidden_ctx(tiny_untied_model, tokenizer, [["a sad film"]], match_norm=True))[0]
    target = tiny_untied_model.get_input_embeddings().weight.detach().norm(dim=-1).mean()
    assert torch.allclose(scaled[0], r_in[0] / r_in[0].norm() * target, atol=1e-5)
    with pytest.raises(ConfigError, match="layer=7"):
        initialize_rows("hidden", _hidden_ctx(tiny_untied_model, tokenizer, [["x"]], layer=7))
    with pytest.raises(ConfigError, match="needs the model"):
        rows("hidden")


def test_topk_hidden_space_picks_the_vocab_token_nearest_in_hidden_space(tokenizer, tiny_model):
    c = _hidden_ctx(tiny_model, tokenizer, [["a sad film"]], layer=1, space="hidden", k=1)
    got = initialize_rows("topk", c)[0]
    query = _manual_hidden(tiny_model, tokenizer, "a sad film", 1)
    old = tiny_model.get_input_embeddings().weight.detach()
    with torch.no_grad():  # each vocabulary token alone, through the decoder body (no logits)
        keys = torch.cat([tiny_model.model(input_ids=torch.arange(s, min(s + 4096, len(old))).unsqueeze(1),
                                           output_hidden_states=True).hidden_states[1][:, 0]
                          for s in range(0, len(old), 4096)])  # fmt: skip
    best = int(torch.nn.functional.cosine_similarity(keys, query.unsqueeze(0), dim=-1).argmax())
    assert torch.allclose(got[0], old[best])


def test_unknown_strategy():
    with pytest.raises(ConfigError, match="unknown strategy"):
        rows("nope")
    assert set(STRATEGIES) == {"zero", "random", "mean", "mean_cov", "subword", "description", "last_token", "topk", "hidden", "dictionary"}


def test_early_exit_hidden_states_match_the_full_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    from gti.tokens.hidden_init import hidden_at

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    body = LlamaForCausalLM(cfg).eval().model
    ids = torch.tensor([[3, 7, 9, 0], [5, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with torch.no_grad():
        full = body(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in range(5):
            assert torch.allclose(hidden_at(body, layer, ids, mask), full[layer], atol=1e-6), layer
