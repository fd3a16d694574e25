"""Textbook trie-constrained beam search: the prompt cache copied to each beam. The fallback for models without tree attention, and the reference the fast decoder is tested against."""

from __future__ import annotations

import torch

from gti.rank.trie import DEAD_SCORE, SidTrie


def check_left_padded(attention_mask: torch.Tensor) -> None:
    if bool((attention_mask[:, -1] == 0).any()):  # a right-padded row would decode after its padding
        raise ValueError("constrained_beam_search needs left-padded prompts (tokenizer.padding_side='left')")


@torch.no_grad()
def constrained_beam_search_reference(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: SidTrie,
    num_beams: int,
    num_return: int,
    max_new_tokens: int | None = None,
) -> list[list[tuple[list[int], float]]]:
    """The first prefill-once decoder, kept as the reference `constrained_beam_search` is checked against, and
    for attention kernels that take no custom mask. Same contract as `constrained_beam_search`.

    Textbook beam search, the same hypotheses as HF's with length_penalty=0 (`hf_constrained_beam_search`),
    but each prompt is encoded once and its KV cache copied to its beams afterwards, where generate()
    encodes it num_beams times. Each step keeps the 2K best trie-valid candidates per prompt: those ending
    in EOS within the top K become finished hypotheses, the best K others stay alive. Log-probs only fall,
    so the search stops as soon as no alive beam can beat a prompt's num_return-th finished hypothesis.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    check_left_padded(attention_mask)
    device = input_ids.device
    if trie.device != device:
        trie.to(device)
    batch, k = input_ids.shape[0], num_beams
    num_return = min(num_return, num_beams)
    eos = trie.eos_token_id
    steps = max_new_tokens or trie.max_len + 1

    cache, logp, last_pos = prefill(model, input_ids, attention_mask)
    cache.batch_repeat_interleave(k)  # (B*P) -> (B*K*P): each prompt's cache copied to its beams
    logp = logp.repeat_interleave(k, 0)  # (B*K, V)
    vocab = logp.shape[1]
    trie._check_vocab(vocab)
    mask = attention_mask.repeat_interleave(k, 0)
    next_pos = last_pos.repeat_interleave(k, 0) + 1
    # one live beam per prompt at the start; the other K-1 are copies that must not be expanded
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    scores = scores.flatten()
    nodes = torch.zeros(batch * k, dtype=torch.long, device=device)
    prefixes = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(batch)]
    offsets = (torch.arange(batch, device=device) * k)[:, None]

    for step in range(steps):
        rows, tokens = trie.allowed_pairs(torch.where(torch.isfinite(scores), nodes, -1))
        canvas = torch.full((batch * k, vocab), float("-inf"), device=device)
        canvas[rows, tokens] = scores[rows] + logp[rows, tokens]
        width = min(2 * k, k * vocab)
        top, idx = canvas.view(batch, k * vocab).topk(width, dim=1)  # (B, 2K), best first
        beam, token = idx // vocab, idx % vocab
        ends, order, alive = split_candidates(token, top, k, eos)
        for b, j in torch.nonzero(ends).tolist():
            seq = prefixes[offsets[b, 0] + beam[b, j]].tolist()
            finished[b].append((seq, float(top[b, j])))
        beam, token, top = beam.gather(1, order), token.gather(1, order), top.gather(1, order)
        top = torch.where(alive, top, float("-inf"))
        origin = (offsets + beam).flatten()
        scores, token = top.flatten(), token.flatten()
        prefixes = torch.cat([prefixes[origin], token[:, None]], dim=1)
        nodes = trie.step(nodes[origin], token)
        if step == steps - 1 or _search_done(finished, scores.view(batch, k), num_return):
            break
        cache.reorder_cache(origin)
        mask = torch.cat([mask[origin], mask.new_ones(batch * k, 1)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None] + step,
            cache=cache,  # updated in place
            use_cache=True,
        )
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    result = []
    for hyps in finished:
        hyps = [h for h in hyps if h[1] > DEAD_SCORE]
        hyps.sort(key=lambda h: -h[1])
        result.append(hyps[:num_return])
    return result


def _search_done(finished: list[list[tuple[list[int], float]]], alive: torch.Tensor, num_return: int) -> bool:
    """True when no prompt's best alive beam can still enter its top num_return finished hypotheses."""
    best_alive = alive.max(dim=1).values.tolist()
    for hyps, best in zip(finished, best_alive, strict=True):
        if best == float("-inf"):
            continue
        if len(hyps) < num_return or best > sorted((h[1] for h in hyps), reverse=True)[num_return - 1]:
            return False
    return True


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Encode each prompt once: its KV cache, (B, V) log-probs of the next token, (B,) position of its last token."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens from 0
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.cache, torch.log_softmax(out.logits[:, -1].float(), dim=-1), position_ids[:, -1]


def split_candidates(token: torch.Tensor, top: torch.Tensor, k: int, eos: int):
    """(B, W) candidates, best first -> ends (B, W): the finite EOS within the top K, which finish a hypothesis
    (HF's rule: an EOS ranked below K does not); order, alive (B, K): the columns of the best K candidates that do
    not end in EOS and whether each is a real one (there are >= K columns: each beam has one EOS at most)."""
    ends = (token == eos) & torch.isfinite(top)
    ends[:, k:] = False
    keep = token != eos
    keep &= keep.long().cumsum(1) <= k
    order = torch.argsort((~keep).long(), dim=1, stable=True)[:, :k]  # kept columns first, in rank order
    return ends, order, keep.gather(1, order)
