"""SidTrie, TrieLogitsProcessor and constrained beam search on a tiny random Llama.

Token ids 100..400 of the real SmolLM2 vocabulary stand in for SID tokens.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gti.rank.beam_reference import constrained_beam_search_reference
from gti.rank.beam_search import constrained_beam_search
from gti.rank.trie import SidTrie, beams_to_items
from gti.testing import TrieLogitsProcessor, hf_constrained_beam_search

EOS = 2


def dict_trie(seqs):
    """Reference: nested dicts, with None marking the end of a complete SID."""
    root: dict = {}
    for s in seqs:
        node = root
        for tok in s:
            node = node.setdefault(tok, {})
        node[None] = True
    return root


def prompts(tokenizer, texts=("I liked <these> items, next:", "hi")):
    tokenizer.padding_side = "left"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_hand_trie_csr_and_items():
    seqs = [[5, 6, 7], [5, 6], [5, 8], [9], [5, 6, 7]]  # item 4 collides with item 0
    trie = SidTrie(seqs, eos_token_id=EOS)
    # nodes by depth then prefix order: 0 root, 1 (5), 2 (9), 3 (5,6), 4 (5,8), 5 (5,6,7)
    assert trie.num_nodes == 6 and trie.num_items == 5 and trie.max_len == 3
    assert trie.child_ptr.tolist() == [0, 2, 4, 4, 5, 5, 5]
    assert trie.child_token.tolist() == [5, 9, 6, 8, 7]
    assert trie.child_node.tolist() == [1, 2, 3, 4, 5]
    assert trie.fanout == [2, 2, 1, 0]  # most children at depth 0 (root), 1 (5), 2 (5,6), 3 (leaves)
    assert trie.items_of([5, 6, 7]) == [0, 4]
    assert trie.items_of([5, 6]) == [1]
    assert trie.items_of([5]) == [] and trie.items_of([1, 2]) == [] and trie.items_of([]) == []
    assert trie.is_sid([[9], [5], [5, 8], [5, 8, 1]]) == [True, False, True, False]


def test_allowed_mask_hand_trie():
    trie = SidTrie([[5, 6, 7], [5, 6], [5, 8], [9]], eos_token_id=EOS)
    nodes = torch.tensor([0, 1, 3, 2, -1, 5])  # root, (5), (5,6) complete+children, (9) leaf, dead, leaf
    mask = trie.allowed_mask(nodes, vocab_size=12)
    allowed = [set(torch.nonzero(row).flatten().tolist()) for row in mask]
    assert allowed == [{5, 9}, {6, 8}, {7, EOS}, {EOS}, set(), {EOS}]
    with pytest.raises(ValueError):
        trie.allowed_mask(nodes, vocab_size=8)  # token 9 would not fit


def test_step_rejects_unknown_tokens():
    trie = SidTrie([[5, 6]], eos_token_id=EOS)
    nodes = torch.tensor([0, 0, 0, -1, 1])
    tokens = torch.tensor([5, 6, 10_000, 5, 6])
    assert trie.step(nodes, tokens).tolist() == [1, -1, -1, -1, 2]


def test_matches_dict_trie_on_random_sids():
    rng = random.Random(0)
    seqs = [[rng.randrange(100, 106) for _ in range(rng.randint(1, 4))] for _ in range(300)]
    trie = SidTrie(seqs, eos_token_id=EOS)
    ref = dict_trie(seqs)
    prefixes, expected = [], []

    def visit(node, prefix):
        prefixes.append(prefix)
        expected.append({EOS if k is None else k for k in node})
        for tok, child in node.items():
            if tok is not None:
                visit(child, prefix + [tok])

    visit(ref, [])
    assert len(prefixes) == trie.num_nodes
    mask = trie.allowed_mask(trie.walk(prefixes), vocab_size=110)
    assert [set(torch.nonzero(row).flatten().tolist()) for row in mask] == expected
    for i in rng.sample(range(len(seqs)), 20):
        assert i in trie.items_of(seqs[i])
        assert all(seqs[j] == seqs[i] for j in trie.items_of(seqs[i]))


def test_build_scales_to_many_items():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (50_000, 4), generator=g) + torch.arange(4) * 256  # (M, 4)
    seqs = codes.tolist()
    trie = SidTrie(seqs, eos_token_id=EOS)
    # memory is O(nodes): one edge per non-root node, no dense (nodes x vocab) table
    assert trie.keys.numel() == trie.num_nodes - 1 <= 4 * 50_000
    assert 123 in trie.items_of(seqs[123])


def test_processor_masks_each_row():
    trie = SidTrie([[100, 101], [100, 102], [103]], eos_token_id=EOS)
    proc = TrieLogitsProcessor(trie, prompt_len=2, pad_token_id=0)
    input_ids = torch.tensor(
        [
            [7, 8, 100, 101],  # complete SID -> only EOS
            [7, 8, 103, EOS],  # finished -> EOS/pad
            [7, 8, 104, 101],  # fell off the trie (a dead placeholder beam) -> EOS/pad
            [7, 8, 100, 102],  # complete
        ]
    )
    out = proc(input_ids, torch.zeros(4, 120))
    allowed = [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in out]
    assert allowed == [{EOS}, {EOS, 0}, {EOS, 0}, {EOS}]
    first = proc(input_ids[:, :3], torch.zeros(4, 120))
    assert set(torch.nonzero(first[0] > float("-inf")).flatten().tolist()) == {101, 102}
    assert set(torch.nonzero(first[3] > float("-inf")).flatten().tolist()) == {101, 102}
    assert set(torch.nonzero(first[2] > float("-inf")).flatten().tolist()) == {EOS, 0}


sid_lists = st.lists(
    st.lists(st.integers(100, 108), min_size=1, max_size=4),  # small alphabet -> shared prefixes, duplicates
    min_size=1,
    max_size=12,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seqs=sid_lists, num_beams=st.integers(1, 24), num_return=st.integers(1, 24))
def test_beam_search_emits_only_complete_sids(tokenizer, tiny_model, seqs, num_beams, num_return):
    trie = SidTrie(seqs, eos_token_id=tokenizer.eos_token_id)
    input_ids, attention_mask = prompts(tokenizer)
    beams = constrained_beam_search(tiny_model, tokenizer, input_ids, attention_mask, trie, num_beams, num_return)
    distinct = {tuple(s) for s in seqs}
    assert len(beams) == 2
    for per_input in beams:
        assert 1 <= len(per_input) <= min(num_beams, num_return)
        got = [tuple(seq) for seq, _ in per_input]
        assert set(got) <= distinct and len(set(got)) == len(got)
        scores = [score for _, score in per_input]
        assert all(-1e8 < s < 0 for s in scores) and scores == sorted(scores, reverse=True)
        if num_beams >= len(distinct) and num_return >= len(distinct):
            assert set(got) == distinct  # the beam holds every prefix: the search is exhaustive
    for ranked in beams_to_items(beams, trie):
        assert len(ranked) == len(set(ranked))
        assert all(0 <= i < len(seqs) for i in ranked)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seqs=sid_lists, num_beams=st.integers(1, 12), num_return=st.integers(1, 12))
def test_cached_search_finds_what_hf_generate_finds(tokenizer, tiny_model, seqs, num_beams, num_return):
    """Prefill-once search vs HF generate + TrieLogitsProcessor: same hypotheses, same scores, same order."""
    trie = SidTrie(seqs, eos_token_id=tokenizer.eos_token_id)
    ids, mask = prompts(tokenizer)
    ours = constrained_beam_search(tiny_model, tokenizer, ids, mask, trie, num_beams, num_return)
    ref = hf_constrained_beam_search(tiny_model, tokenizer, ids, mask, trie, num_beams, num_return)
    for a, b in zip(ours, ref, strict=True):
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-4)
        gaps = [x[1] - y[1] for x, y in zip(b, b[1:])] + [1.0]
        for (seq_a, _), (seq_b, _), gap, prev in zip(a, b, gaps, [1.0, *gaps[:-1]], strict=True):
            if gap > 1e-4 and prev > 1e-4:  # near-ties may swap under different float summation orders
                assert seq_a == seq_b


@pytest.fixture()
def position_sensitive_model(tokenizer):
    """A tiny Llama whose outputs depend strongly on positions, in float64.

    The default tiny model (init std 0.02, rope theta 1e4) is so flat that a decoder position off by one moves
    a joint log-prob by ~5e-4, inside float32 noise of a loose tolerance. Rope theta 1 rotates every frequency
    pair by ~1 rad per position and init std 0.2 makes attention sharp: the same bug then moves scores by
    whole nats, while the correct search matches a float64 full forward to ~3e-6 (float32 log_softmax).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_theta=1.0, initializer_range=0.2,
    )  # fmt: skip
    return LlamaForCausalLM(config).double().eval()


def test_scores_are_joint_log_probs_and_left_padding_is_harmless(tokenizer, position_sensitive_model):
    model = position_sensitive_model
    seqs = [[100, 101, 102], [100, 103], [104, 105, 106], [107]]
    trie = SidTrie(seqs, eos_token_id=tokenizer.eos_token_id)
    texts = ("I liked <these> items, next:", "hi")  # "hi" is left-padded in the batch
    ids, mask = prompts(tokenizer, texts)
    batched = constrained_beam_search(model, tokenizer, ids, mask, trie, num_beams=8, num_return=8)
    for text, per_input in zip(texts, batched, strict=True):
        prompt = tokenizer(text, return_tensors="pt").input_ids  # (1, P), no padding
        exact = []
        for s in seqs:  # joint log-prob of SID + EOS under the model: one float64 forward, no cache, no padding
            full = torch.cat([prompt, torch.tensor([s + [tokenizer.eos_token_id]])], dim=1)
            with torch.no_grad():
                logp = torch.log_softmax(model(full).logits[0, :-1], dim=-1)  # (T-1, V) float64
            target = full[0, 1:]
            exact.append(float(logp[torch.arange(target.numel()), target][prompt.shape[1] - 1 :].sum()))
        order = sorted(range(len(seqs)), key=lambda i: -exact[i])
        assert [seq for seq, _ in per_input] == [seqs[i] for i in order]
        assert [score for _, score in per_input] == pytest.approx([exact[i] for i in order], rel=0, abs=2e-5)
        # greedy (num_beams=1) goes through another path; its score must mean the same thing
        [[(seq, score)]] = constrained_beam_search(
            model, tokenizer, prompt, torch.ones_like(prompt), trie, num_beams=1, num_return=1
        )
        assert score == pytest.approx(exact[seqs.index(seq)], rel=0, abs=2e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seqs=sid_lists,  # shared prefixes, colliding SIDs, often fewer valid continuations than beams
    num_beams=st.sampled_from([1, 3, 8]),
    num_return=st.integers(1, 8),
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    attention=st.sampled_from(["sdpa", "eager"]),
    seed=st.integers(0, 2**16),
)
@example(  # items 0 and 2 collide; 3 distinct SIDs for 8 beams; 5 returns
    seqs=[[100, 101], [102], [100, 101], [100, 103, 104]],
    num_beams=8,
    num_return=5,
    lengths=[2, 7],
    attention="sdpa",
    seed=0,
)
def test_tree_search_matches_reference_decoder(
    position_sensitive_model, seqs, num_beams, num_return, lengths, attention, seed
):
    """The tree-attention decoder returns exactly the reference's hypotheses, in order, with its scores.

    float64 and position-sensitive, so a wrong mask or position moves scores by nats, and float noise
    cannot swap near-ties (log-probs are float32 in both; differences stay ~1e-7)."""
    model = position_sensitive_model
    model.set_attn_implementation(attention)
    rng = random.Random(seed)
    width = max(lengths)  # prompts of varying lengths, left-padded with EOS
    ids = torch.tensor([[EOS] * (width - n) + [rng.randrange(3, 5000) for _ in range(n)] for n in lengths])
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    trie = SidTrie(seqs, eos_token_id=EOS)
    ours = constrained_beam_search(model, None, ids, mask, trie, num_beams, num_return)
    ref = constrained_beam_search_reference(model, None, ids, mask, trie, num_beams, num_return)
    assert [[seq for seq, _ in per] for per in ours] == [[seq for seq, _ in per] for per in ref]
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(torch.tensor([s for _, s in a]), torch.tensor([s for _, s in b]), rtol=0, atol=1e-5)
    assert beams_to_items(ours, trie) == beams_to_items(ref, trie)


def test_duplicate_sids_give_deduplicated_items(tokenizer, tiny_model):
    seqs = [[100, 101], [100, 101], [102, 103], [100, 101]]  # items 0, 1, 3 share one SID
    trie = SidTrie(seqs, eos_token_id=tokenizer.eos_token_id)
    ids, mask = prompts(tokenizer)
    beams = constrained_beam_search(tiny_model, tokenizer, ids, mask, trie, num_beams=6, num_return=6)
    for per_input in beams:
        assert sorted(seq for seq, _ in per_input) == [[100, 101], [102, 103]]
    for ranked in beams_to_items(beams, trie):
        assert sorted(ranked) == [0, 1, 2, 3]
    # the same SID repeated in a beam list still yields each item once, in first-seen order
    assert beams_to_items([[([102, 103], -1.0), ([100, 101], -2.0), ([102, 103], -3.0)]], trie) == [[2, 0, 1, 3]]


def test_valid_results_when_unconstrained_top_beam_is_invalid(tokenizer, tiny_model):
    from transformers import GenerationConfig

    ids, mask = prompts(tokenizer)
    config = GenerationConfig(
        do_sample=False, num_beams=4, max_new_tokens=3, pad_token_id=EOS, eos_token_id=EOS, top_k=50
    )
    free = tiny_model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
    banned = set(free[:, 0].tolist())  # the model's own first choices never start a SID
    pool = [t for t in range(100, 400) if t not in banned]
    seqs = [pool[3 * i : 3 * i + 3] for i in range(20)]
    trie = SidTrie(seqs, eos_token_id=tokenizer.eos_token_id)
    assert not any(trie.is_sid([row[:k] for row in free.tolist() for k in (1, 2, 3)]))
    beams = constrained_beam_search(tiny_model, tokenizer, ids, mask, trie, num_beams=5, num_return=5)
    for per_input in beams:
        assert len(per_input) == 5
        assert all(seq in seqs for seq, _ in per_input)


def test_rejects_right_padding(tokenizer, tiny_model):
    tokenizer.padding_side = "right"
    enc = tokenizer(["a long prompt here", "hi"], return_tensors="pt", padding=True)
    trie = SidTrie([[100]], eos_token_id=tokenizer.eos_token_id)
    with pytest.raises(ValueError, match="left"):
        constrained_beam_search(tiny_model, tokenizer, enc.input_ids, enc.attention_mask, trie, 2, 2)
