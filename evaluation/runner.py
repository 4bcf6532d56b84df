"""`eval.py`'s work: load checkpoints, build evaluation streams, measure, write the outputs.

Each checkpoint carries its model config, tokenizer and data statistics, so nothing else is
needed. A dataset is `train` (the checkpoint's own corpus, test split) or the name of a
`conf/data/*.yaml` corpus, tokenized with the checkpoint's tokenizer and segmented by that
corpus's own segmenter. Every length scores the same first `max_tokens` tokens of a stream, so
the rows of one dataset are comparable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bipe.attention import AttentionOptions, LMInfinite
from bipe.errors import BipeError, ConfigError, first_line
from bipe.io import atomic_write_json, atomic_write_text
from data import LMDataModule
from evaluation.config import validate_eval_config
from evaluation.generation_quality import generation_quality
from evaluation.passkey import passkey_accuracy
from evaluation.perplexity import format_ppl_table, perplexity_rows, summarize_ppl
from evaluation.plots import plot_nll_by_position, plot_passkey_heatmap, plot_ppl_vs_length
from evaluation.stats import Spread
from evaluation.sweeps import Cell, read_overrides, varying_keys
from evaluation.wandb_runs import resolve_mode, sweep_group
from models.checkpoint import (
    build_model_from_checkpoint,
    relative_training_range,
    resolve_checkpoint_path,
    with_scaling,
)

log = logging.getLogger(__name__)

CONF_DATA = Path(__file__).resolve().parents[2] / "conf" / "data"


@dataclass
class LoadedModel:
    """One checkpoint ready to evaluate. `label` is unique; `group` names its cell: checkpoints
    that share a group (the seeds of one sweep cell, or equal `labels=`) are summarised together
    as mean and 95% interval."""

    label: str
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    meta: dict[str, Any]
    train_length: int
    streams: dict[str, tuple[np.ndarray, np.ndarray, list[int]]] = field(default_factory=dict)
    group: str = ""
    seed: int | None = None

    def __post_init__(self) -> None:
        self.group = self.group or self.label

    @property
    def pe_name(self) -> str:
        return self.meta["model_config"]["pe"].get("name", "custom")

    @property
    def has_relative(self) -> bool:
        return self.model.config.pe.relative.type != "none"


def find_checkpoints(cfg: DictConfig) -> list[Path]:
    """`ckpt_path` (or `ckpt`), `ckpts`, and every run folder's checkpoint under `sweep_dir`
    (its newest of last.ckpt and interrupted.ckpt)."""
    one = cfg.get("ckpt_path") or cfg.get("ckpt")
    key = "ckpt_path" if cfg.get("ckpt_path") else "ckpt"
    named = [(key, p) for p in ([one] if one else [])] + [("ckpts", p) for p in cfg.ckpts or []]
    out = [resolve_checkpoint_path(p, key=k) for k, p in named]
    if cfg.sweep_dir:
        sweep = Path(cfg.sweep_dir)
        if not sweep.is_dir():
            raise ConfigError(f"sweep_dir={sweep} is not a folder")
        runs = sorted({p.parent.parent for pattern in ("last.ckpt", "interrupted.ckpt")
                       for p in sweep.glob(f"**/checkpoints/{pattern}")})
        if not runs:
            raise ConfigError(f"sweep_dir={sweep} holds no */checkpoints/last.ckpt; train first "
                              "or pass ckpt_path=PATH")
        out += [resolve_checkpoint_path(run, key="sweep_dir") for run in runs]
    if not out:
        raise ConfigError("nothing to evaluate: pass ckpt_path=PATH, ckpts=[A,B] or "
                          "sweep_dir=DIR")
    return out


def _job_dir(path: Path) -> Path:
    """The run folder of `<run>/checkpoints/<name>.ckpt` (or the file's own folder)."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def group_labels(paths: list[Path], metas: list[dict[str, Any]],
                 labels: list[str]) -> list[tuple[str, str]]:
    """`(label, group)` per checkpoint. The group is `labels[i]` when given, else the encoding's
    name plus the sweep settings that differ between the checkpoints (from each run folder's
    `.hydra/overrides.yaml`), the seed left out; the label adds `#s<seed>` (or the folder) to
    tell the members of a group apart."""
    cells = [Cell.of(read_overrides(_job_dir(p)), drop=["pe"]) for p in paths]
    keys = varying_keys(cells)
    groups = []
    for i, (meta, cell) in enumerate(zip(metas, cells, strict=True)):
        if i < len(labels):
            groups.append(labels[i])
            continue
        extra = cell.label(keys)
        name = meta["model_config"]["pe"].get("name", "model")
        groups.append(f"{name},{extra}" if extra else name)
    seeds = [meta.get("run_config", {}).get("seed") for meta in metas]
    out, taken = [], set()
    for i, group in enumerate(groups):
        members = [j for j, g in enumerate(groups) if g == group]
        member_seeds = [seeds[j] for j in members]
        replicates = len(members) > 1 and None not in member_seeds and \
            len(set(member_seeds)) == len(members)
        label = f"{group}#s{seeds[i]}" if replicates else group
        while label in taken:  # not seeds of one cell: each its own, told apart by folder
            label = f"{label}:{_job_dir(paths[i]).name}"
        taken.add(label)
        out.append((label, group if replicates else label))
    return out


def _scaling_label(scaling: dict[str, Any]) -> str:
    factor = scaling.get("factor")
    return f"{scaling['type']}{'' if factor is None else f'{factor:g}'}"


def load_models(cfg: DictConfig, device: torch.device) -> list[LoadedModel]:
    """Every checkpoint, as saved; with `eval.rope_scaling`, each rotary checkpoint that carries
    no scaling of its own is also loaded scaled (label `<name>+yarn4`), so base, scaled-only and
    fine-tuned models compare in one evaluation. `original_max_position: null` is each
    checkpoint's rotary training range (tokens, or segments per block for BiPE-RoPE)."""
    scaling = OmegaConf.to_container(cfg.eval.rope_scaling, resolve=True) \
        if cfg.eval.get("rope_scaling") else None
    paths = find_checkpoints(cfg)
    built = [build_model_from_checkpoint(path) for path in paths]
    names = group_labels(paths, [meta for _, _, meta in built], list(cfg.labels or []))
    loaded = []
    for path, (model, tokenizer, meta), (label, group) in zip(paths, built, names, strict=True):
        train_length = int(meta["run_config"]["data"]["block_size"])
        seed = meta.get("run_config", {}).get("seed")
        loaded.append(LoadedModel(label, path, model.to(device), tokenizer, meta, train_length,
                                  group=group, seed=seed))
        relative = meta["model_config"]["pe"]["relative"]
        if scaling is None or relative["type"] != "rope" or relative.get("scaling"):
            continue
        scaled = with_scaling(meta, scaling, key="eval.rope_scaling")

        def hook(config: dict, scaled: dict = scaled) -> dict:
            pe = config["pe"]
            return {**config, "pe": {**pe, "relative": {**pe["relative"], "scaling": scaled}}}

        model, tokenizer, scaled_meta = build_model_from_checkpoint(path, model_config_hook=hook)
        tag = f"+{_scaling_label(scaled)}"
        loaded.append(LoadedModel(f"{label}{tag}", path, model.to(device), tokenizer,
                                  scaled_meta, train_length, group=f"{group}{tag}", seed=seed))
    return loaded


def _tokenizer_file(tokenizer_json: str, cache_dir: Path) -> Path:
    """The checkpoint's tokenizer as a file (content-addressed, written atomically)."""
    digest = hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]
    path = cache_dir / "tokenizers" / f"ckpt-{digest}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(tokenizer_json)
        os.replace(tmp, path)
    return path


def _data_config(name: str, lm: LoadedModel, cache_dir: Path) -> dict[str, Any]:
    if name == "train":
        data = dict(lm.meta["run_config"]["data"])
    else:
        file = CONF_DATA / f"{name}.yaml"
        if not file.is_file():
            valid = ["train"] + sorted(p.stem for p in CONF_DATA.glob("*.yaml"))
            raise ConfigError(f"eval.datasets has {name!r}, which is not a corpus; choose from "
                              f"{valid}")
        raw = OmegaConf.load(file)
        raw.cache_dir = str(cache_dir)
        data = OmegaConf.to_container(raw, resolve=True)
    data["cache_dir"] = str(cache_dir)
    # The checkpoint's tokenizer, and its end-of-document token (e.g. `</s>` for LLaMA).
    own = lm.meta["run_config"]["data"].get("tokenizer", {})
    data["tokenizer"] = {**data.get("tokenizer", {}),
                         "path": str(_tokenizer_file(lm.meta["tokenizer"], cache_dir))}
    if own.get("eod_token"):
        data["tokenizer"]["eod_token"] = own["eod_token"]
    return data


def load_stream(lm: LoadedModel, name: str, split: str, max_tokens: int | None,
                cache_dir: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`(ids, boundary, separator_ids)` of a dataset's split, the first `max_tokens + 1` tokens."""
    key = f"{name}:{split}"
    if key not in lm.streams:
        dm = LMDataModule(_data_config(name, lm, cache_dir), seed=0)
        dm.setup("test")
        ids, boundary = dm.split_arrays(split)
        n = len(ids) if max_tokens is None else min(len(ids), max_tokens + 1)
        lm.streams[key] = (np.asarray(ids[:n]), np.asarray(boundary[:n], dtype=bool),
                           list(dm.separator_ids))
    return lm.streams[key]


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
                new, longest = perplexity_rows(
                    lm.model, ids, boundary, lengths, base=base, protocol=e.protocol,
                    stride=e.stride, batch_tokens=int(e.batch_tokens), device=device,
                    autocast_dtype=autocast, track_memory=True, train_length=lm.train_length)
                for r in new:
                    log.info("%-18s %-12s len %6d  ppl %9s  (%s tokens, %.1fs, %.0f MiB)", tag,
                             dataset, r["length"], "n/a" if r["ppl"] is None else
                             f"{r['ppl']:.2f}", r.get("tokens", 0), r.get("seconds", 0.0),
                             r.get("peak_mib", 0.0))
                rows += new
                if e.protocol == "blocks" and longest is not None:
                    # Summed over the seeds of a group: one curve per group.
                    key = f"{lm.group}{suffix} [{dataset}]"
                    sums, counts = by_position.get(key, (0.0, 0))
                    by_position[key] = (sums + longest.nll_by_position,
                                        counts + longest.count_by_position)
    return rows, {k: s / np.maximum(c, 1) for k, (s, c) in by_position.items()}


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
                try:
                    found = passkey_accuracy(lm.model, lm.tokenizer, [length], list(p.depths),
                                             trials=p.trials, seed=cfg.seed, separator_ids=seps,
                                             device=device)
                except (BipeError, ValueError) as exc:
                    found = [{"length": length, "depth": d, "trials": 0, "accuracy": None,
                              "note": first_line(exc)} for d in p.depths]
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
                    try:
                        found += generation_quality(
                            lm.model, lm.tokenizer, ids, boundary, [prefix],
                            new_tokens=g.new_tokens, samples=g.samples, separator_ids=seps,
                            device=device)
                    except (BipeError, ValueError) as exc:
                        found.append({"prefix": prefix, "samples": 0, "bleu": None,
                                      "note": first_line(exc)})
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


def log_to_wandb(cfg: DictConfig, out: Path, ppl_rows: list[dict], passkey_rows: list[dict],
                 gen_rows: list[dict], files: dict[str, Path]) -> None:
    """The tables and figures as one W&B run (job_type eval; mode as for training), in the
    sweep's group when a sweep is evaluated; nothing with `logger=none`."""
    logger = cfg.get("logger") or {}
    if not logger.get("_target_", "").endswith("wandb_logger"):
        return  # logger=none or csv: the files in the run folder are the record
    mode = resolve_mode(logger.get("mode"))
    if mode == "disabled":
        return
    import wandb  # lazy: a 1.5-second import, only when a W&B run is made

    os.environ.setdefault("WANDB_CACHE_DIR", str(Path(cfg.paths.cache_dir) / "wandb"))
    run = wandb.init(project=logger.get("project", "bipe"), entity=logger.get("entity"),
                     mode=mode, job_type="eval", dir=str(out), name=out.name,
                     group=sweep_group(cfg.sweep_dir) if cfg.get("sweep_dir") else None,
                     tags=list(logger.get("tags") or []),
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
    log_to_wandb(cfg, out, rows["perplexity"], rows["passkey"], rows["generation"], files)
    return rows
