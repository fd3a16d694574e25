"""Exact ranking over the whole catalogue (gti.rank.exact) on a tiny random Llama and the real SmolLM2 tokenizer.

Token ids 100..400 stand in for SID tokens, as in test_trie.py.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gti.rank.beam_search import constrained_beam_search
from gti.rank.exact import exact_ranking
from gti.rank.trie import SidTrie

EOS = 2


@functools.cache
def sharp_llama(vocab_size: int, attention: str = "sdpa"):
    """Built once per attention kind (read-only in these tests). Float64, position-sensitive (rope theta 1, init std 0.2): a wrong mask, position or slot moves scores by
    nats, while float noise stays ~1e-7 (test_trie.py's position_sensitive_model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_theta=1.0, initializer_range=0.2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attention)
    # HF's eager attention turns left-padded rows into NaN in float64 (its padding rows softmax to NaN): float32
    return model if attention == "eager" else model.double()


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    width = max(lengths)
    ids = torch.tensor([[EOS] * (width - n) + [rng.randrange(3, 5000) for _ in range(n)] for n in lengths])
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    return ids, mask


def brute_force(model, ids: torch.Tensor, mask: torch.Tensor, seqs: list[list[int]]) -> list[list[float]]:
    """Per prompt, each item's log-prob of SID + EOS: one full forward of prompt + SID + EOS per item, no cache,
    no padding."""
    out = []
    for row, m in zip(ids, mask, strict=True):
        prompt = row[m.bool()][None]  # (1, P) the real tokens only
        scores = []
        for s in seqs:
            full = torch.cat([prompt, torch.tensor([s + [EOS]])], dim=1)
            with torch.no_grad():
                logp = torch.log_softmax(model(full).logits[0, :-1].double(), dim=-1)  # (T-1, V)
            target = full[0, 1:]
            scores.append(float(logp[torch.arange(target.numel()), target][prompt.shape[1] - 1 :].sum()))
        out.append(scores)
    return out


def random_sids(n: int, seed: int = 0, alphabet: int = 5, max_len: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 100 + alphabet) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_scores_equal_brute_force_for_every_item(tokenizer, attention):
    model = sharp_llama(len(tokenizer), attention)
    seqs = random_sids(24)  # shared prefixes, SIDs that are prefixes of others, collisions, lengths 1..4
    trie = SidTrie(seqs, eos_token_id=EOS)
    ids, mask = left_padded([3, 9, 6])  # different prompt lengths, left-padded in one batch
    distinct = sorted({tuple(s) for s in seqs})
    ranked = exact_ranking(model, ids, mask, trie, num_return=len(seqs), max_tokens=7)  # many chunks per level
    for per_prompt, truth in zip(ranked, brute_force(model, ids, mask, [list(s) for s in distinct]), strict=True):
        assert len(per_prompt) == len(distinct)  # every distinct SID of the catalogue, once
        got = {tuple(seq): s for seq, s in per_prompt}
        assert got == pytest.approx(dict(zip(distinct, truth, strict=True)), rel=0, abs=1e-4)
        scores = [s for _, s in per_prompt]
        assert scores == sorted(scores, reverse=True)


def test_batch_and_chunking_do_not_change_scores(tokenizer):
    model = sharp_llama(len(tokenizer))
    seqs = random_sids(60, seed=1)
    trie = SidTrie(seqs, eos_token_id=EOS)
    ids, mask = left_padded([2, 11, 5, 8], seed=1)
    batched = exact_ranking(model, ids, mask, trie, num_return=10, max_tokens=10_000)
    for b in range(ids.shape[0]):
        alone = exact_ranking(
            model, ids[b : b + 1, -int(mask[b].sum()) :], mask[b : b + 1, -int(mask[b].sum()) :], trie, 10, max_tokens=1
        )
        assert [seq for seq, _ in alone[0]] == [seq for seq, _ in batched[b]]
        assert [s for _, s in alone[0]] == pytest.approx([s for _, s in batched[b]], rel=0, abs=1e-5)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seqs=st.lists(st.lists(st.integers(100, 106), min_size=1, max_size=4), min_size=1, max_size=15),
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    num_return=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_top_k_equals_beam_search_that_covers_the_catalogue(tokenizer, seqs, lengths, num_return, seed):
    """With num_beams >= the number of items, beam search keeps every prefix: it is exhaustive, so exact and
    beam return the same SIDs in the same order with the same scores."""
    model = sharp_llama(len(tokenizer))
    trie = SidTrie(seqs, eos_token_id=EOS)
    ids, mask = left_padded(lengths, seed)
    beams = constrained_beam_search(model, None, ids, mask, trie, num_beams=len(seqs), num_return=num_return)
    exact = exact_ranking(model, ids, mask, trie, num_return=num_return, max_tokens=5)
    for a, b in zip(exact, beams, strict=True):
        assert len(a) == len(b) == min(num_return, len({tuple(s) for s in seqs}))
        assert [s for _, s in a] == pytest.approx([s for _, s in b], rel=0, abs=1e-5)
        gaps = [x[1] - y[1] for x, y in zip(a, a[1:])] + [1.0]
        for (seq_a, _), (seq_b, _), gap, prev in zip(a, b, gaps, [1.0, *gaps[:-1]], strict=True):
            if gap > 1e-6 and prev > 1e-6:  # exact ties may come back in either order
                assert seq_a == seq_b


def test_floor_prunes_and_keeps_the_top_exact(tokenizer):
    model = sharp_llama(len(tokenizer))
    seqs = random_sids(80, seed=2, alphabet=6)
    trie = SidTrie(seqs, eos_token_id=EOS)
    ids, mask = left_padded([4, 7], seed=2)
    full = exact_ranking(model, ids, mask, trie, num_return=len(seqs))
    k = 5
    floor = torch.tensor([per[k - 1][1] for per in full]) - 1e-3  # the k-th item's score, as a beam would find it
    calls = []
    hook = model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        pruned = exact_ranking(model, ids, mask, trie, num_return=k, floor=floor)
    finally:
        hook.remove()
    for p, f in zip(pruned, full, strict=True):
        assert [seq for seq, _ in p] == [seq for seq, _ in f[:k]]
        assert [s for _, s in p] == pytest.approx([s for _, s in f[:k]], rel=0, abs=1e-6)
    assert sum(calls[1:]) < trie.num_nodes - 1  # fewer nodes decoded than the full expansion's one per node
    # a floor above every item returns nothing rather than a wrong list
    assert exact_ranking(model, ids, mask, trie, num_return=k, floor=torch.zeros(2)) == [[], []]


def test_tiny_default_model_and_rejections(tokenizer, tiny_model):
    trie = SidTrie([[100, 101], [100, 102], [103]], eos_token_id=tokenizer.eos_token_id)
    tokenizer.padding_side = "left"
    enc = tokenizer(["I liked <these> items, next:", "hi"], return_tensors="pt", padding=True)
    ranked = exact_ranking(tiny_model, enc.input_ids, enc.attention_mask, trie, num_return=10)
    assert [sorted(seq for seq, _ in per) for per in ranked] == [[[100, 101], [100, 102], [103]]] * 2
    with pytest.raises(ValueError, match="left"):
        exact_ranking(tiny_model, enc.input_ids, enc.attention_mask.flip(1), trie, num_return=1)
    with pytest.raises(ValueError, match="num_return"):
        exact_ranking(tiny_model, enc.input_ids, enc.attention_mask, trie, num_return=0)
