"""Exact ranking of the whole catalogue: every item scored by the model's log-probability of its SID + EOS.

Beam search (`gti.rank.beam_search`) keeps the K best prefixes at each depth, so an item whose first tokens
score low never enters the list however well it ends; this module is the ranking beam search approximates.
The trie is expanded level by level: each prompt is encoded once, then every distinct prefix is decoded once
as one query position of its prompt's row (tree attention, as the beam decoder does), attending to the prompt
and to its own ancestors' slots of the KV cache. A prefix's children and EOS are read from its one output, so
the cost is one decoded token per trie node and prompt (ML-100K: 3.3k nodes, against ~100 for 20 beams over 5
steps). A level's nodes go through in chunks of at most `max_tokens` query tokens per forward (logits are
(B, C, V)); childless nodes are cropped from the cache after their chunk, as nothing attends to them.
"""

from __future__ import annotations

import torch

from gti.rank.beam_reference import check_left_padded, prefill
from gti.rank.beam_search import decode_tree
from gti.rank.masks import takes_tree_mask
from gti.rank.trie import DEAD_SCORE, SidTrie


@torch.no_grad()
def exact_ranking(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: SidTrie,
    num_return: int,
    floor: torch.Tensor | None = None,
    max_tokens: int = 1024,
) -> list[list[tuple[list[int], float]]]:
    """The `num_return` most likely SIDs of the catalogue per left-padded prompt (B, P), best first, each with
    its joint log-prob of SID + EOS: the structure `constrained_beam_search` returns.

    floor (B,), optional: a prefix scoring below its prompt's floor is not expanded (log-probs only fall, so
    none of its items can reach the floor) and items below it are not returned. With floor = the score of a
    known item minus a margin (the k-th beam hypothesis), the top k are still exact and far fewer nodes run.
    """
    if num_return < 1:
        raise ValueError(f"num_return must be >= 1, got {num_return}")
    check_left_padded(attention_mask)
    if not takes_tree_mask(model.config, input_ids.shape[1] + trie.max_len + 1):
        raise ValueError(
            f"exact ranking decodes the trie with tree attention, which model type {model.config.model_type!r} with "
            f"attn_implementation={model.config._attn_implementation!r} (or a short sliding window) cannot take; load "
            "the model with attn_implementation='sdpa' or 'eager' (model types: gti.rank.masks.TAKES_4D_MASK)"
        )
    device = input_ids.device
    if trie.device != device:
        trie.to(device)
    batch = input_ids.shape[0]
    floor = torch.full((batch,), float("-inf"), device=device) if floor is None else floor.to(device).float()
    tree = _Tree(trie)

    cache, logp, last_pos = prefill(model, input_ids, attention_mask)
    trie._check_vocab(logp.shape[1])
    # score[b, n]: log-prob of node n's prefix given prompt b; final[b, n]: of its SID + EOS (complete nodes)
    score = torch.full((batch, trie.num_nodes), float("-inf"), device=device)
    score[:, 0] = 0.0
    final = torch.full_like(score, float("-inf"))
    root = torch.zeros(1, dtype=torch.long, device=device)
    _read(trie, score, final, root, logp[:, None])  # the prompt's own output scores the first tokens
    prompt_slots = attention_mask.bool()  # (B, P)
    slot = torch.full((trie.num_nodes,), -1, dtype=torch.long, device=device)  # cache slot of each decoded node

    for depth in range(1, trie.max_len + 1):
        level = tree.levels[depth]
        level = level[(score[:, level] >= floor[:, None]).any(0)]  # live for some prompt of the batch
        if level.numel() == 0:
            break
        has_children = trie.child_ptr[level + 1] > trie.child_ptr[level]
        per_chunk = max(1, max_tokens // batch)
        for group, keep in ((level[has_children], True), (level[~has_children], False)):
            for nodes in group.split(per_chunk) if group.numel() else ():
                start = cache.get_seq_length()
                slot[nodes] = start + torch.arange(nodes.numel(), device=device)
                mask = _tree_mask(prompt_slots, slot, tree.ancestors(nodes, depth), start + nodes.numel())
                logits = decode_tree(model, cache, tree.token[nodes][None].expand(batch, -1), mask, last_pos + depth)
                _read(trie, score, final, nodes, logits)
                if not keep:  # leaves: nothing will attend to them
                    cache.crop(-nodes.numel())
                    slot[nodes] = -1

    final = torch.where(final >= floor[:, None], final, float("-inf"))
    top, node = final.topk(min(num_return, trie.num_nodes), dim=1)  # (B, R)
    paths = tree.paths(node.flatten()).view(batch, -1, trie.max_len)
    return [
        [([t for t in seq if t >= 0], s) for s, seq in zip(row_scores, row_seqs, strict=True) if s > DEAD_SCORE]
        for row_scores, row_seqs in zip(top.tolist(), paths.tolist(), strict=True)
    ]


class _Tree:
    """Per-node views of the trie's CSR edges: depth levels, parent, incoming token, SID paths."""

    def __init__(self, trie: SidTrie):
        device, n = trie.device, trie.num_nodes
        counts = trie.child_ptr[1:] - trie.child_ptr[:-1]  # (nodes,)
        parent_of_edge = torch.repeat_interleave(torch.arange(n, device=device), counts)  # (E,)
        self.parent = torch.zeros(n, dtype=torch.long, device=device)  # the root is its own parent
        self.parent[trie.child_node] = parent_of_edge
        self.token = torch.full((n,), -1, dtype=torch.long, device=device)
        self.token[trie.child_node] = trie.child_token
        self.levels = [torch.zeros(1, dtype=torch.long, device=device)]
        for _ in range(trie.max_len):  # a level's edges are one CSR range: its nodes are numbered together
            lo, hi = trie.child_ptr[self.levels[-1][0]], trie.child_ptr[self.levels[-1][-1] + 1]
            self.levels.append(trie.child_node[lo:hi])
        self.max_len = trie.max_len

    def ancestors(self, nodes: torch.Tensor, depth: int) -> torch.Tensor:
        """(C,) nodes at `depth` -> (C, depth) the node and its ancestors below the root, deepest first."""
        out = [nodes]
        for _ in range(depth - 1):
            out.append(self.parent[out[-1]])
        return torch.stack(out, 1)

    def paths(self, nodes: torch.Tensor) -> torch.Tensor:
        """(N,) nodes -> (N, max_len) the tokens from the root, right-padded with -1 (the root: all -1)."""
        hops = [nodes]
        for _ in range(self.max_len - 1):
            hops.append(self.parent[hops[-1]])  # the root is its own parent
        up = torch.stack(hops, 1)  # (N, L) the node, its parent, ..., deepest first
        depth = (up > 0).sum(1, keepdim=True)
        col = depth - 1 - torch.arange(self.max_len, device=nodes.device)  # where each hop's token goes
        out = torch.full_like(up, -1)
        row = torch.arange(nodes.numel(), device=nodes.device)[:, None].expand_as(up)
        out[row[col >= 0], col[col >= 0]] = self.token[up[col >= 0]]
        return out


def _tree_mask(prompt: torch.Tensor, slot: torch.Tensor, lineage: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, C, length) bool: each query node sees its prompt's real tokens, its ancestors' slots and its own.

    prompt (B, P) the prompt's attention mask; lineage (C, depth) the node and its ancestors (see _Tree)."""
    batch, width = prompt.shape
    rows = lineage.shape[0]
    tree = torch.zeros(rows, length - width, dtype=torch.bool, device=prompt.device)
    tree.scatter_(1, slot[lineage] - width, True)  # every ancestor of a decoded node holds a slot
    return torch.cat([prompt[:, None].expand(-1, rows, -1), tree.expand(batch, -1, -1)], 2)[:, None]


def _read(trie: SidTrie, score: torch.Tensor, final: torch.Tensor, nodes: torch.Tensor, logits: torch.Tensor) -> None:
    """Score the children and the EOS of `nodes` (C,) from their outputs (B, C, V), in place."""
    lse = logits.logsumexp(-1)  # (B, C): log_softmax without a (B, C, V) copy
    start, count = trie.child_ptr[nodes], trie.child_ptr[nodes + 1] - trie.child_ptr[nodes]
    row = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), count)
    first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)  # each edge's row's first position
    edge = torch.repeat_interleave(start, count) + torch.arange(row.numel(), device=nodes.device) - first
    token = trie.child_token[edge]
    score[:, trie.child_node[edge]] = score[:, nodes[row]] + logits[:, row, token] - lse[:, row]
    ends = trie.is_complete[nodes]
    eos = logits[:, ends, trie.eos_token_id] - lse[:, ends]
    final[:, nodes[ends]] = score[:, nodes[ends]] + eos
