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
from bipe.evaluation.generation_quality import generation_quality
from bipe.evaluation.memory import track_peak_memory
from bipe.evaluation.passkey import passkey_accuracy
from bipe.evaluation.perplexity import perplexity_at_length
from bipe.evaluation.plots import plot_nll_by_position, plot_passkey_heatmap, plot_ppl_vs_length
from bipe.training.finetune import relative_training_range, with_scaling

log = logging.getLogger(__name__)

CONF_DATA = Path(__file__).resolve().parents[2] / "conf" / "data"


@dataclass
class LoadedModel:
    label: str
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    meta: dict[str, Any]
    train_length: int
    streams: dict[str, tuple[np.ndarray, np.ndarray, list[int]]] = field(default_factory=dict)

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


def _label(meta: dict[str, Any], path: Path, taken: set[str]) -> str:
    """The encoding's name, made unique with the run folder when several share it."""
    base = label = meta["model_config"]["pe"].get("name", "model")
    i = 1
    while label in taken:  # several checkpoints of one encoding: tell them apart by folder
        label = f"{base}:{path.parent.parent.name}" if i == 1 else f"{base}#{i}"
        i += 1
    taken.add(label)
    return label


def _scaling_label(scaling: dict[str, Any]) -> str:
    factor = scaling.get("factor")
    return f"{scaling['type']}{'' if factor is None else f'{factor:g}'}"


def load_models(cfg: DictConfig, device: torch.device) -> list[LoadedModel]:
    """Every checkpoint, as saved; with `eval.rope_scaling`, each rotary checkpoint that carries
    no scaling of its own is also loaded scaled (label `<name>+yarn4`), so base, scaled-only and
    fine-tuned models compare in one evaluation. `original_max_position: null` is each
    checkpoint's rotary training range (tokens, or segments per block for BiPE-RoPE)."""
    from bipe.training.checkpoint import build_model_from_checkpoint

    labels = list(cfg.labels or [])
    scaling = OmegaConf.to_container(cfg.eval.rope_scaling, resolve=True) \
        if cfg.eval.get("rope_scaling") else None
    taken: set[str] = set()
    loaded = []
    for i, path in enumerate(find_checkpoints(cfg)):
        model, tokenizer, meta = build_model_from_checkpoint(path)
        train_length = int(meta["run_config"]["data"]["block_size"])
        label = labels[i] if i < len(labels) else _label(meta, path, taken)
        loaded.append(LoadedModel(label, path, model.to(device), tokenizer, meta, train_length))
        relative = meta["model_config"]["pe"]["relative"]
        if scaling is None or relative["type"] != "rope" or relative.get("scaling"):
            continue
        scaled = with_scaling(meta, scaling, key="eval.rope_scaling")

        def hook(config: dict, scaled: dict = scaled) -> dict:
            pe = config["pe"]
            return {**config, "pe": {**pe, "relative": {**pe["relative"], "scaling": scaled}}}

        model, tokenizer, scaled_meta = build_model_from_checkpoint(path, model_config_hook=hook)
        loaded.append(LoadedModel(f"{label}+{_scaling_label(scaled)}", path, model.to(device),
                                  tokenizer, scaled_meta, train_length))
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
    """Yield `(tag, uses_lm_infinite)` with `lm.model.attention` set for each requested variant
    (plain, LM-Infinite or both); the plain setting is restored afterwards."""
    try:
        for use_lmi in _modes(cfg.eval.lm_infinite.enabled):
            lmi = lm_infinite_settings(cfg, lm) if use_lmi else None
            if use_lmi and lmi is None:
                log.info("%s has no relative encoding: LM-Infinite does not apply", lm.label)
                continue
            lm.model.attention = AttentionOptions(chunk_size=cfg.eval.chunk_size,
                                                  lm_infinite=lmi)
            yield (f"{lm.label}+lminf" if use_lmi else lm.label), use_lmi
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
            for tag, use_lmi in attention_variants(cfg, lm):
                for length in lengths:
                    batch = max(1, int(e.batch_tokens) // length)
                    t0 = time.perf_counter()
                    with track_peak_memory(device) as mem:
                        res = perplexity_at_length(lm.model, ids, boundary, length,
                                                   protocol=e.protocol, stride=e.stride,
                                                   batch_size=batch, device=device,
                                                   autocast_dtype=autocast)
                    res.seconds, res.peak_mib = time.perf_counter() - t0, mem.peak_mib
                    rows.append({"model": tag, "pe": lm.pe_name, "checkpoint": str(lm.path),
                                 "dataset": dataset, "lm_infinite": use_lmi,
                                 "train_length": lm.train_length,
                                 "multiple": length / lm.train_length, **res.to_dict()})
                    log.info("%-18s %-12s len %6d  ppl %9.2f  (%d tokens, %.1fs, %.0f MiB)",
                             tag, dataset, length, res.ppl, res.tokens, res.seconds,
                             res.peak_mib)
                    if e.protocol == "blocks" and length == max(lengths):
                        counts = np.maximum(res.count_by_position, 1)
                        by_position[f"{tag} [{dataset}]"] = res.nll_by_position / counts
    return rows, by_position


def run_passkey(cfg: DictConfig, models: list[LoadedModel], device: torch.device,
                cache_dir: Path) -> list[dict]:
    p = cfg.eval.passkey
    rows = []
    for lm in models:
        lengths = resolve_lengths(list(p.lengths), cfg.eval.length_unit, lm.train_length)
        _, _, seps = load_stream(lm, cfg.eval.datasets[0], cfg.eval.split, cfg.eval.max_tokens,
                                 cache_dir)
        for tag, _ in attention_variants(cfg, lm):
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
            for tag, _ in attention_variants(cfg, lm):
                for row in generation_quality(lm.model, lm.tokenizer, ids, boundary, prefixes,
                                              new_tokens=g.new_tokens, samples=g.samples,
                                              separator_ids=seps, device=device):
                    rows.append({"model": tag, "dataset": dataset, **row})
    return rows


def format_ppl_table(rows: list[dict]) -> str:
    """Models x lengths, one block per dataset: the table printed at the end of `eval.py`."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == dataset]
        lengths = sorted({r["length"] for r in sub})
        models = list(dict.fromkeys(r["model"] for r in sub))
        width = max(12, *(len(m) + 2 for m in models))
        lines.append(f"perplexity on {dataset} (split {sub[0].get('split', 'test')})")
        lines.append("model".ljust(width) + "".join(f"{n:>10}" for n in lengths))
        for m in models:
            cells = {r["length"]: r["ppl"] for r in sub if r["model"] == m}
            lines.append(m.ljust(width) + "".join(
                f"{cells[n]:>10.2f}" if n in cells else f"{'-':>10}" for n in lengths))
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
        "perplexity": ppl_rows, "passkey": passkey_rows, "generation": gen_rows,
    }
    files["results"] = _atomic_text(out / "results.json", json.dumps(results, indent=2))
    if ppl_rows:
        cols = ["model", "pe", "dataset", "lm_infinite", "length", "multiple", "train_length",
                "tokens", "nll", "ppl", "seconds", "peak_mib", "checkpoint"]
        tmp = out / "ppl_vs_length.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(ppl_rows)
        os.replace(tmp, out / "ppl_vs_length.csv")
        files["csv"] = out / "ppl_vs_length.csv"
        for dataset in dict.fromkeys(r["dataset"] for r in ppl_rows):
            curves: dict[str, list[tuple[int, float]]] = {}
            for r in ppl_rows:
                if r["dataset"] == dataset:
                    curves.setdefault(r["model"], []).append((r["length"], r["ppl"]))
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
    from bipe.training.wandb_logger import resolve_mode

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
