"""Helpers for tests and benchmark scripts: a tiny random Llama, HF `generate` with a trie constraint as the reference
decoder, and the row-by-row tokenisation that the cached rows (gti.train.rows) are checked against."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from gti.core.config import FinetuneConfig
from gti.core.log import get_logger
from gti.data.dataset import Dataset, Example
from gti.rank.beam_reference import check_left_padded
from gti.rank.trie import DEAD_SCORE, SidTrie
from gti.tokens.vocab import NewTokens
from gti.train.grounding import grounding_specs, shortened_note
from gti.train.recommender import check_prompt_lengths, rec_prompt, supervise_history
from gti.train.templates import Encoded, PromptFormatter


class TrieLogitsProcessor(LogitsProcessor):
    """Sets every token that does not extend a valid SID prefix to -inf.

    Each call recomputes every row's trie node from its generated suffix (depth <= max SID length + 1,
    a few tensor ops per depth), so it is stateless and survives HF's beam reordering. Rows that already
    emitted EOS, or fell off the trie (placeholder beams when num_beams > valid continuations), may only
    emit EOS/pad, so they stay finished and are dropped later by their score.
    """

    def __init__(self, trie: SidTrie, prompt_len: int, pad_token_id: int | None = None):
        self.trie = trie
        self.prompt_len = prompt_len  # left padding: the same for every row
        self.pad_token_id = trie.eos_token_id if pad_token_id is None else int(pad_token_id)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.trie.device != scores.device:
            self.trie.to(scores.device)
        eos, pad = self.trie.eos_token_id, self.pad_token_id
        generated = input_ids[:, self.prompt_len :]  # (N, t)
        nodes = torch.zeros(generated.shape[0], dtype=torch.long, device=scores.device)
        done = torch.zeros(generated.shape[0], dtype=torch.bool, device=scores.device)
        for t in range(generated.shape[1]):
            tok = generated[:, t]
            stepped = self.trie.step(nodes, tok)
            nodes = torch.where(done, nodes, stepped)
            done = done | (tok == eos) | (tok == pad)
        finished = done | (nodes < 0)
        self.trie._check_vocab(scores.shape[1])
        rows, tokens = self.trie.allowed_pairs(torch.where(finished, -1, nodes))
        stop_rows = torch.nonzero(finished).flatten()
        rows = torch.cat([rows, stop_rows, stop_rows])
        tokens = torch.cat([tokens, torch.full_like(stop_rows, eos), torch.full_like(stop_rows, pad)])
        # Copy the few allowed scores into a -inf canvas: one write-only pass over (N, V), about 8x cheaper
        # than building a dense bool mask and masked_fill (the dense ops, not Python, dominate at V ~ 50k).
        out = torch.full_like(scores, float("-inf"))
        out[rows, tokens] = scores[rows, tokens]
        return out


def beam_generation_config(tokenizer, num_beams: int, num_return: int, max_new_tokens: int) -> GenerationConfig:
    """Plain beam search with every sampling knob neutral.

    transformers 5 fills `None` fields from the model's own generation_config, so sampling fields are set
    to their no-op values instead of None. length_penalty=0 and early_stopping="never" give textbook beam
    search (HF's own note): `sequences_scores` is the joint log-prob of SID + EOS, comparable across
    SID lengths, and short finished placeholders cannot stop the search early.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    # greedy (num_beams=1) warns about beam-only flags, so pass them to beam search only
    beam_only = dict(early_stopping="never", length_penalty=0.0) if num_beams > 1 else {}
    return GenerationConfig(
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=min(num_return, num_beams),
        max_new_tokens=max_new_tokens,
        **beam_only,
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        output_scores=True,
        output_logits=num_beams == 1,  # greedy returns no sequences_scores: rebuild them from raw logits
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )


def _greedy_scores(out, prompt_len: int, stop_ids: set[int]) -> torch.Tensor:
    """Sum of log-probs of each greedy sequence's tokens up to and including its first EOS. (B,)."""
    gen = out.sequences[:, prompt_len:]  # (B, t)
    logp = torch.stack([torch.log_softmax(x.float(), dim=-1) for x in out.logits], dim=1)  # (B, t, V)
    tok_logp = logp.gather(-1, gen[:, :, None]).squeeze(-1)  # (B, t)
    is_stop = torch.zeros_like(gen, dtype=torch.bool)
    for s in stop_ids:
        is_stop |= gen == s
    # keep tokens up to and including the first stop token
    before_stop = (torch.cumsum(is_stop.long(), 1) - is_stop.long()) == 0
    return (tok_logp * before_stop).sum(1)


def collect_beams(
    out, prompt_len: int, batch_size: int, trie: SidTrie, stop_ids: set[int]
) -> list[list[tuple[list[int], float]]]:
    """generate() output -> per input, (SID token ids, score) best first; placeholders and invalid dropped."""
    scores = getattr(out, "sequences_scores", None)  # absent for greedy (num_beams=1)
    if scores is None:
        scores = _greedy_scores(out, prompt_len, stop_ids)
    per_input = out.sequences.shape[0] // batch_size
    seqs = []
    for row in out.sequences[:, prompt_len:].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stop_ids), len(row))
        seqs.append(row[:cut])
    valid = trie.is_sid(seqs)
    result: list[list[tuple[list[int], float]]] = [[] for _ in range(batch_size)]
    for i, (seq, score, ok) in enumerate(zip(seqs, scores.tolist(), valid, strict=True)):
        if ok and score > DEAD_SCORE:  # also drops -inf and NaN
            result[i // per_input].append((seq, score))
    for beams in result:
        beams.sort(key=lambda b: -b[1])
    return result


@torch.no_grad()
def hf_constrained_beam_search(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: SidTrie,
    num_beams: int,
    num_return: int,
    max_new_tokens: int | None = None,
) -> list[list[tuple[list[int], float]]]:
    """`constrained_beam_search` through HF `generate` + TrieLogitsProcessor (the reference it is checked
    against). generate() copies every prompt num_beams times before the first forward, so the prompt is
    encoded num_beams times; that is the cost `constrained_beam_search` avoids."""
    check_left_padded(attention_mask)
    prompt_len = input_ids.shape[1]
    config = beam_generation_config(tokenizer, num_beams, num_return, max_new_tokens or trie.max_len + 1)
    processor = TrieLogitsProcessor(trie, prompt_len, pad_token_id=config.pad_token_id)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        logits_processor=LogitsProcessorList([processor]),
    )
    stop_ids = {config.eos_token_id, config.pad_token_id}
    return collect_beams(out, prompt_len, input_ids.shape[0], trie, stop_ids)


def make_tiny_llama(vocab_size: int, tied: bool = True, seed: int = 0, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(  # **config: overrides (e.g. initializer_range for sharper logits)
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **config,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def grounding_examples(
    ds: Dataset, new: NewTokens, fmt: PromptFormatter, templates: list[str], max_length: int, stage: str = "gti.ground"
) -> list[Encoded]:
    # rows too long lose free text (description, then title), never their SID or token (docs/traps.md)
    rows, shortened = fmt.encode_many(grounding_specs(ds, new, templates), max_length)
    get_logger(stage.removeprefix("gti.")).info(shortened_note(shortened, len(rows), max_length))  # [gti.ground] ...
    return rows


def train_rows(ds: Dataset, train: list[Example], fmt: PromptFormatter, cfg: FinetuneConfig, new: NewTokens) -> list:
    # the reference for gti.train.rows.rec_train_rows (what the stages use: the same rows composed and cached),
    # every row tokenised from its text. The paper's three phrasings, one per example in turn; rec rows have no free text to shorten, so
    # a history too long is an error named here, before encode() would raise on it
    if train:
        check_prompt_lengths(ds, train, fmt, cfg)
    rows = [fmt.encode(*rec_prompt(ds, ex, cfg.templates[ex.index % len(cfg.templates)]), cfg.max_length) for ex in train]
    if cfg.history_loss:
        rows = [supervise_history(r, len(ds.index[ex.history[0]]), new.start) for r, ex in zip(rows, train)]
    if cfg.multitask:  # LC-Rec multi-task baseline: also learn text <-> SID
        from gti.train.templates import GROUNDING_TEMPLATES

        rows += grounding_examples(ds, new, fmt, list(GROUNDING_TEMPLATES), cfg.max_length, stage="gti.finetune")
    return rows


def last_per_user(examples: list[Example], n: int, stride: int = 1) -> list[Example]:
    """Each user's last n examples, `stride` apart (splits list them user by user in time order)."""
    by_user: dict[int, list[Example]] = {}
    for ex in examples:
        by_user.setdefault(ex.user, []).append(ex)
    return [ex for exs in by_user.values() for ex in exs[::-stride][:n][::-1]]
