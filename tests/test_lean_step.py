"""The lean step (LM head and loss at labelled positions only) trains exactly like HF's full-logits loss
(docs/traps.md): same loss, same gradients, for the overlay's new rows (tied and untied), full
fine-tuning and LoRA; and a NaN still stops the run, naming its step, although the guard checks only at
logging steps."""

import pytest
import torch
from fixtures import write_toy_dataset
from torch.utils._python_dispatch import TorchDispatchMode

from gti.core.config import DataConfig, FinetuneConfig, GroundConfig, LoraConfig, OptimConfig, TrainerConfig
from gti.tokens.vocab import NewTokens
from gti.train.step import lean_lm_loss, uses_full_loss

N_NEW = 6


def batch(tokenizer, start: int) -> dict:
    """(3, T) rows of real text and new ids, right-padded; labels on the answer part only, as the stages build them."""
    rows = []
    for k, text in enumerate(["Toy Story (1995)", "A heist film set in Los Angeles", "Which movie is this?"]):
        prompt = tokenizer(text)["input_ids"]
        answer = [start + (k + j) % N_NEW for j in range(3)] + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows) + 2  # every row has padding
    out = {
        k: torch.full((len(rows), width), v, dtype=torch.long)
        for k, v in [("input_ids", 2), ("attention_mask", 0), ("labels", -100)]
    }
    for i, (ids, labels) in enumerate(rows):
        out["input_ids"][i, : len(ids)] = torch.tensor(ids)
        out["attention_mask"][i, : len(ids)] = 1
        out["labels"][i, : len(ids)] = torch.tensor(labels)
    out["labels"][0, 1] = out["input_ids"][0, 1]  # a labelled prompt token too (history loss)
    return out


def losses_and_grads(model, b: dict):
    """(loss, grads of the trainable parameters) of the full-logits HF loss and of the lean one."""
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(**b).loss
    lean = lean_lm_loss(model, b)
    return (full, torch.autograd.grad(full, params)), (lean, torch.autograd.grad(lean, params))


def assert_same(model, b: dict):
    (full, g_full), (lean, g_lean) = losses_and_grads(model, b)
    torch.testing.assert_close(lean, full, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in g_full)
    for a, e in zip(g_lean, g_full):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


def tiny(tokenizer, tied: bool):
    from gti.testing import make_tiny_llama

    model = make_tiny_llama(len(tokenizer) + N_NEW, tied=tied)
    return model, NewTokens([f"<a_{i}>" for i in range(N_NEW)], len(tokenizer), [["x"]] * N_NEW)


@pytest.mark.parametrize("tied", [True, False])
def test_grounding_new_rows(tokenizer, tied):
    from gti.tokens.overlay import NewRowsHead
    from gti.train.grounding import GroundingModule

    model, new = tiny(tokenizer, tied)
    GroundingModule(model, new, lr=1e-3, weight_decay=0.0, warmup_steps=0)  # installs the overlay, model.train()
    assert isinstance(model.get_output_embeddings(), NewRowsHead)
    assert len([p for p in model.parameters() if p.requires_grad]) == (1 if tied else 2)
    assert_same(model, batch(tokenizer, new.start))


@pytest.mark.parametrize("tied", [True, False])
def test_full_finetuning(tokenizer, tied):
    model, new = tiny(tokenizer, tied)
    model.train()
    assert_same(model, batch(tokenizer, new.start))


def test_lora(tokenizer):
    from gti.train.lora import apply_lora

    model, new = tiny(tokenizer, tied=True)
    model = apply_lora(model, FinetuneConfig(lora=LoraConfig(enabled=True, dropout=0.0)), new)
    model.train()
    with torch.no_grad():  # lora_B starts at zero: give the adapters a real effect on the forward
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    assert_same(model, batch(tokenizer, new.start))


def test_the_step_reads_the_positions_the_loader_found(tokenizer):
    """collate's "predict_at" (found on the host, no device sync) is what the lean loss reads: the same loss as
    finding them itself, and a loss over only the positions given when it gives fewer."""
    model, new = tiny(tokenizer, tied=True)
    b = batch(tokenizer, new.start)
    at = (b["labels"][:, 1:] != -100).nonzero().T
    torch.testing.assert_close(lean_lm_loss(model, {**b, "predict_at": at}), lean_lm_loss(model, b), atol=0, rtol=0)
    first_row = at[:, at[0] == 0]
    only_first = b["labels"].clone()
    only_first[1:] = -100
    torch.testing.assert_close(lean_lm_loss(model, {**b, "predict_at": first_row}), model(**{**b, "labels": only_first}).loss)


class HostReads(TorchDispatchMode):
    """The ops run meanwhile that hand a value back to the host (.item(), a tensor in an `if`, nonzero, a boolean
    index): on a GPU, each makes the host wait until the device has finished everything queued before it."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "_unique2", "unique_consecutive"}

    def __enter__(self):
        self.ops = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.READS:
            self.ops.append(name)
        elif name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.ops.append("boolean index")
        return func(*args, **(kwargs or {}))


def test_host_reads_sees_what_makes_a_device_wait():
    x = torch.arange(6.0)
    with HostReads() as reads:
        x.sum().item(), x[x > 2], (x > 2).nonzero(), bool(x.any())
    assert reads.ops == ["_local_scalar_dense", "boolean index", "nonzero", "_local_scalar_dense"]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_lean_step_never_waits_for_the_device(tokenizer, attention):
    """A padded batch's lean step, forward and backward, reads nothing back from the device. transformers' own mask
    builder asks whether the batch has any padding (`mask.all()` read on the host) twice a forward; `causal_mask`
    builds the same mask without asking. Loss and gradients stay HF's, under either attention."""
    model, new = tiny(tokenizer, tied=True)
    model.config._attn_implementation = attention
    model.train()
    b = batch(tokenizer, new.start)
    b["predict_at"] = (b["labels"][:, 1:] != -100).nonzero().T  # as collate finds them, on the host
    with HostReads() as reads:
        lean_lm_loss(model, b).backward()
    assert reads.ops == []
    model.zero_grad()
    assert_same(model, b)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_built_mask_gives_transformers_loss_bit_for_bit(tokenizer, attention):
    """`causal_mask` is the mask transformers would build: the lean loss and gradients with it equal, bit for bit,
    those with the (B, T) mask handed to transformers (fp32)."""
    import gti.train.step as step

    model, new = tiny(tokenizer, tied=False)
    model.config._attn_implementation = attention
    model.train()
    b = batch(tokenizer, new.start)
    params = [p for p in model.parameters() if p.requires_grad]
    built = lean_lm_loss(model, b)
    g_built = torch.autograd.grad(built, params)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step, "causal_mask", lambda _model, mask: mask)
        handed = lean_lm_loss(model, b)
    g_handed = torch.autograd.grad(handed, params)
    assert torch.equal(built, handed)
    assert all(torch.equal(a, e) for a, e in zip(g_built, g_handed))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_blank_rows_leave_loss_and_gradients_as_they_were(tokenizer, attention):
    """Under trainer.compile a short batch is filled with blank rows (one attended pad token, no label; collate's
    fill_to): the lean loss and the gradients are those of the real rows alone."""
    model, new = tiny(tokenizer, tied=True)
    model.config._attn_implementation = attention
    model.train()
    b = batch(tokenizer, new.start)
    blank = {"input_ids": 2, "attention_mask": 0, "labels": -100}
    filled = {k: torch.cat([v, torch.full((2, v.shape[1]), blank[k])]) for k, v in b.items()}
    filled["attention_mask"][3:, 0] = 1
    params = [p for p in model.parameters() if p.requires_grad]
    alone, with_blanks = lean_lm_loss(model, b), lean_lm_loss(model, filled)
    torch.testing.assert_close(with_blanks, alone)
    for a, e in zip(torch.autograd.grad(with_blanks, params), torch.autograd.grad(alone, params)):
        torch.testing.assert_close(a, e)


def test_a_model_that_reads_the_2d_mask_keeps_it(tokenizer):
    """OPT computes its learned positions from the (B, T) mask: it is not in TAKES_4D_MASK, gets the (B, T) mask,
    and its lean loss and gradients are HF's."""
    from transformers import OPTConfig, OPTForCausalLM

    from gti.rank.masks import TAKES_4D_MASK, causal_mask

    cfg = OPTConfig(vocab_size=len(tokenizer) + N_NEW, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=None,
                    dropout=0.0, attention_dropout=0.0, layerdrop=0.0)  # fmt: skip
    model = OPTForCausalLM(cfg).train()
    b = batch(tokenizer, len(tokenizer))
    assert cfg.model_type not in TAKES_4D_MASK
    assert causal_mask(model, b["attention_mask"]) is b["attention_mask"]
    assert_same(model, b)


def test_softcapped_models_take_the_full_path(tokenizer):
    model, _ = tiny(tokenizer, tied=True)
    assert not uses_full_loss(model)
    model.config.final_logit_softcapping = 30.0  # Gemma 2: the head's logits are capped before the loss
    assert uses_full_loss(model)


@pytest.mark.parametrize("lean_step", [True, False])
def test_nan_found_at_a_logging_step_names_the_first_bad_step(tmp_path, tiny_model_dir, monkeypatch, lean_step):
    from transformers import LlamaModel

    from gti.core.errors import TrainingError
    from gti.ground import run

    forward, calls = LlamaModel.forward, []

    def diverging(self, *args, **kwargs):  # the third training step's loss is NaN, then the weights are
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.last_hidden_state = out.last_hidden_state * float("nan")
        return out

    monkeypatch.setattr(LlamaModel, "forward", diverging)
    write_toy_dataset(tmp_path / "data")
    cfg = GroundConfig(
        model=tiny_model_dir, data=DataConfig(name="toy", root=str(tmp_path / "data")), optim=OptimConfig(batch_size=2),
        trainer=TrainerConfig(max_steps=20, accelerator="cpu", log_every_n_steps=6, lean_step=lean_step),
        output_dir=str(tmp_path / "g"), diagnostics=False,
    )  # fmt: skip
    with pytest.raises(TrainingError, match=r"loss is nan at step 2; stopped"):
        run(cfg)
    assert len(calls) == 6  # checked at the 6th step (a logging step), not before
