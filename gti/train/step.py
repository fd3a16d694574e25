"""The training step both stages share: a lean LM loss, divergence checks, compiled forward."""

from __future__ import annotations

from pathlib import Path

import torch

from gti.rank.masks import causal_mask

# config keys under which a causal LM's forward does more than `head(hidden)` + cross-entropy: softcapped
# (Gemma 2/3) or scaled (Cohere, Granite) logits, an MoE router loss. Such models take HF's full path.
FULL_LOSS_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")


def lean_lm_loss(model, batch: dict, decoder=None) -> torch.Tensor:
    """HF's causal-LM loss (transformers' ForCausalLMLoss: fp32 cross-entropy, mean over labelled
    tokens) with the LM head applied only where a label is read (docs/traps.md). Works for a plain
    HF model, a peft-wrapped one and the overlay's NewRowsHead (tied or untied). `decoder`: the
    model's decoder forward compiled (trainer.compile), else the decoder itself."""
    labels = batch["labels"]
    # (N,) labelled positions, position t predicting token t+1, as the loader found them on the host (collate's
    # "predict_at"): no device sync. Without them, nonzero here needs the count N on the host and waits for all work
    # queued on the device (the last step's backward and optimizer); a boolean index of the hidden states would
    # wait again after the forward.
    at = batch.get("predict_at")
    rows, cols = at if at is not None else (labels[:, 1:] != -100).nonzero(as_tuple=True)
    target = labels[:, 1:][rows, cols]  # (N,)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers sit in place
    hidden = (decoder or base.get_decoder())(
        input_ids=batch["input_ids"], attention_mask=causal_mask(base, batch["attention_mask"]), use_cache=False
    ).last_hidden_state  # (B, T, d)
    logits = base.get_output_embeddings()(hidden[rows, cols])  # (N, V), not (B, T, V)
    return torch.nn.functional.cross_entropy(logits.float(), target)


def uses_full_loss(model) -> bool:
    return any(getattr(model.config, k, None) for k in FULL_LOSS_KEYS)


def takes_lean_step(module) -> bool:
    return module.lean_step and not uses_full_loss(module.model)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def compile_mode(t) -> str | None:
    """The mode the training forward is compiled in (trainer.compile_mode), None when trainer.compile is off."""
    return t.compile_mode if t.compile else None


def compile_training_forward(module) -> None:
    """trainer.compile: torch.compile the forward the training step runs (in `module.compile_mode`), the decoder's
    under the lean step, the whole model's otherwise; ranking and generation stay eager (their shapes change
    every step).

    A compiled bound `forward`, not a compiled module: stored on the LightningModule, an `OptimizedModule` would
    become a submodule and every weight would appear twice in its state_dict."""
    model = module.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lean = takes_lean_step(module)
    target = base.get_decoder() if lean else model
    module.compiled_forward = torch.compile(target.forward, mode=module.compile_mode)
    module.compiled_for_lean = lean  # the path it serves: a benchmark that switches lean_step runs the other eager


def unsharded(strategy) -> bool:
    """A single-device or DDP strategy: every process holds whole parameters. Sharded ones (FSDP; DeepSpeed, which
    Lightning derives from DDP) flatten and cast them in their own gather: no bf16-held weights, no fused AdamW."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    return isinstance(strategy, SingleDeviceStrategy | DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)


def start_fit(module) -> None:
    """Both LightningModules' setup("fit"): a frozen backbone held in bf16 under bf16 precision (gti.tokens.overlay.FrozenBf16),
    the training forward compiled (trainer.compile)."""
    if unsharded(module.trainer.strategy):  # sharded strategies want one dtype per flat parameter
        module.frozen_bf16.hold(module.trainer.precision)  # a no-op for full fine-tuning and non-bf16 runs
    if module.compile_mode:
        compile_training_forward(module)


def lm_training_step(module, batch: dict) -> torch.Tensor:
    """Next-token loss of `module.model` on a batch, logged; a NaN/inf loss stops the run (both stages).

    `module.lean_step` (trainer.lean_step) picks the lean loss; false: HF's full-logits forward, for comparisons."""
    model, lean = module.model, takes_lean_step(module)
    compiled = getattr(module, "compiled_forward", None)  # see compile_training_forward
    compiled = compiled if getattr(module, "compiled_for_lean", None) == lean else None
    if compiled is not None and module.compile_mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the graphs may reuse the last step's output memory
    if lean:
        loss = lean_lm_loss(model, batch, compiled)
    else:  # HF's own loss over the full logits
        loss = (compiled or model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    note_divergence(module, loss)
    t, n = module.trainer, module.global_step + 1  # n: optimizer steps once this one is done
    if n % t.log_every_n_steps == 0 or n == t.max_steps or t.is_last_batch:  # and before every checkpoint
        stop_if_diverged(module)
    module.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
    return loss


def note_divergence(module, loss: torch.Tensor) -> None:
    """Keep (step, loss) of the first non-finite loss on the device: no device->host sync per step."""
    first = getattr(module, "_first_bad", None)
    if first is None or first.device != loss.device:
        first = module._first_bad = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=loss.device)
    step = torch.full((), module.global_step, dtype=torch.float64, device=loss.device)  # a fill, not a copy from the host
    now = torch.stack([step, loss.detach().double()])
    first.copy_(torch.where((first[0] < 0) & ~torch.isfinite(now[1]), now, first))


def stop_if_diverged(module) -> None:
    """Raise at logging steps, the last step and before any checkpoint is written, naming the first bad step."""
    first = getattr(module, "_first_bad", None)
    if first is None or first[0] < 0:  # one sync, at this step only
        return
    from gti.core.errors import TrainingError

    ckpt = Path(module.trainer.default_root_dir) / "checkpoints"
    raise TrainingError(
        f"loss is {first[1].item()} at step {int(first[0])}; stopped. "
        f"The last good checkpoint is in {ckpt} (resume=auto continues from it)"
    )
