"""Evaluate checkpoints: perplexity against length (with and without LM-Infinite), passkey
retrieval and generation quality; tables in the terminal, files in the run folder.

    python eval.py ckpt=outputs/<day>/<run>
    python eval.py sweep_dir=multirun/<day>/<time> eval.lm_infinite.enabled=both
    python eval.py ckpt=... eval.length_unit=tokens eval.lengths=[1024,4096]
    python eval.py ckpt=... eval.passkey.enabled=true eval.generation.enabled=true

Outputs: results.json, ppl_vs_length.csv, ppl_vs_length.png, nll_by_position.png (and passkey
heat maps), plus the same tables and figures in W&B.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("BIPE_ROOT", str(ROOT))

log = logging.getLogger("eval")


def evaluate(cfg: DictConfig) -> dict:
    """Run every enabled evaluation; returns the rows written to results.json."""
    import torch

    from evaluation import runner
    from training.job import tidy_lightning_output

    tidy_lightning_output()
    torch.manual_seed(cfg.seed)
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    out = Path(cfg.paths.output_dir)
    models = runner.load_models(cfg, device)
    ppl_rows, by_position = runner.run_perplexity(cfg, models, device, cache_dir)
    passkey_rows = runner.run_passkey(cfg, models, device, cache_dir) \
        if cfg.eval.passkey.enabled else []
    gen_rows = runner.run_generation(cfg, models, device, cache_dir) \
        if cfg.eval.generation.enabled else []
    files = runner.write_outputs(out, cfg, ppl_rows, by_position, passkey_rows, gen_rows, models)
    print(runner.format_ppl_table(ppl_rows))
    for name, rows in (("passkey accuracy", passkey_rows), ("generation quality", gen_rows)):
        if rows:
            print(f"\n{name}")
            for r in rows:
                print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in r.items()))
    print(f"\nresults in {out}")
    runner.log_to_wandb(cfg, out, ppl_rows, passkey_rows, gen_rows, files)
    return {"perplexity": ppl_rows, "passkey": passkey_rows, "generation": gen_rows}


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from training.job import run_job

    run_job(evaluate, cfg)


if __name__ == "__main__":
    main()
