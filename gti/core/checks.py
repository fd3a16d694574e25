"""What is wrong with a config section, checked before any compute, every problem at once (the stages list them
with gti.core.errors.ConfigError.listing)."""

from __future__ import annotations

from gti.core.config import COMPILE_MODES, EVAL_PRECISIONS, EVAL_RANKINGS, EvalConfig, TrainerConfig


def trainer_problems(t: TrainerConfig) -> list[str]:
    """What is wrong with the trainer section, checked before any compute (both training stages)."""
    problems = []
    if t.compile_mode not in COMPILE_MODES:
        problems.append(f"trainer.compile_mode={t.compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if t.checkpoint_every < -1:
        problems.append(f"trainer.checkpoint_every={t.checkpoint_every}: N > 0 (every N steps), 0 (each epoch's end) or -1 (none)")
    if t.pad_to_multiple_of < 1:
        problems.append(f"trainer.pad_to_multiple_of={t.pad_to_multiple_of}: must be >= 1 (1: pad to the longest row)")
    return problems


def eval_problems(ev: EvalConfig) -> list[str]:
    """What is wrong with the eval section, checked before any compute (also by gti.benchmark / gti.protocol)."""
    problems = []
    if ev.num_beams < 1:
        problems.append(f"eval.num_beams={ev.num_beams}: must be >= 1")
    if not ev.ks or min(ev.ks) < 1:
        problems.append(f"eval.ks={list(ev.ks)}: needs one or more cut-offs >= 1")
    elif max(ev.ks) > ev.num_beams and ev.ranking == "beam":
        k = max(ev.ks)
        problems.append(
            f"eval.ks: K={k} exceeds eval.num_beams={ev.num_beams}; beam search returns at most num_beams "
            f"items, so Recall@{k} would be capped; raise eval.num_beams to >= {k}"
        )
    if ev.precision not in EVAL_PRECISIONS:
        problems.append(f"eval.precision={ev.precision!r}: choose one of {', '.join(EVAL_PRECISIONS)}")
    if ev.ranking not in EVAL_RANKINGS:
        problems.append(f"eval.ranking={ev.ranking!r}: choose one of {', '.join(EVAL_RANKINGS)}")
    if ev.exact_check_users < 0:
        problems.append(f"eval.exact_check_users={ev.exact_check_users}: must be >= 0 (0: no check)")
    return problems
