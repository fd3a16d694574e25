"""Trie-constrained beam search: our decoders vs HF generate, side by side in one run.

Same model, prompts (one per user), trie and beam settings for every variant:
  (a) gti.rank.beam_search.constrained_beam_search: prompt encoded once, beams as tree attention over one shared cache,
      no host sync in the step loop
  (r) gti.rank.beam_reference.constrained_beam_search_reference: the previous decoder, prompt cache copied to the beams
  (a') HF generate + our TrieLogitsProcessor (generate encodes each prompt num_beams times)
  (b) HF generate + prefix_allowed_tokens_fn over a Python prefix dict   (c) HF generate, no constraint
Prints wall time per batch, users/s, the constraint-only cost per decoding step, the speed-ups of (a), and
checks that (a), (r), (a') and (b) return identical top-K item lists ((a) and (r) also the same scores).
Runs on the model's device (CUDA when present; timings synchronised).
    python scripts/bench_decoding.py                          # tiny random Llama + SmolLM2 tokenizer
    python scripts/bench_decoding.py --model smollm2-135m --items 2000 --batch 32 --beams 20
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

from gti.core.assets import resolve_model
from gti.rank.beam_reference import constrained_beam_search_reference
from gti.rank.beam_search import constrained_beam_search
from gti.rank.trie import SidTrie, beams_to_items
from gti.testing import TrieLogitsProcessor, beam_generation_config, collect_beams, hf_constrained_beam_search
from gti.tokens.vocab import add_tokens, resize

LEVELS = 4


def load(name: str, device: str):
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m" if name == "tiny" else name))
    if name == "tiny":
        from gti.testing import make_tiny_llama

        model = make_tiny_llama(len(tok))
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32)
    tok.padding_side = "left"
    return tok, model.to(device).eval()


def prefix_dict(seqs: list[list[int]], eos: int) -> dict[tuple[int, ...], list[int]]:
    """What public repos (LC-Rec, TIGER ports) build: every SID prefix -> its allowed next tokens."""
    nxt: dict[tuple[int, ...], set[int]] = {}
    for s in seqs:
        for d in range(len(s)):
            nxt.setdefault(tuple(s[:d]), set()).add(s[d])
        nxt.setdefault(tuple(s), set()).add(eos)
    return {k: sorted(v) for k, v in nxt.items()}


def make_prefix_fn(table: dict[tuple[int, ...], list[int]], prompt_len: int, eos: int, pad: int):
    stop = [eos] if eos == pad else [eos, pad]

    def fn(batch_id: int, sent: torch.Tensor) -> list[int]:
        gen = sent[prompt_len:].tolist()
        if eos in gen or pad in gen:
            return stop
        return table.get(tuple(gen), stop)  # off the trie: a dead beam, let it finish

    return fn


def timed(fn, repeats: int, device: str):
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def constraint_step_cost(procs: dict, rows: torch.Tensor, vocab: int, repeats: int, device: str) -> dict[str, float]:
    """Seconds per call of each processor alone, averaged over all decoding depths (no model forward)."""
    scores = torch.randn(rows.shape[0], vocab, device=device)
    out = {}
    for name, (proc, prompt_len) in procs.items():

        def run(proc=proc, prompt_len=prompt_len):
            for depth in range(rows.shape[1] - prompt_len + 1):
                proc(rows[:, : prompt_len + depth], scores)

        per_batch, _ = timed(run, repeats, device)
        out[name] = per_batch / (rows.shape[1] - prompt_len + 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, smollm2-135m, an HF id or a folder")
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--codes", type=int, default=32, help="codes per level (4 levels of new tokens)")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="prompts (users) per search call")
    ap.add_argument("--history", type=int, default=6, help="most SIDs in a prompt (2 to this many, ML-1M: 20)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.items > args.codes**LEVELS:
        ap.error(f"--items {args.items} > codes^{LEVELS}: not enough distinct SIDs")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)

    tok, model = load(args.model, args.device)
    names = [f"<{chr(97 + lv)}_{c}>" for lv in range(LEVELS) for c in range(args.codes)]
    new = add_tokens(tok, names, [["x"]] * len(names))
    resize(model, tok)
    codes: set[tuple[int, ...]] = set()
    while len(codes) < args.items:
        codes.add(tuple(rng.randrange(args.codes) for _ in range(LEVELS)))
    seqs = [[new.start + lv * args.codes + c for lv, c in enumerate(code)] for code in sorted(codes)]
    sid_text = ["".join(tok.convert_ids_to_tokens(s)) for s in seqs]
    texts = [
        "The user bought " + ", ".join(rng.sample(sid_text, rng.randint(2, args.history))) + ". Next item:"
        for _ in range(args.batch)
    ]
    enc = tok(texts, return_tensors="pt", padding=True).to(args.device)
    ids, mask = enc.input_ids, enc.attention_mask
    prompt_len = ids.shape[1]

    t = time.perf_counter()
    trie = SidTrie(seqs, eos_token_id=tok.eos_token_id).to(args.device)
    build_s = time.perf_counter() - t
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    table = prefix_dict(seqs, eos)
    config = beam_generation_config(tok, args.beams, args.beams, trie.max_len + 1)
    stop_ids = {eos, pad}

    def run_ours():
        return constrained_beam_search(model, tok, ids, mask, trie, args.beams, args.beams)

    def run_reference():
        return constrained_beam_search_reference(model, tok, ids, mask, trie, args.beams, args.beams)

    def run_hf_proc():
        return hf_constrained_beam_search(model, tok, ids, mask, trie, args.beams, args.beams)

    def run_hf():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            prefix_allowed_tokens_fn=make_prefix_fn(table, prompt_len, eos, pad),
        )
        return collect_beams(out, prompt_len, ids.shape[0], trie, stop_ids)

    def run_free():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    print(
        f"model={args.model} device={args.device} threads={args.threads} items={args.items} "
        f"beams={args.beams} batch={args.batch} prompt_len={prompt_len} vocab={len(tok)} "
        f"trie nodes={trie.num_nodes} build={build_s * 1e3:.1f} ms"
    )
    t_ours, beams_ours = timed(run_ours, args.repeats, args.device)
    t_ref, beams_ref = timed(run_reference, args.repeats, args.device)
    t_proc, beams_proc = timed(run_hf_proc, args.repeats, args.device)
    t_hf, beams_hf = timed(run_hf, args.repeats, args.device)
    t_free, _ = timed(run_free, args.repeats, args.device)

    items_ours = beams_to_items(beams_ours, trie)
    differ = {
        name: [i for i, (a, b) in enumerate(zip(items_ours, beams_to_items(other, trie), strict=True)) if a != b]
        for name, other in (("(r)", beams_ref), ("(a')", beams_proc), ("(b)", beams_hf))
    }
    score_gap = max(
        (abs(x[1] - y[1]) for a, b in zip(beams_ours, beams_ref, strict=True) for x, y in zip(a, b, strict=False)),
        default=0.0,
    )
    assert all(all(trie.is_sid([s for s, _ in per])) for per in beams_ours)

    # constraint work alone, on rows shaped like the real ones: (B*beams, prompt + SID + EOS)
    picks = [seqs[rng.randrange(len(seqs))] + [eos] for _ in range(ids.shape[0] * args.beams)]
    rows = torch.cat([ids.repeat_interleave(args.beams, 0), torch.tensor(picks, device=args.device)], dim=1)
    step = constraint_step_cost(
        {
            "ours": (TrieLogitsProcessor(trie, prompt_len, pad), prompt_len),
            "hf": (
                PrefixConstrainedLogitsProcessor(make_prefix_fn(table, prompt_len, eos, pad), args.beams),
                prompt_len,
            ),
        },
        rows,
        model.get_output_embeddings().weight.shape[0],
        args.repeats,
        args.device,
    )

    print(f"{'variant':38} {'batch (s)':>10} {'users/s':>10} {'constraint/step (ms)':>21}")
    for name, secs, per_step in (
        ("(a) gti constrained_beam_search", t_ours, None),
        ("(r) constrained_beam_search_reference", t_ref, None),
        ("(a') generate + TrieLogitsProcessor", t_proc, step["ours"]),
        ("(b) prefix_allowed_tokens_fn", t_hf, step["hf"]),
        ("(c) unconstrained", t_free, None),
    ):
        cost = "" if per_step is None else f"{per_step * 1e3:.3f}"
        print(f"{name:38} {secs:10.4f} {args.batch / secs:10.1f} {cost:>21}")
    print(
        f"speed-up of (a): over (r) {t_ref / t_ours:.2f}x, over (a') {t_proc / t_ours:.2f}x, over (b) "
        f"{t_hf / t_ours:.2f}x, over (c) {t_free / t_ours:.2f}x; constraint only (b)/(a') "
        f"{step['hf'] / step['ours']:.1f}x\n"
        f"max |score (a) - score (r)| = {score_gap:.2e}; returned per prompt: {[len(x) for x in items_ours]}"
    )
    for name, bad in differ.items():
        verdict = f"differ for prompts {bad}" if bad else f"identical for all {args.batch} prompts"
        print(f"top-{args.beams} item lists of (a) and {name}: {verdict}")
    if any(differ.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
