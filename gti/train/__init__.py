"""Training: prompts and tokenised rows, batching, the shared step and Trainer, the grounding and recommender LightningModules."""
