"""Trie-constrained beam search over a shared prompt cache, every beam of every prompt in one forward a step."""

from __future__ import annotations

import torch

from gti.rank.beam_reference import check_left_padded, constrained_beam_search_reference, prefill, split_candidates
from gti.rank.masks import as_attention_mask, takes_tree_mask
from gti.rank.trie import DEAD_SCORE, SidTrie


@torch.no_grad()
def constrained_beam_search(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: SidTrie,
    num_beams: int,
    num_return: int,
    max_new_tokens: int | None = None,
) -> list[list[tuple[list[int], float]]]:
    """Trie-constrained beam search over left-padded prompts (B, P).

    Returns, per prompt, up to min(num_return, num_beams) (SID token ids, joint log-prob of SID + EOS)
    best first. Fewer come back when the trie has fewer valid continuations than beams.

    The hypotheses and scores of `constrained_beam_search_reference` (HF's beam search with length_penalty=0),
    with far less memory traffic and no host sync inside the step loop:
    - Tree attention: each prompt is encoded once and its K beams decode as K query positions of the prompt's
      row. The KV cache holds the prompt once plus K slots per step, and a (B, 1, K, P + K*(t+1)) mask lets each
      beam see the prompt and its own ancestors, so reordering beams reorders mask rows, never the cache (the
      reference copies each prompt's cache K times and gathers all of it every step).
    - Candidates are each live beam's trie children, read at the static width fanout[depth] + EOS, not a
      (B*K, V) canvas.
    - Finished hypotheses stay on the device, the best num_return per prompt, read once at the end. All
      max_len + 1 steps run: once the reference's early stop fires, later hypotheses score no higher than
      an alive beam (log-probs only fall) and lose ties to earlier ones, so they never enter the result.
    Attention kernels without custom masks (flash, flex) fall back to the reference.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    check_left_padded(attention_mask)
    steps = max_new_tokens or trie.max_len + 1
    if not takes_tree_mask(model.config, input_ids.shape[1] + steps):
        return constrained_beam_search_reference(
            model, tokenizer, input_ids, attention_mask, trie, num_beams, num_return, max_new_tokens
        )
    device = input_ids.device
    if trie.device != device:
        trie.to(device)
    batch, k, eos = input_ids.shape[0], num_beams, trie.eos_token_id

    cache, logp, last_pos = prefill(model, input_ids, attention_mask)
    trie._check_vocab(logp.shape[1])
    logp = logp[:, None].expand(-1, k, -1)  # (B, K, V) views; only beam 0 is live at the start
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    nodes = torch.zeros(batch, k, dtype=torch.long, device=device)
    prefixes = torch.full((batch, k, steps), -1, dtype=torch.long, device=device)  # tokens so far, then -1
    r = min(num_return, num_beams)
    done_scores = scores.new_full((batch, r), float("-inf"))  # the best finished hypotheses so far, best first
    done_seqs = prefixes.new_full((batch, r, steps), -1)
    visible = attention_mask.bool()[:, None].expand(-1, k, -1)  # (B, K, S): cache slots each beam attends to
    own_slot = torch.eye(k, dtype=torch.bool, device=device).expand(batch, k, k)

    for step in range(steps):
        top, beam, token, child = _candidates(trie, nodes, scores, logp, step, width=2 * k)  # (B, W)
        ends, order, alive = split_candidates(token, top, k, eos)
        ended = torch.where(ends[:, :k], top[:, :k], float("-inf"))  # (B, K)
        ended_seqs = prefixes.gather(1, beam[:, :k, None].expand(-1, -1, steps))  # (B, K, L)
        done_scores, done_seqs = _merge_finished(done_scores, done_seqs, ended, ended_seqs)
        beam, token, nodes = beam.gather(1, order), token.gather(1, order), child.gather(1, order)
        scores = torch.where(alive, top.gather(1, order), float("-inf"))
        prefixes = prefixes.gather(1, beam[..., None].expand(-1, -1, steps))
        prefixes[:, :, step] = token
        if step == steps - 1:
            break
        visible = torch.cat([visible.gather(1, beam[..., None].expand(-1, -1, visible.shape[2])), own_slot], 2)
        logp = _decode_beams(model, cache, token, visible, last_pos + 1 + step)

    return [
        [([t for t in seq if t >= 0], s) for s, seq in zip(row_scores, row_seqs, strict=True) if s > DEAD_SCORE]
        for row_scores, row_seqs in zip(done_scores.tolist(), done_seqs.tolist(), strict=True)
    ]


def _candidates(trie: SidTrie, nodes: torch.Tensor, scores: torch.Tensor, logp: torch.Tensor, depth: int, width: int):
    """The best `width` trie-valid continuations per prompt, best first.

    nodes, scores (B, K); logp (B, K, V). Every live beam sits at `depth`, and a node's children are one CSR
    range, so each beam's candidates fit a static (F + 1) columns: F = fanout[depth] children, then EOS where a
    full SID ends. Returns (B, W) joint scores (-inf: no candidate), source beam, token, and the node it leads to.
    """
    batch, k = nodes.shape
    fan = trie.fanout[depth] if depth < len(trie.fanout) else 0
    live = torch.isfinite(scores) & (nodes >= 0)
    node = nodes.clamp(min=0)
    start = trie.child_ptr[node]
    count = torch.where(live, trie.child_ptr[node + 1] - start, 0)
    offset = torch.arange(fan, device=nodes.device)
    edge = (start[..., None] + offset).clamp(max=trie.child_token.numel() - 1)  # (B, K, F), in range
    stop = torch.full_like(node[..., None], trie.eos_token_id)
    token = torch.cat([trie.child_token[edge], stop], dim=2)  # (B, K, F + 1), every id a real token
    child = torch.cat([trie.child_node[edge], torch.full_like(stop, -1)], dim=2)
    valid = torch.cat([offset < count[..., None], (live & trie.is_complete[node])[..., None]], dim=2)
    joint = torch.where(valid, scores[..., None] + logp.gather(2, token), float("-inf"))
    top, idx = joint.view(batch, -1).topk(min(width, k * (fan + 1)), dim=1)
    return top, idx // (fan + 1), token.view(batch, -1).gather(1, idx), child.view(batch, -1).gather(1, idx)


def _merge_finished(scores: torch.Tensor, seqs: torch.Tensor, new_scores: torch.Tensor, new_seqs: torch.Tensor):
    """The best R of the finished hypotheses so far (B, R) and this step's (B, K), with their (.., L) tokens.

    A stable sort keeps the earlier hypothesis first on ties, as the reference's list sort does."""
    r = scores.shape[1]
    scores, seqs = torch.cat([scores, new_scores], 1), torch.cat([seqs, new_seqs], 1)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :r]
    return scores.gather(1, order), seqs.gather(1, order[..., None].expand(-1, -1, seqs.shape[2]))


def _decode_beams(model, cache, token: torch.Tensor, visible: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One step of every beam: token (B, K) at position (B,), as K query positions of its prompt's row.

    visible (B, K, S) marks the cache slots each beam attends to: the prompt, then one slot per beam per step.
    The cache grows by K slots per row in place. Returns (B, K, V) log-probs. Dead beams (score -inf) hold
    some real token too; their outputs are never read."""
    return torch.log_softmax(decode_tree(model, cache, token, visible[:, None], position), dim=-1)


def decode_tree(model, cache, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One forward of C query tokens per prompt row over the shared cache: tokens (B, C) all at position (B,),
    mask (B, 1, C, S) bool (True = attend; the same for all heads) -> (B, C, V) float32 logits.
    The cache grows by C slots per row in place. Beam search and exact ranking both decode this way."""
    mask, positions = as_attention_mask(model, mask), position[:, None].expand_as(tokens)
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return out.logits.float()
