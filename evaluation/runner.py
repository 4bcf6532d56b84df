"""`eval.py`'s work: the checks, then each stage (perplexity, passkey, generation), the outputs.

Each checkpoint carries its model config, tokenizer and data statistics, so nothing else is
needed (`evaluation.checkpoints`); a dataset is the checkpoint's own corpus or another one
(`evaluation.streams`). Every length scores the same first `max_tokens` tokens of a stream, so
the rows of one dataset are comparable.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bipe.attention import AttentionOptions, LMInfinite
from bipe.errors import BipeError, ConfigError, first_line
from bipe.io import atomic_write_json, atomic_write_text
from evaluation.checkpoints import LoadedModel, load_models
from evaluation.config import validate_eval_config
from evaluation.generation_quality import generation_quality
from evaluation.passkey import passkey_accuracy
from evaluation.perplexity import describe_row, format_ppl_table, perplexity_rows, summarize_ppl
from evaluation.plots import plot_nll_by_position, plot_passkey_heatmap, plot_ppl_vs_length
from evaluation.stats import Spread
from evaluation.streams import load_stream
from evaluation.wandb_runs import eval_group, resolve_mode
from models.checkpoint import relative_training_range

log = logging.getLogger(__name__)


def resolve_lengths(values: list[int | float], unit: str, train_length: int) -> list[int]:
    if unit == "multiple":
        return [int(round(v * train_length)) for v in values]
    if unit == "tokens":
        return [int(v) for v in values]
    raise ConfigError(f"eval.length_unit={unit!r} is unknown; choose 'multiple' or 'tokens'")


def lm_infinite_settings(cfg: DictConfig, lm: LoadedModel) -> LMInfinite | None:
    """LM-Infinite for this model; None for encodings without a relative part."""
    if not lm.has_relative:
        return None
    li = cfg.eval.lm_infinite
    cap = li.distance_cap
    if cap is None:  # the pretraining range of the relative index
        cap = relative_training_range(lm.meta)
    return LMInfinite(n_global=int(li.n_global),
                      n_local=int(li.n_local or lm.train_length), distance_cap=int(cap))


def _modes(setting: Any) -> list[bool]:
    if setting in ("both", "Both"):
        return [False, True]
    if isinstance(setting, bool):
        return [setting]
    raise ConfigError(f"eval.lm_infinite.enabled={setting!r}: choose true, false or both")


def attention_variants(cfg: DictConfig, lm: LoadedModel) -> Iterator[tuple[str, bool]]:
    """Yield `(suffix, uses_lm_infinite)` with `lm.model.attention` set for each requested
    variant (plain: suffix "", LM-Infinite: "+lminf"); the plain setting is restored after."""
    try:
        for use_lmi in _modes(cfg.eval.lm_infinite.enabled):
            lmi = lm_infinite_settings(cfg, lm) if use_lmi else None
            if use_lmi and lmi is None:
                log.info("%s has no relative encoding: LM-Infinite does not apply", lm.label)
                continue
            lm.model.attention = AttentionOptions(chunk_size=cfg.eval.chunk_size,
                                                  lm_infinite=lmi)
            yield ("+lminf" if use_lmi else ""), use_lmi
    finally:
        lm.model.attention = AttentionOptions()


def run_perplexity(cfg: DictConfig, models: list[LoadedModel], device: torch.device,
                   cache_dir: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Perplexity rows of every model, dataset, attention variant and length (the seeds of a
    group summed into one NLL-by-position curve at the longest length)."""
    e = cfg.eval
    autocast = torch.bfloat16 if str(e.precision) in ("bf16", "bf16-mixed") else None
    rows, by_position = [], {}
    for lm in models:
        lengths = resolve_lengths(list(e.lengths), e.length_unit, lm.train_length)
        for dataset in e.datasets:
            ids, boundary, _ = load_stream(lm, dataset, e.split, e.max_tokens, cache_dir)
            for suffix, use_lmi in attention_variants(cfg, lm):
                tag = lm.label + suffix
                base = {"model": tag, "group": lm.group + suffix, "seed": lm.seed,
                        "pe": lm.pe_name, "checkpoint": str(lm.path), "dataset": dataset,
                        "split": e.split, "lm_infinite": use_lmi}
                log.info("perplexity: %s on %s (%s split) at %s tokens", tag, dataset, e.split,
                         ", ".join(map(str, lengths)))
                new, longest = perplexity_rows(
                    lm.model, ids, boundary, lengths, base=base, protocol=e.protocol,
                    stride=e.stride, batch_tokens=int(e.batch_tokens), device=device,
                    autocast_dtype=autocast, track_memory=True, train_length=lm.train_length,
                    on_row=functools.partial(log_ppl_row, tag, dataset))
                rows += new
                if e.protocol == "blocks" and longest is not None:
                    # Summed over the seeds of a group: one curve per group.
                    key = f"{lm.group}{suffix} [{dataset}]"
                    sums, counts = by_position.get(key, (0.0, 0))
                    by_position[key] = (sums + longest.nll_by_position,
                                        counts + longest.count_by_position)
    return rows, {k: s / np.maximum(c, 1) for k, (s, c) in by_position.items()}


def log_ppl_row(tag: str, dataset: str, row: dict[str, Any]) -> None:
    """A progress line per model, dataset and length as soon as the length is done (a long
    evaluation followed in eval.log or a redirected stdout)."""
    memory = f", {row.get('peak_mib', 0.0):.0f} MiB" if row.get("ppl") is not None else ""
    log.info("%-18s %-12s %s%s", tag, dataset, describe_row(row), memory)


def run_passkey(cfg: DictConfig, models: list[LoadedModel], device: torch.device,
                cache_dir: Path) -> list[dict]:
    p = cfg.eval.passkey
    rows = []
    for lm in models:
        lengths = resolve_lengths(list(p.lengths), cfg.eval.length_unit, lm.train_length)
        _, _, seps = load_stream(lm, cfg.eval.datasets[0], cfg.eval.split, cfg.eval.max_tokens,
                                 cache_dir)
        for suffix, _ in attention_variants(cfg, lm):
            tag = lm.label + suffix
            for length in lengths:  # a length this model cannot run is a row, not a crash
                t0 = time.perf_counter()
                try:
                    found = passkey_accuracy(lm.model, lm.tokenizer, [length], list(p.depths),
                                             trials=p.trials, seed=cfg.seed, separator_ids=seps,
                                             device=device)
                except (BipeError, ValueError) as exc:
                    found = [{"length": length, "depth": d, "trials": 0, "accuracy": None,
                              "note": first_line(exc)} for d in p.depths]
                scored = [r["accuracy"] for r in found if r["accuracy"] is not None]
                accuracy = (f"{100 * sum(scored) / len(scored):.0f}% at {len(scored)} depths"
                            if scored else f"n/a ({found[0].get('note', 'not measured')})")
                log.info("passkey: %-18s len %6d  accuracy %s (%.1fs)", tag, length, accuracy,
                         time.perf_counter() - t0)
                rows += [{"model": tag, **row} for row in found]
    return rows


def run_generation(cfg: DictConfig, models: list[LoadedModel], device: torch.device,
                   cache_dir: Path) -> list[dict]:
    g = cfg.eval.generation
    rows = []
    for lm in models:
        prefixes = resolve_lengths(list(g.prefix_lengths), cfg.eval.length_unit, lm.train_length)
        for dataset in cfg.eval.datasets:
            need = max(prefixes) + g.new_tokens
            ids, boundary, seps = load_stream(lm, dataset, cfg.eval.split,
                                              max(cfg.eval.max_tokens or 0, need), cache_dir)
            for suffix, _ in attention_variants(cfg, lm):
                tag = lm.label + suffix
                found = []
                for prefix in prefixes:  # a length this model cannot run is a row, not a crash
                    t0 = time.perf_counter()
                    try:
                        found += generation_quality(
                            lm.model, lm.tokenizer, ids, boundary, [prefix],
                            new_tokens=g.new_tokens, samples=g.samples, separator_ids=seps,
                            device=device)
                    except (BipeError, ValueError) as exc:
                        found.append({"prefix": prefix, "samples": 0, "bleu": None,
                                      "note": first_line(exc)})
                    bleu = found[-1].get("bleu")
                    log.info("generation: %-18s %-12s prefix %6d  bleu %s (%.1fs)", tag, dataset,
                             prefix, f"n/a ({found[-1].get('note', 'not measured')})"
                             if bleu is None else f"{bleu:.3g}", time.perf_counter() - t0)
                for row in found:
                    rows.append({"model": tag, "dataset": dataset, **row})
    return rows


def write_outputs(out: Path, cfg: DictConfig, ppl_rows: list[dict],
                  by_position: dict[str, np.ndarray], passkey_rows: list[dict],
                  gen_rows: list[dict], models: list[LoadedModel]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    train_lengths = {r["train_length"] for r in ppl_rows}
    mark = train_lengths.pop() if len(train_lengths) == 1 else None  # one marker if shared
    results = {
        "models": [{"label": m.label, "checkpoint": str(m.path), "pe": m.pe_name,
                    "train_length": m.train_length,
                    "max_segments_per_block": m.meta["data_stats"].get("max_segments_per_block"),
                    "global_step": m.meta.get("global_step")} for m in models],
        "config": OmegaConf.to_container(cfg.eval, resolve=True),
        "perplexity": ppl_rows, "perplexity_summary": summarize_ppl(ppl_rows),
        "passkey": passkey_rows, "generation": gen_rows,
    }
    files["results"] = atomic_write_json(out / "results.json", results)
    if ppl_rows:
        cols = ["model", "group", "seed", "pe", "dataset", "lm_infinite", "length", "multiple",
                "train_length", "tokens", "nll", "ppl", "seconds", "peak_mib", "checkpoint"]
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(ppl_rows)
        files["csv"] = atomic_write_text(out / "ppl_vs_length.csv", text.getvalue())
        summary = summarize_ppl(ppl_rows)
        for dataset in dict.fromkeys(r["dataset"] for r in ppl_rows):
            curves: dict[str, list[tuple[int, Spread]]] = {}
            for r in summary:
                if r["dataset"] == dataset and r["ppl_mean"] is not None:
                    curves.setdefault(r["group"], []).append((r["length"], Spread(
                        r["ppl_mean"], r["ppl_std"], r["ppl_ci95"], r["ppl_n"], r["ppl_min"],
                        r["ppl_max"])))
            name = "ppl_vs_length.png" if dataset == cfg.eval.datasets[0] else \
                f"ppl_vs_length_{dataset}.png"
            files[name] = plot_ppl_vs_length(curves, mark, out / name,
                                             title=f"Perplexity against length ({dataset})")
    if by_position:
        files["nll"] = plot_nll_by_position(by_position, mark if ppl_rows else None,
                                            out / "nll_by_position.png")
    if passkey_rows:
        for model in dict.fromkeys(r["model"] for r in passkey_rows):
            sub = [r for r in passkey_rows if r["model"] == model]
            safe = "".join(c if c.isalnum() or c in "-_+" else "_" for c in model)
            files[f"passkey_{safe}"] = plot_passkey_heatmap(
                sub, out / f"passkey_{safe}.png", title=f"passkey retrieval: {model}")
    return files


def wandb_mode(cfg: DictConfig) -> str | None:
    """The mode of the evaluation's W&B run; None when none is made (`logger=none`, csv,
    tensorboard: the files in the run folder are the record; or mode disabled)."""
    logger = cfg.get("logger") or {}
    if not logger.get("_target_", "").endswith("wandb_logger"):
        return None
    mode = resolve_mode(logger.get("mode"))
    return None if mode == "disabled" else mode


def log_to_wandb(cfg: DictConfig, out: Path, ppl_rows: list[dict], passkey_rows: list[dict],
                 gen_rows: list[dict], files: dict[str, Path], group: str | None = None) -> None:
    """The tables and figures as one W&B run (job_type eval; mode as for training) in `group`
    (`eval_group`: the sweep's, or the checkpoints' training runs'); nothing without W&B."""
    mode = wandb_mode(cfg)
    if mode is None:
        return
    logger = cfg.logger
    import wandb  # lazy: a 1.5-second import, only when a W&B run is made

    os.environ.setdefault("WANDB_CACHE_DIR", str(Path(cfg.paths.cache_dir) / "wandb"))
    run = wandb.init(project=logger.get("project", "bipe"), entity=logger.get("entity"),
                     mode=mode, job_type="eval", dir=str(out), name=out.name, group=group,
                     tags=list(cfg.get("tags") or logger.get("tags") or []),
                     config=OmegaConf.to_container(cfg.eval, resolve=True))
    try:
        for name, rows in (("perplexity", ppl_rows), ("passkey", passkey_rows),
                           ("generation", gen_rows)):
            if rows:
                cols = list(rows[0])
                run.log({name: wandb.Table(columns=cols,
                                           data=[[r.get(c) for c in cols] for r in rows])})
        summary = summarize_ppl(ppl_rows)
        for dataset in dict.fromkeys(r["dataset"] for r in summary):
            groups = list(dict.fromkeys(r["group"] for r in summary if r["dataset"] == dataset))
            xs = sorted({r["length"] for r in summary if r["dataset"] == dataset})
            ys = [[next((r["ppl_mean"] for r in summary if r["dataset"] == dataset
                         and r["group"] == g and r["length"] == x), None) or float("nan")
                   for x in xs] for g in groups]
            run.log({f"ppl_vs_length/{dataset}": wandb.plot.line_series(
                xs=xs, ys=ys, keys=groups, title=f"perplexity vs length ({dataset})",
                xname="length")})
        for name, path in files.items():
            if path.suffix == ".png":
                run.log({f"figures/{name}": wandb.Image(str(path))})
    finally:
        wandb.finish()


def evaluate(cfg: DictConfig) -> dict[str, list[dict]]:
    """Every enabled evaluation of `eval.py`: the config checked first, then perplexity, passkey
    and generation; the outputs are written after each stage, so a stage that fails keeps what
    the earlier ones measured. Returns the rows written to results.json."""
    validate_eval_config(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    out = Path(cfg.paths.output_dir)
    models = load_models(cfg, device)
    group = None
    if wandb_mode(cfg) is not None:  # before the long work: a bad run record stops it here
        group = eval_group((cfg.get("logger") or {}).get("group"), cfg.get("sweep_dir"),
                           [lm.path for lm in models])
    rows: dict[str, list[dict]] = {"perplexity": [], "passkey": [], "generation": []}
    by_position: dict[str, np.ndarray] = {}
    stages = [("perplexity", lambda: run_perplexity(cfg, models, device, cache_dir))]
    if cfg.eval.passkey.enabled:
        stages.append(("passkey", lambda: (run_passkey(cfg, models, device, cache_dir), None)))
    if cfg.eval.generation.enabled:
        stages.append(("generation",
                       lambda: (run_generation(cfg, models, device, cache_dir), None)))
    files: dict[str, Path] = {}
    for name, stage in stages:
        rows[name], extra = stage()
        by_position = extra if extra is not None else by_position
        files = write_outputs(out, cfg, rows["perplexity"], by_position, rows["passkey"],
                              rows["generation"], models)
    print(format_ppl_table(rows["perplexity"]))
    for name, found in (("passkey accuracy", rows["passkey"]),
                        ("generation quality", rows["generation"])):
        if found:
            print(f"\n{name}")
            for r in found:
                print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in r.items()))
    print(f"\nresults in {out}")
    log_to_wandb(cfg, out, rows["perplexity"], rows["passkey"], rows["generation"], files,
                 group)
    return rows
