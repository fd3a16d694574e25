"""Typed stage configs: dataclass schemas + YAML + `key=value` overrides (OmegaConf, no Hydra).

Every problem (unknown key, wrong type, missing required `???` value) is collected and reported in
one `ConfigError` before any compute starts.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gti.core.errors import ConfigError

T = TypeVar("T")


# ----------------------------------------------------------------------------------------- shared
@dataclass
class DataConfig:
    name: str = "ml-100k"  # dataset folder under `root` (prepared on demand for ml-100k / ml-1m)
    root: str = "data"  # folder holding one folder per dataset
    max_history: int = 20  # history truncated to the last N items
    max_items: int = 0  # >0: keep only users whose items are all among the first N item ids (whole users, demo)
    max_users: int = 0  # >0: keep the first N users (demo / smoke runs)


@dataclass
class TrainerConfig:
    max_epochs: int = 1  # passes over the training rows, when max_steps is -1
    max_steps: int = -1  # -1: run max_epochs; > 0: this many steps, over as many epochs as they take
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: int = 1  # devices per machine (GPUs, or CPU processes)
    strategy: str = "auto"  # auto -> "ddp" when devices > 1 or num_nodes > 1; or ddp_spawn, fsdp, ...
    # 32-true | bf16-mixed | bf16-true | ...; in bf16, a frozen backbone (grounding, LoRA) is held in bf16 during fit
    # and its exact weights put back for ranking and saving (gti.tokens.overlay.FrozenBf16)
    precision: str = "32-true"
    accumulate_grad_batches: int = 1  # batches per optimizer step
    gradient_clip_val: float = 1.0  # clip the gradient norm to this (0: no clipping)
    log_every_n_steps: int = 5  # logging and progress-bar refresh interval
    val_check_interval: float = 1.0  # validation during fit: a fraction of an epoch (<= 1) or every N batches (> 1)
    num_workers: int = 0  # DataLoader worker processes (rows are pre-tokenised: 0 is usually enough)
    # checkpoints/last.ckpt, what resume=auto continues from: written at each epoch's end, and every N steps when > 0;
    # -1: none (a short run that would repeat rather than resume)
    checkpoint_every: int = 0
    lean_step: bool = True  # LM head and loss at labelled positions only; false: the full-logits HF loss, for comparisons
    # rows of similar length batched together (sorted within ~50 batches, batch order shuffled): less padding
    group_by_length: bool = True
    compile: bool = False  # torch.compile the training forward (the decoder's under lean_step); compiling costs minutes up front
    # torch.compile's mode under compile=true: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs.
    # reduce-overhead replays the step as CUDA graphs (CUDA only): no launch cost per kernel, one graph recorded per
    # batch width, so pair it with pad_to_multiple_of (e.g. 64)
    compile_mode: str = "default"
    pad_to_multiple_of: int = 1  # training batches padded to a multiple of this width (>1: fewer distinct shapes)
    num_nodes: int = 1  # machines for DDP, `devices` each (started by torchrun / SLURM on every node)
    threads: int = 0  # >0: torch CPU threads per process, for several runs sharing one machine; 0: torch's default


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    batch_size: int = 16  # rows per batch on each device


# ----------------------------------------------------------------------------------------- stages
@dataclass
class PrepareConfig:
    dataset: str = "ml-100k"  # ml-100k | ml-1m | recbole | amazon2014 | amazon2018 | amazon2023 | p5 | minionerec | lcrec
    source: str | None = None  # folder/file with the raw files; None -> packaged copy (MovieLens)
    category: str | None = None  # Amazon category, e.g. Beauty
    name: str | None = None  # output dataset name; None -> derived from dataset/category
    root: str = "data"  # where data/NAME/ is written
    kcore: int = 5  # keep users and items with at least this many interactions (repeated until stable)
    overwrite: bool = False  # true: rebuild data/NAME even when it exists


@dataclass
class SidsConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: str = "minilm"  # minilm | backbone (the LM's mean-pooled hidden states) | a local path
    model: str = "smollm2-135m"  # backbone used when encoder=backbone
    quantizer: str = "rqkmeans"  # rqkmeans | rqvae
    levels: int = 3  # residual quantisation levels before the dedup level
    codes: int = 32  # codes per level (paper: 4 x 256; small catalogues want fewer)
    seed: int = 0  # k-means / RQ-VAE seed
    kmeans_iters: int = 50  # Lloyd iterations per level (rqkmeans)
    kmeans_balanced: bool = True  # Sinkhorn-balanced cluster sizes (fewer SID collisions); false: plain Lloyd
    embed_batch_size: int = 64  # texts per encoder batch
    embed_max_length: int = 128  # encoder=backbone: tokens kept per item text
    rqvae_code_dim: int = 32  # RQ-VAE code width
    rqvae_hidden: int = 256  # RQ-VAE encoder/decoder hidden width
    rqvae_epochs: int = 100  # RQ-VAE training epochs
    rqvae_lr: float = 1e-3  # RQ-VAE learning rate
    rqvae_batch_size: int = 256  # RQ-VAE batch size
    rqvae_beta: float = 0.25  # commitment weight
    rqvae_balance: float = 0.1  # balanced-usage regulariser weight
    rqvae_accelerator: str = "cpu"  # cpu | gpu | auto (the RQ-VAE is small: CPU is the default)
    import_index: str | None = None  # an existing NAME.index.json to validate / repair
    repair: bool = True  # imported index with collisions: append the dedup level (else error)
    force: bool = False  # rebuild even when inputs are unchanged


@dataclass
class GroundStageConfig:
    templates: list[str] = field(  # grounding tasks, by name (gti.train.templates.GROUNDING_TEMPLATES); both directions by default
        default_factory=lambda: ["title2sid", "desc2sid", "both2sid", "sid2title", "sid2desc", "sid2both"]
    )
    unfreeze_steps: int = 0  # optional second phase: unfreeze everything for N steps (paper §4.1)
    unfreeze_lr: float = 1e-5  # learning rate of the optional second phase (unfreeze_steps > 0)


@dataclass
class GroundConfig:
    model: str = "smollm2-135m"  # base LM: smollm2-135m (packaged) or a local HF folder
    data: DataConfig = field(default_factory=DataConfig)
    sids: SidsConfig = field(default_factory=SidsConfig)
    tokens_file: str | None = None  # tokens.jsonl of {"token", "description"} to add and ground
    init: str = "mean"  # starting point for grounding: zero | random | mean | mean_cov | subword | description | ...
    init_options: dict[str, Any] = field(default_factory=dict)  # options of the init strategy, e.g. {k: 8} for topk (docs/method.md lists them)
    ground: GroundStageConfig = field(default_factory=GroundStageConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=10))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=100))  # CPU demo scale
    max_length: int = 64  # tokens per grounding row; longer item text is shortened, never the SID or the frame
    output_dir: str = "runs/ground"  # run folder (built in <output_dir>.partial/, renamed when complete)
    seed: int = 0
    resume: str = "never"  # never | auto
    diagnostics: bool = True  # spectra, effective rank, cosine maps and RSA of the new rows before and after grounding


EVAL_PRECISIONS = ("fp32", "tf32", "bf16")  # EvalConfig.precision
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # TrainerConfig.compile_mode
EVAL_RANKINGS = ("beam", "exact")  # EvalConfig.ranking


@dataclass
class EvalConfig:
    num_beams: int = 20  # beam width of the trie-constrained search; also the longest list returned
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20])  # cut-offs K of Recall@K and NDCG@K (each <= num_beams)
    batch_size: int = 16  # prompts ranked at once
    max_users: int = 0  # >0: evaluate the first N users only (CPU demos)
    valid: bool = True  # false: skip the validation split (test only; e.g. benchmark cells)
    # ranking arithmetic, whatever trainer.precision is: fp32 (default; bf16 logits reorder close beams,
    # docs/traps.md) | tf32 (fp32 with TF32 matmuls on GPUs that have them: several times fp32's speed there,
    # near-fp32 ranks; elsewhere fp32) | bf16 (bf16 autocast: faster on GPUs, approximate ranks). In metrics.json.
    precision: str = "fp32"
    # beam: trie-constrained beam search (num_beams) | exact: every item of the catalogue ranked by its log-prob
    # of SID + EOS (one decoded token per trie node and user: ~30x the beam's work on ML-100K; gti.rank.exact)
    ranking: str = "beam"
    # >0: after the test evaluation, rank the first N test users both ways (exact top-10) and record in
    # metrics.json "beam_vs_exact" how often the beam's top-10 is the exact one, and both Recall/NDCG@10
    exact_check_users: int = 0


@dataclass
class LoraConfig:
    # enabled: LoRA on q/k/v/o/gate/up/down_proj, plus the new SID rows of embedding and head trained
    # through the grounding overlay (one table when tied, so the model stays tied); old rows and
    # everything else frozen. Not peft modules_to_save, which unties a tied model (docs/traps.md).
    enabled: bool = False
    r: int = 8  # LoRA rank
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the LoRA path


@dataclass
class FinetuneConfig:
    init_from: str | None = None  # a gti.ground run folder; None -> extend `model` with `init`
    model: str = "smollm2-135m"
    data: DataConfig = field(default_factory=DataConfig)
    sids: SidsConfig = field(default_factory=SidsConfig)
    init: str = "mean"  # init strategy of the new rows when init_from is not set (gti.tokens.init_strategies)
    init_options: dict[str, Any] = field(default_factory=dict)
    templates: list[int] = field(default_factory=lambda: [0, 1, 2])  # the paper's three rec templates
    multitask: bool = False  # mix in the text<->SID grounding tasks (LC-Rec multi-task baseline)
    train_per_user: int = 0  # >0: keep only each user's last N training prefixes (CPU-scale runs)
    history_loss: bool = False  # also supervise each history SID from the items before it (see recommender.py)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.01, batch_size=8))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    max_length: int = 128
    output_dir: str = "runs/finetune"
    seed: int = 0
    resume: str = "never"  # never | auto: continue from <output_dir>.partial/checkpoints/last.ckpt


@dataclass
class SasrecConfig:
    """SASRec (Kang & McAuley 2018) trained with a full-softmax loss: the ID-based reference (`python -m gti.sasrec`)."""

    # the LM stages' dataset and leave-one-out split; max_history is also SASRec's sequence length (positions)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_history=50))
    hidden: int = 64  # item embedding and model width
    blocks: int = 2  # self-attention blocks (pre-LN)
    heads: int = 1  # attention heads; hidden must be a multiple of it
    dropout: float = 0.2  # on embeddings, attention weights, residual branches and inside the FFN
    # Adam (betas 0.9, 0.98) at a constant lr; batch_size: training windows per batch; warmup_steps is not used
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, batch_size=128, warmup_steps=0))
    patience: int = 10  # early stopping: epochs without a better validation `monitor` (trainer.max_epochs: the cap)
    monitor: str = "ndcg@10"  # validation metric for early stopping and the restored best checkpoint; K must be in eval.ks
    # max_epochs caps training; no gradient clipping by default (the paper's recipe); threads=1 to share a machine;
    # checkpoint_every is not read (checkpoints/last.ckpt is written at every epoch's end)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_epochs=200, gradient_clip_val=0.0))
    # ks, batch_size, max_users and valid apply (false: no early stopping, the last epoch is tested); ranking
    # scores the whole catalogue, so num_beams and precision (beam search settings) are not used
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(ks=[5, 10, 20], batch_size=256))
    output_dir: str = "runs/sasrec"
    seed: int = 0
    resume: str = "never"  # never | auto: continue after the last finished epoch in <output_dir>.partial/checkpoints/


# ----------------------------------------------------------------------------------------- loading
# sections a stage carries but never reads: ground and finetune build SIDs for their own `data`, so the nested
# `sids.data` (gti.sids's own dataset section) is ignored there; setting it to anything else is an error
NOT_READ = "sids.data"


def not_read(key: str) -> str | None:
    """For a key inside a NOT_READ section, the key that decides it instead ("sids.data.name" -> "data.name")."""
    dotted = f".{key}."
    if f".{NOT_READ}." not in dotted:
        return None
    return dotted.replace(f".{NOT_READ}.", ".data.", 1).strip(".")


def flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """A nested config dict as (dotted key, value) pairs; `*_options` dicts stay whole values."""
    if isinstance(d, dict) and d:
        out = []
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            # dict-typed fields (init_options) take a whole dict: only descend into sub-configs
            out.extend(flatten(v, key) if isinstance(v, dict) and not key.endswith("_options") else [(key, v)])
        return out
    return [(prefix, d)]


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"expected key=value, got '{item}'")
    key, raw = item.split("=", 1)
    parsed = OmegaConf.from_dotlist([f"x={raw}"]).x if raw != "" else ""
    return key.strip(), parsed


def load_config(schema: type[T], argv: list[str] | None = None, yaml_path: str | None = None) -> T:
    """Schema defaults <- YAML file <- `key=value` overrides; validated all at once."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].count("=") and argv[0].endswith((".yaml", ".yml")):
        yaml_path = argv.pop(0)
    problems: list[str] = []
    cfg: DictConfig = OmegaConf.structured(schema)
    pairs: list[tuple[str, Any, str]] = []
    if yaml_path is not None:
        if not Path(yaml_path).is_file():
            raise ConfigError(f"config file not found: {yaml_path}")
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(yaml_path)) or {}
        except Exception as e:  # yaml syntax errors carry the line
            raise ConfigError(f"{yaml_path}: cannot parse YAML: {e}") from None
        pairs += [(k, v, yaml_path) for k, v in flatten(loaded)]
    for item in argv:
        try:
            k, v = _parse_override(item)
        except ConfigError as e:
            problems.append(str(e))
            continue
        pairs.append((k, v, "command line"))
    for key, value, origin in pairs:
        try:
            # merging one key at a time lets us collect every bad key instead of the first
            OmegaConf.update(cfg, key, value, merge=True, force_add=False)
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            if "Key" in msg and "not in" in msg or "Could not" in msg and "not" in msg:
                problems.append(f"unknown key '{key}' ({origin})" + _suggest(schema, key))
            else:
                problems.append(f"bad value for '{key}' ({origin}): {value!r}: {msg}")
    default = OmegaConf.structured(schema)
    for key, value, origin in pairs:  # a value the stage would ignore: fine when it changes nothing, else an error
        instead = not_read(key)
        if instead and value not in (OmegaConf.select(default, key), OmegaConf.select(cfg, instead)):
            problems.append(f"'{key}' ({origin}) is not read: this stage builds its SIDs for its own data; set '{instead}'")
    missing = sorted(OmegaConf.missing_keys(cfg))
    problems += [f"missing required value '{k}'" for k in missing]
    if problems:
        raise ConfigError.listing(problems)
    mirror_not_read(cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def mirror_not_read(node: Any) -> None:
    """Every NOT_READ section set to the section that decides it (sids.data <- data), at any depth: a printed or
    saved config then shows the data a stage used, not the schema's default (ml-100k on an ML-1M run)."""
    if not isinstance(node, DictConfig):
        return
    sids = node.get("sids") if "sids" in node else None
    if "data" in node and isinstance(sids, DictConfig) and "data" in sids:
        sids.data = node.data
    for key in node:
        mirror_not_read(node[key])


def _suggest(schema: type, key: str) -> str:
    import difflib

    known = [k for k, _ in flatten(OmegaConf.to_container(OmegaConf.structured(schema)))]
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


__all__ = [
    "MISSING",
    "DataConfig",
    "TrainerConfig",
    "OptimConfig",
    "PrepareConfig",
    "SidsConfig",
    "GroundConfig",
    "FinetuneConfig",
    "EvalConfig",
    "SasrecConfig",
    "load_config",
    "to_dict",
    "to_yaml",
    "flatten",
]
