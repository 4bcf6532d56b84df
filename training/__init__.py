"""Training: the LightningModule, config validation, checkpoints, logging, length evaluation.

Modules (import the one you need; this package imports nothing itself, so `train.py` stays
quick to report config errors):

* `module`: `LanguageModel`, next-token loss, AdamW groups, per-batch dropout seeding.
* `schedule`: `lr_multiplier` (warmup, then cosine / linear / polynomial / constant decay).
* `schema`: `validate_config`, typed `OptimConfig` / `EvalConfig`.
* `checkpoint`: atomic writes, `load_checkpoint`, `build_model_from_checkpoint`, `load_weights`.
* `resume`: checks that a checkpoint fits the config a run resumes it with.
* `builders`: config nodes -> model config, data module, callbacks, logger, trainer.
* `wandb_logger`, `throughput`, `length_eval`, `job` (error reporting, W&B closing).
"""
