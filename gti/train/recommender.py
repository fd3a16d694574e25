"""Stage-2 pieces: the recommender LightningModule, prompts, evaluation batches (docs/evaluation.md)."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import lightning as L
import torch

from gti.core.config import EVAL_PRECISIONS, EvalConfig, FinetuneConfig
from gti.core.errors import ConfigError
from gti.data.dataset import Dataset, Example
from gti.rank.beam_search import constrained_beam_search
from gti.rank.exact import exact_ranking
from gti.rank.metrics import RankingMetrics, ndcg_at, rank_of
from gti.rank.trie import SidTrie, beams_to_items
from gti.tokens.overlay import FrozenBf16
from gti.train.step import compile_mode, lm_training_step, start_fit
from gti.train.templates import Encoded, PromptFormatter, render_rec
from gti.train.trainer import adamw_with_warmup, clip_gradients


@contextlib.contextmanager
def ranking_precision(model, precision: str):
    """Run the ranking forwards in `precision`, whatever trainer.precision set up (docs/traps.md).

    Lightning runs validation_step / test_step under the training precision: bf16 autocast (bf16-mixed),
    or bf16 weights with bf16 as torch's default dtype (bf16-true). bf16 logits move an SID's score by
    0.3-0.5 nats while neighbouring beams are 0.04-0.19 apart, so ranks then depend on the training
    precision. "fp32" turns autocast off and upcasts low-precision weights for the search (exact; twice
    their memory meanwhile), casting them back after; "tf32" is fp32 with float32 matmuls on TF32 tensor cores
    (inputs rounded to 10 mantissa bits, fp32 sums: torch's "high" matmul precision) where the device has them,
    fp32 elsewhere; "bf16" autocasts to bf16 on every run alike.
    """
    if precision not in EVAL_PRECISIONS:
        raise ConfigError(f"eval.precision={precision!r}: choose one of {', '.join(EVAL_PRECISIONS)}")
    # parameters and float buffers (rotary frequencies), each with its own dtype: LoRA / overlay tables stay fp32
    params = dict(model.named_parameters()) | {f"buffer {n}": b for n, b in model.named_buffers() if b.is_floating_point()}
    dtypes = {n: p.dtype for n, p in params.items()}
    device, default = next(iter(params.values())).device.type, torch.get_default_dtype()
    upcast = precision in ("fp32", "tf32") and any(d != torch.float32 for d in dtypes.values())
    matmul = torch.get_float32_matmul_precision()
    torch.set_default_dtype(torch.float32)  # beam scores are summed in tensors of the default dtype
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        if upcast:
            _cast(params, dict.fromkeys(params, torch.float32))
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        if upcast:
            _cast(params, dtypes)
        torch.set_default_dtype(default)
        torch.set_float32_matmul_precision(matmul)


def _cast(params: dict, dtypes: dict) -> None:
    # outside inference mode: Lightning ranks inside it, and a parameter cast there would become an inference
    # tensor that later training steps and merges cannot update in place
    with torch.inference_mode(False), torch.no_grad():
        for name, p in params.items():
            p.data = p.data.to(dtypes[name])


def rank_sids(model, tokenizer, batch: dict, trie: SidTrie, ev: EvalConfig, ranking: str, floor=None) -> list:
    """Per prompt of a left-padded batch, (SID tokens, score) best first: `ranking` "beam" (eval.num_beams, the
    search) or "exact" (every item of the catalogue by its log-prob, gti.rank.exact; the top max(eval.ks), or
    the exact top k of the items scoring above `floor`). In eval.precision, not the training precision."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with ranking_precision(model, ev.precision):  # not the training precision's autocast
        if ranking == "exact":
            return exact_ranking(model, ids, mask, trie, num_return=max(ev.ks), floor=floor)
        return constrained_beam_search(model, tokenizer, ids, mask, trie, num_beams=ev.num_beams, num_return=ev.num_beams)


def beam_vs_exact(model, tokenizer, trie: SidTrie, loader, ev: EvalConfig, k: int = 10) -> dict:
    """How far beam search is from the exact ranking on the users of `loader`: the share whose top-k item list
    is the same (items and order), the same set, and Recall@k / NDCG@k both ways (metrics.json "beam_vs_exact").

    Exact here is the exact top k, with the floor of `beam_floor`."""
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    beam_lists, exact_lists, targets = [], [], []
    for batch in loader:
        batch = {n: t.to(device) for n, t in batch.items()}
        beams = rank_sids(model, tokenizer, batch, trie, ev, "beam")
        exact = rank_sids(model, tokenizer, batch, trie, replace(ev, ks=[k]), "exact", floor=beam_floor(beams, k, ev))
        beam_lists += [its[:k] for its in beams_to_items(beams, trie)]
        exact_lists += [its[:k] for its in beams_to_items(exact, trie)]
        targets += batch["target"].tolist()
    model.train(was_training)
    return agreement(beam_lists, exact_lists, targets, k)


def beam_floor(beams: list, k: int, ev: EvalConfig) -> torch.Tensor:
    """(B,) per prompt, the score of its k-th beam hypothesis less a margin, -inf with fewer than k: a floor for
    `exact_ranking` that keeps its top k exact. That hypothesis is a real item, so the exact k-th scores at least
    as much, and log-probs only fall along a SID. The margin covers the two searches' different float summation
    orders: ~1e-6 nats in fp32, more where TF32 rounds matmul inputs, up to ~0.5 in bf16 (docs/traps.md)."""
    margin = {"fp32": 1e-3, "tf32": 0.1}.get(ev.precision, 1.0)
    return torch.tensor([b[k - 1][1] - margin if len(b) >= k else float("-inf") for b in beams])


def agreement(beam: list[list[int]], exact: list[list[int]], targets: list[int], k: int = 10) -> dict:
    """Per-user top-k item lists both ways -> the "beam_vs_exact" figures (see beam_vs_exact)."""
    n = max(len(targets), 1)
    ranks = {name: [rank_of(t, its[:k]) for t, its in zip(targets, lists)] for name, lists in (("beam", beam), ("exact", exact))}
    return {
        "users": len(targets),
        f"top{k}_equal": sum(a[:k] == b[:k] for a, b in zip(beam, exact)) / n,
        f"top{k}_same_set": sum(set(a[:k]) == set(b[:k]) for a, b in zip(beam, exact)) / n,
        f"recall@{k}": {name: sum(0 <= r < k for r in rs) / n for name, rs in ranks.items()},
        f"ndcg@{k}": {name: sum(ndcg_at(r, k) for r in rs) / n for name, rs in ranks.items()},
    }


class RecommenderModule(L.LightningModule):
    def __init__(self, model, tokenizer, trie: SidTrie, cfg: FinetuneConfig):
        super().__init__()
        self.model, self.tokenizer, self.trie, self.cfg = model, tokenizer, trie, cfg
        self.lean_step, self.compile_mode = cfg.trainer.lean_step, compile_mode(cfg.trainer)  # see lm_training_step, start_fit
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as found
        ks = tuple(cfg.eval.ks)
        self.val_metrics, self.test_metrics = RankingMetrics(ks), RankingMetrics(ks)
        self.predictions: list[dict] = []
        self.frozen_bf16 = FrozenBf16(model)  # LoRA in bf16: the frozen LM held in bf16 while it trains

    def setup(self, stage):
        if stage == "fit":
            start_fit(self)

    # ranking and saving see the exact frozen weights (bf16-true converts the module again at validate/test)
    def on_validation_start(self):
        self.frozen_bf16.exact()

    def on_validation_end(self):
        if self.trainer.state.fn == "fit":  # back to training
            self.frozen_bf16.hold(self.trainer.precision)

    def on_test_start(self):
        self.frozen_bf16.exact()

    def on_fit_end(self):
        self.frozen_bf16.exact()

    def training_step(self, batch, batch_idx):
        return lm_training_step(self, batch)

    def _rank(self, batch) -> tuple[list[list[int]], torch.Tensor]:
        sids = rank_sids(self.model, self.tokenizer, batch, self.trie, self.cfg.eval, self.cfg.eval.ranking)
        items = beams_to_items(sids, self.trie)
        ranks = torch.tensor([rank_of(int(t), its) for t, its in zip(batch["target"], items)], device=self.device)
        return items, ranks

    def validation_step(self, batch, batch_idx):
        _, ranks = self._rank(batch)
        self.val_metrics.update(batch["index"], ranks)

    def on_validation_epoch_end(self):
        for k, v in self.val_metrics.compute().items():
            self.log(f"val/{k}", float(v), sync_dist=True)  # already synced: every rank holds the same value
        self.val_metrics.reset()

    def test_step(self, batch, batch_idx):
        items, ranks = self._rank(batch)
        self.test_metrics.update(batch["index"], ranks)
        k = max(self.cfg.eval.ks)
        for i, u, t, its, r in zip(batch["index"].tolist(), batch["user"].tolist(), batch["target"].tolist(), items, ranks.tolist()):
            self.predictions.append({"index": i, "user": u, "target": t, "rank": r, "items": its[:k]})

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # FSDP, fused AdamW (gti.train.trainer)

    def configure_optimizers(self):  # self._trainer: None when called unattached (self.trainer raises)
        o = self.cfg.optim
        return adamw_with_warmup(self.model.parameters(), o.lr, o.weight_decay, o.warmup_steps, self._trainer)


# ----------------------------------------------------------------------------------------- data
def rec_prompt(ds: Dataset, ex: Example, template: int) -> tuple[str, str]:
    return render_rec(ds.index, ex.history, ex.target, template)


def supervise_history(enc: Encoded, first_item_len: int, new_start: int) -> Encoded:
    """Label every history SID token after the first item's: each history item becomes a target given
    the items before it. One row then teaches len(history) next-item steps for the price of one."""
    labels, seen = list(enc.labels), 0
    for j, t in enumerate(enc.input_ids):
        if labels[j] == -100 and t >= new_start:
            seen += 1
            if seen > first_item_len:
                labels[j] = t
    return Encoded(enc.input_ids, labels)


def check_prompt_lengths(ds: Dataset, examples: list[Example], fmt: PromptFormatter, cfg: FinetuneConfig) -> None:
    """Histories (after max_history) must fit the context under every configured template (training
    uses them all, one per example): fail clearly instead of cutting prompts."""
    longest = max(examples, key=lambda ex: sum(len(ds.index[i]) + 1 for i in ex.history))  # SID tokens + separators
    target = max(len(s) for s in ds.index.values()) + 1  # the longest SID + EOS
    n, t = max((len(fmt.prompt_ids(rec_prompt(ds, longest, t)[0])) + target, t) for t in cfg.templates)
    if n > cfg.max_length:
        raise ConfigError(
            f"max_length={cfg.max_length} is too short: user {longest.user}'s history of {len(longest.history)} items "
            f"needs {n} tokens with rec template {t}; raise max_length to at least {n} "
            f"or lower data.max_history={cfg.data.max_history}"
        )


def gather_predictions(local: list[dict]) -> list[dict]:
    """All ranks' predictions, each example once (the DDP sampler pads with repeats)."""
    rows = local
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, local)
        rows = [r for p in parts for r in p]
    seen, out = set(), []
    for r in rows:
        if r["index"] not in seen:
            seen.add(r["index"])
            out.append(r)
    return out


def baselines(ds: Dataset, train_inter: dict, examples: list[Example], ks: list[int], seed: int) -> dict:
    """Most-popular and random item lists scored by the same metric code."""
    from gti.rank.metrics import popularity_ranking, random_ranking

    out = {}
    k = max(ks)
    pop = popularity_ranking(train_inter, k)
    gen = torch.Generator().manual_seed(seed)
    for name in ("popularity", "random"):
        m = RankingMetrics(tuple(ks), sync_on_compute=False)  # computed on rank 0 only
        ranks = []
        for ex in examples:
            items = pop if name == "popularity" else random_ranking(ds.num_items, k, gen)
            ranks.append(rank_of(ex.target, items))
        m.update(torch.tensor([ex.index for ex in examples]), torch.tensor(ranks))
        out[name] = {k2: float(v) for k2, v in m.compute().items()}
    return out
