"""Trie of valid Semantic IDs, the constraint of the beam search in `gti.rank.beam_search` (docs/evaluation.md).

The trie lives in flat CSR tensors so it scales to 1M items x 5 levels in O(nodes) memory, and every
query (transition, allowed-token mask) is a handful of vectorised torch ops over all beams at once.
HF's `prefix_allowed_tokens_fn` calls Python once per beam per step; `gti.testing.TrieLogitsProcessor` does not.
SIDs are token-id sequences from the tokenizer, never decoded strings.
"""

from __future__ import annotations

import itertools

import torch

# Beam scores at or below this are HF placeholders (-1e9) or dead beams (-inf), not real hypotheses.
DEAD_SCORE = -1e8


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists -> (N, L) LongTensor right-padded with -1, and (N,) lengths, without a per-row loop."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    flat = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    padded = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), -1, dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
    col = torch.arange(flat.numel()) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    padded[row, col] = flat
    return padded, lengths


class SidTrie:
    """Prefix tree over item SIDs; node 0 is the root, item i's SID is `sequences[i]`.

    Nodes are numbered by depth, then in lexicographic order of their prefix, so the CSR edge list
    (`child_ptr`, `child_token`, `child_node`) is sorted by (parent, token) and `keys = parent * V_key +
    token` is sorted too: one `searchsorted` finds any transition. Items sharing a SID share a node.
    """

    def __init__(self, sequences: list[list[int]], eos_token_id: int):
        if not sequences:
            raise ValueError("SidTrie needs at least one item sequence")
        if any(len(s) == 0 for s in sequences):
            raise ValueError("every item needs a non-empty SID")
        self.eos_token_id = int(eos_token_id)
        self.num_items = len(sequences)
        padded, lengths = _pad(sequences)  # (M, L) with -1 = no token, (M,)
        self.max_len = padded.shape[1]
        if (padded.masked_select(padded != -1) < 0).any():
            raise ValueError("SID token ids must be >= 0")
        self.key_vocab = int(padded.max()) + 1  # V_key: tokens >= this have no edge anywhere

        # Lexicographic row order by stable sorts from the last column to the first. The -1 padding sorts
        # first, so a prefix comes before its extensions (rows [1] then [1, 2]).
        order = torch.arange(self.num_items)
        for col in reversed(range(self.max_len)):
            order = order[torch.sort(padded[order, col], stable=True).indices]
        rows, row_len = padded[order], lengths[order]  # (M, L), (M,)

        # lcp[i]: length of the common prefix of sorted rows i-1 and i. Padding never equals a real
        # token, and padding-vs-padding matches only lie past both rows' ends, where no node is made.
        lcp = torch.zeros(self.num_items, dtype=torch.long)
        if self.num_items > 1:
            lcp[1:] = (rows[1:] == rows[:-1]).long().cumprod(dim=1).sum(dim=1)

        # A row opens a new node at depth d+1 iff it is long enough and its (d+1)-prefix differs from the
        # previous row's, i.e. lcp <= d. Equal prefixes are adjacent after sorting, so a cumsum numbers them.
        parents, tokens, children = [], [], []
        node_of_row = torch.zeros(self.num_items, dtype=torch.long)  # (M,) node of the prefix so far
        next_id = 1
        level_start = [0, 1]  # nodes at depth d are ids level_start[d] .. level_start[d+1]-1
        for d in range(self.max_len):
            alive = row_len > d
            new = alive & (lcp <= d)
            ids = next_id + torch.cumsum(new.long(), 0) - 1  # (M,) valid where alive
            parents.append(node_of_row[new])
            tokens.append(rows[new, d])
            children.append(ids[new])
            node_of_row = torch.where(alive, ids, node_of_row)
            next_id += int(new.sum())
            level_start.append(next_id)
        self.num_nodes = next_id
        parent = torch.cat(parents)  # (E,) with E = num_nodes - 1, already sorted by (parent, token)
        self.child_token = torch.cat(tokens)  # (E,)
        self.child_node = torch.cat(children)  # (E,)
        self.keys = parent * self.key_vocab + self.child_token  # (E,) sorted
        counts = torch.bincount(parent, minlength=self.num_nodes)
        self.child_ptr = torch.zeros(self.num_nodes + 1, dtype=torch.long)  # (nodes+1,)
        self.child_ptr[1:] = torch.cumsum(counts, 0)
        # fanout[d]: most children of any node at depth d (d = 0 .. max_len), a static width for beam search
        self.fanout = [int(counts[a:b].max()) for a, b in itertools.pairwise(level_start)]

        # Terminal node of each item, then a CSR node -> items map (item ids ascending within a node).
        terminal = torch.empty(self.num_items, dtype=torch.long)
        terminal[order] = node_of_row
        by_node = torch.sort(terminal, stable=True).indices
        self.leaf_items = by_node  # (M,) item ids grouped by terminal node
        leaf_counts = torch.bincount(terminal, minlength=self.num_nodes)
        self.item_ptr = torch.zeros(self.num_nodes + 1, dtype=torch.long)
        self.item_ptr[1:] = torch.cumsum(leaf_counts, 0)
        self.is_complete = leaf_counts > 0  # (nodes,) a full SID ends here; may also have children

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def to(self, device: torch.device | str) -> SidTrie:
        """Move the lookup tensors (in place, like nn.Module.to) and return self."""
        for name in ("child_ptr", "child_token", "child_node", "keys", "is_complete"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child of each node along each token, or -1 (no edge, or node already -1). Shapes (N,) -> (N,)."""
        valid = (nodes >= 0) & (tokens >= 0) & (tokens < self.key_vocab)
        query = nodes.clamp(min=0) * self.key_vocab + tokens.clamp(0, self.key_vocab - 1)
        pos = torch.searchsorted(self.keys, query).clamp(max=self.keys.numel() - 1)
        hit = valid & (self.keys[pos] == query)
        return torch.where(hit, self.child_node[pos], torch.full_like(nodes, -1))

    def walk(self, seqs: list[list[int]]) -> torch.Tensor:
        """Node reached by each sequence from the root, -1 if it leaves the trie. (N,)."""
        padded = _pad(seqs)[0].to(self.device)  # (N, T)
        nodes = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
        for t in range(padded.shape[1]):
            tok = padded[:, t]
            nodes = torch.where(tok >= 0, self.step(nodes, tok), nodes)  # padding keeps the node
        return nodes

    def is_sid(self, seqs: list[list[int]]) -> list[bool]:
        """Whether each sequence is a complete SID of some item."""
        nodes = self.walk(seqs)
        ok = (nodes >= 0) & self.is_complete[nodes.clamp(min=0)]
        return ok.tolist()

    def items_of(self, seq: list[int]) -> list[int]:
        """Item ids whose SID is exactly `seq` (several when SIDs collide), [] if none."""
        node = int(self.walk([seq])[0])
        if node < 0:
            return []
        return self.leaf_items[self.item_ptr[node] : self.item_ptr[node + 1]].tolist()

    def allowed_pairs(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) nodes -> sparse (row, token) pairs: each node's children, plus EOS where a full SID ends.

        Each node's CSR range is expanded with repeat_interleave, so there is no loop over beams. Dead
        nodes (-1) get no pair; the caller decides what they may emit.
        """
        n = nodes.shape[0]
        live = nodes >= 0
        safe = nodes.clamp(min=0)
        start = self.child_ptr[safe]  # (N,)
        count = torch.where(live, self.child_ptr[safe + 1] - start, torch.zeros_like(start))  # (N,)
        arange = torch.arange(n, device=nodes.device)
        row = torch.repeat_interleave(arange, count)  # (total,)
        # offset of each expanded entry inside its node's range: its position minus the range's first position
        first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        edge = torch.repeat_interleave(start, count) + torch.arange(row.numel(), device=nodes.device) - first
        ends = arange[live & self.is_complete[safe]]
        eos = torch.full_like(ends, self.eos_token_id)
        return torch.cat([row, ends]), torch.cat([self.child_token[edge], eos])

    def allowed_mask(self, nodes: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(N,) nodes -> (N, V) bool of the tokens that keep each row on a valid SID (see allowed_pairs)."""
        self._check_vocab(vocab_size)
        rows, tokens = self.allowed_pairs(nodes)
        mask = torch.zeros(nodes.shape[0], vocab_size, dtype=torch.bool, device=nodes.device)
        mask[rows, tokens] = True
        return mask

    def _check_vocab(self, vocab_size: int) -> None:
        if self.key_vocab > vocab_size or self.eos_token_id >= vocab_size:
            raise ValueError(f"trie uses token ids up to {self.key_vocab - 1}, vocab_size is {vocab_size}")


def beams_to_items(beams: list[list[tuple[list[int], float]]], trie: SidTrie) -> list[list[int]]:
    """Per input, item ids in beam order; colliding SIDs expand to all their items, each id kept once."""
    # one vectorised walk for every beam of every input, then CSR lookups of each leaf's items
    nodes = trie.walk([seq for per_input in beams for seq, _ in per_input]).cpu().clamp(min=0)
    starts, ends = trie.item_ptr[nodes].tolist(), trie.item_ptr[nodes + 1].tolist()  # root: empty range
    ranked, k = [], 0
    for per_input in beams:
        seen: dict[int, None] = {}  # insertion-ordered set
        for j in range(k, k + len(per_input)):
            seen.update(dict.fromkeys(trie.leaf_items[starts[j] : ends[j]].tolist()))
        k += len(per_input)
        ranked.append(list(seen))
    return ranked
