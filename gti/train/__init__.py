"""Training: the stage skeleton both stages run (stage), prompts and tokenised rows (templates, rows, compose),
resumable batching, the shared step and Trainer, LoRA, the grounding and recommender LightningModules."""
