"""Trie of valid Semantic IDs and trie-constrained beam search (design.md §7).

The trie lives in flat CSR tensors so it scales to 1M items x 5 levels in O(nodes) memory, and every
query (transition, allowed-token mask) is a handful of vectorised torch ops over all beams at once.
HF's `prefix_allowed_tokens_fn` calls Python once per beam per step; `TrieLogitsProcessor` does not.
SIDs are token-id sequences from the tokenizer, never decoded strings.
"""

from __future__ import annotations

import itertools

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

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


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    if bool((attention_mask[:, -1] == 0).any()):  # a right-padded row would decode after its padding
        raise ValueError("constrained_beam_search needs left-padded prompts (tokenizer.padding_side='left')")


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
    _check_left_padded(attention_mask)
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
    _check_left_padded(attention_mask)
    device = input_ids.device
    if trie.device != device:
        trie.to(device)
    batch, k = input_ids.shape[0], num_beams
    num_return = min(num_return, num_beams)
    eos = trie.eos_token_id
    steps = max_new_tokens or trie.max_len + 1

    cache, logp, last_pos = _prefill(model, input_ids, attention_mask)
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
        ends, order, alive = _split_candidates(token, top, k, eos)
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


def _prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
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


def _split_candidates(token: torch.Tensor, top: torch.Tensor, k: int, eos: int):
    """(B, W) candidates, best first -> ends (B, W): the finite EOS within the top K, which finish a hypothesis
    (HF's rule: an EOS ranked below K does not); order, alive (B, K): the columns of the best K candidates that do
    not end in EOS and whether each is a real one (there are >= K columns: each beam has one EOS at most)."""
    ends = (token == eos) & torch.isfinite(top)
    ends[:, k:] = False
    keep = token != eos
    keep &= keep.long().cumsum(1) <= k
    order = torch.argsort((~keep).long(), dim=1, stable=True)[:, :k]  # kept columns first, in rank order
    return ends, order, keep.gather(1, order)


def _takes_tree_mask(config, span: int) -> bool:
    """Whether the model's attention takes a custom 4D mask (sdpa: bool, eager: additive; flash and flex take
    none) and a full-attention mask is exact: no sliding window shorter than the `span` positions decoded."""
    window = getattr(config, "sliding_window", None)
    return config._attn_implementation in ("sdpa", "eager") and (window is None or span <= window)


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
    _check_left_padded(attention_mask)
    steps = max_new_tokens or trie.max_len + 1
    if not _takes_tree_mask(model.config, input_ids.shape[1] + steps):
        return constrained_beam_search_reference(
            model, tokenizer, input_ids, attention_mask, trie, num_beams, num_return, max_new_tokens
        )
    device = input_ids.device
    if trie.device != device:
        trie.to(device)
    batch, k, eos = input_ids.shape[0], num_beams, trie.eos_token_id

    cache, logp, last_pos = _prefill(model, input_ids, attention_mask)
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
        ends, order, alive = _split_candidates(token, top, k, eos)
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
    The cache grows by K slots per row in place. Returns (B, K, V) log-probs."""
    mask = visible[:, None]  # (B, 1, K, S), the same for all heads; sdpa takes it as bool (True = attend)
    if model.config._attn_implementation == "eager":  # eager adds its mask to the attention scores
        bias = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device)
        mask = bias.masked_fill(~mask, torch.finfo(model.dtype).min)
    out = model(
        input_ids=token,  # dead beams (score -inf) hold some real token too; their outputs are never read
        attention_mask=mask,
        position_ids=position[:, None].expand_as(token),
        cache=cache,
        use_cache=True,
    )
    return torch.log_softmax(out.logits.float(), dim=-1)


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
