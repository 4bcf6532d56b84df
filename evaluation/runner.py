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
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bipe.attention import AttentionOptions, LMInfinite
from bipe.errors import CheckpointError, ConfigError
from evaluation.generation_quality import generation_quality
from evaluation.memory import track_peak_memory
from evaluation.passkey import passkey_accuracy
from evaluation.perplexity import perplexity_at_length
from evaluation.plots import plot_nll_by_position, plot_passkey_heatmap, plot_ppl_vs_length
from evaluation.stats import Spread
from evaluation.sweeps import Cell, read_overrides, varying_keys
from training.finetune import relative_training_range, with_scaling

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
    """`ckpt`, `ckpts` and every run's `checkpoints/last.ckpt` under `sweep_dir`."""
    paths = [Path(p) for p in ([cfg.ckpt] if cfg.ckpt else []) + list(cfg.ckpts or [])]
    if cfg.sweep_dir:
        sweep = Path(cfg.sweep_dir)
        if not sweep.is_dir():
            raise ConfigError(f"sweep_dir={sweep} is not a folder")
        found = sorted(sweep.glob("**/checkpoints/last.ckpt"))
        if not found:
            raise ConfigError(f"sweep_dir={sweep} holds no */checkpoints/last.ckpt; train first "
                              "or pass ckpt=PATH")
        paths += found
    if not paths:
        raise ConfigError("nothing to evaluate: pass ckpt=PATH, ckpts=[A,B] or sweep_dir=DIR")
    out = []
    for p in paths:
        if p.is_dir():
            p = p / "checkpoints" / "last.ckpt"
        if not p.is_file():
            raise CheckpointError(f"checkpoint {p} does not exist")
        out.append(p)
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
    from models.checkpoint import build_model_from_checkpoint

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
        from data import LMDataModule

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
    e = cfg.eval
    autocast = torch.bfloat16 if str(e.precision) in ("bf16", "bf16-mixed") else None
    rows, by_position = [], {}
    for lm in models:
        lengths = resolve_lengths(list(e.lengths), e.length_unit, lm.train_length)
        for dataset in e.datasets:
            ids, boundary, _ = load_stream(lm, dataset, e.split, e.max_tokens, cache_dir)
            for suffix, use_lmi in attention_variants(cfg, lm):
                tag = lm.label + suffix
                for length in lengths:
                    batch = max(1, int(e.batch_tokens) // length)
                    t0 = time.perf_counter()
                    with track_peak_memory(device) as mem:
                        res = perplexity_at_length(lm.model, ids, boundary, length,
                                                   protocol=e.protocol, stride=e.stride,
                                                   batch_size=batch, device=device,
                                                   autocast_dtype=autocast)
                    res.seconds, res.peak_mib = time.perf_counter() - t0, mem.peak_mib
                    rows.append({"model": tag, "group": lm.group + suffix, "seed": lm.seed,
                                 "pe": lm.pe_name, "checkpoint": str(lm.path),
                                 "dataset": dataset, "lm_infinite": use_lmi,
                                 "train_length": lm.train_length,
                                 "multiple": length / lm.train_length, **res.to_dict()})
                    log.info("%-18s %-12s len %6d  ppl %9.2f  (%d tokens, %.1fs, %.0f MiB)",
                             tag, dataset, length, res.ppl, res.tokens, res.seconds,
                             res.peak_mib)
                    if e.protocol == "blocks" and length == max(lengths):
                        # Summed over the seeds of a group: one curve per group.
                        key = f"{lm.group}{suffix} [{dataset}]"
                        sums, counts = by_position.get(key, (0.0, 0))
                        by_position[key] = (sums + res.nll_by_position,
                                            counts + res.count_by_position)
    return rows, {k: s / np.maximum(c, 1) for k, (s, c) in by_position.items()}


def summarize_ppl(rows: list[dict]) -> list[dict]:
    """One row per (dataset, group, length): perplexity over the group's seeds (mean, std,
    95% interval half-width, min, max, seeds). A group of one checkpoint has no interval."""
    cells: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["dataset"], r.get("group", r["model"]), r["length"]), []).append(r)
    out = []
    for (dataset, group, length), members in cells.items():
        spread = Spread.of([m["ppl"] for m in members])
        first = members[0]
        out.append({"dataset": dataset, "group": group, "length": length,
                    "multiple": first["multiple"], "train_length": first["train_length"],
                    "lm_infinite": first["lm_infinite"], "pe": first["pe"],
                    "seeds_list": sorted(str(m.get("seed")) for m in members),
                    **spread.to_dict("ppl_"), "seeds": spread.n})
    return out


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
            for row in passkey_accuracy(lm.model, lm.tokenizer, lengths, list(p.depths),
                                        trials=p.trials, seed=cfg.seed, separator_ids=seps,
                                        device=device):
                rows.append({"model": tag, **row})
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
                for row in generation_quality(lm.model, lm.tokenizer, ids, boundary, prefixes,
                                              new_tokens=g.new_tokens, samples=g.samples,
                                              separator_ids=seps, device=device):
                    rows.append({"model": tag, "dataset": dataset, **row})
    return rows


def format_ppl_table(rows: list[dict]) -> str:
    """Groups x lengths, one block per dataset: the table printed at the end of `eval.py`.
    A group of several seeds shows `mean ± half-width of the 95% interval` and their number."""
    lines = []
    summary = summarize_ppl(rows)
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        sub = [r for r in summary if r["dataset"] == dataset]
        lengths = sorted({r["length"] for r in sub})
        groups = list(dict.fromkeys(r["group"] for r in sub))
        seeds = {g: max(r["seeds"] for r in sub if r["group"] == g) for g in groups}
        several = max(seeds.values()) > 1
        cell_w = 18 if several else 10
        width = max(12, *(len(g) + 2 for g in groups))
        split = next((r for r in rows if r["dataset"] == dataset), {}).get("split", "test")
        note = "; mean ± 95% interval over seeds" if several else ""
        lines.append(f"perplexity on {dataset} (split {split}{note})")
        lines.append("model".ljust(width) + (f"{'seeds':>6}" if several else "")
                     + "".join(f"{n:>{cell_w}}" for n in lengths))
        for g in groups:
            cells = {r["length"]: r for r in sub if r["group"] == g}
            text = []
            for n in lengths:
                r = cells.get(n)
                if r is None:
                    text.append(f"{'-':>{cell_w}}")
                    continue
                spread = Spread(r["ppl_mean"], r["ppl_std"], r["ppl_ci95"], r["ppl_n"],
                                r["ppl_min"], r["ppl_max"])
                text.append(f"{spread.format(digits=2).replace(' +- ', ' ± '):>{cell_w}}")
            lines.append(g.ljust(width) + (f"{seeds[g]:>6}" if several else "") + "".join(text))
        lines.append("")
    return "\n".join(lines).rstrip()


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
    files["results"] = _atomic_text(out / "results.json", json.dumps(results, indent=2))
    if ppl_rows:
        cols = ["model", "group", "seed", "pe", "dataset", "lm_infinite", "length", "multiple",
                "train_length", "tokens", "nll", "ppl", "seconds", "peak_mib", "checkpoint"]
        tmp = out / "ppl_vs_length.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(ppl_rows)
        os.replace(tmp, out / "ppl_vs_length.csv")
        files["csv"] = out / "ppl_vs_length.csv"
        summary = summarize_ppl(ppl_rows)
        for dataset in dict.fromkeys(r["dataset"] for r in ppl_rows):
            curves: dict[str, list[tuple[int, Spread]]] = {}
            for r in summary:
                if r["dataset"] == dataset:
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


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def log_to_wandb(cfg: DictConfig, out: Path, ppl_rows: list[dict], passkey_rows: list[dict],
                 gen_rows: list[dict], files: dict[str, Path]) -> None:
    """The tables and figures as one W&B run (job_type eval); mode as for training."""
    from training.wandb_logger import resolve_mode

    mode = resolve_mode(cfg.logger.mode)
    if mode == "disabled":
        return
    import wandb

    os.environ.setdefault("WANDB_CACHE_DIR", str(Path(cfg.paths.cache_dir) / "wandb"))
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=mode,
                     job_type="eval", dir=str(out), name=out.name,
                     config=OmegaConf.to_container(cfg.eval, resolve=True))
    try:
        for name, rows in (("perplexity", ppl_rows), ("passkey", passkey_rows),
                           ("generation", gen_rows)):
            if rows:
                cols = list(rows[0])
                run.log({name: wandb.Table(columns=cols,
                                           data=[[r.get(c) for c in cols] for r in rows])})
        for dataset in dict.fromkeys(r["dataset"] for r in ppl_rows):
            models = list(dict.fromkeys(r["model"] for r in ppl_rows if r["dataset"] == dataset))
            xs = sorted({r["length"] for r in ppl_rows if r["dataset"] == dataset})
            ys = [[next((r["ppl"] for r in ppl_rows if r["dataset"] == dataset
                         and r["model"] == m and r["length"] == x), float("nan")) for x in xs]
                  for m in models]
            run.log({f"ppl_vs_length/{dataset}": wandb.plot.line_series(
                xs=xs, ys=ys, keys=models, title=f"perplexity vs length ({dataset})",
                xname="length")})
        for name, path in files.items():
            if path.suffix == ".png":
                run.log({f"figures/{name}": wandb.Image(str(path))})
    finally:
        wandb.finish()
