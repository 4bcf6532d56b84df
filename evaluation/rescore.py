"""Rescoring studies: the finished runs of a study, evaluated again with an inference-time option
(LM-Infinite) or after a short fine-tuning stage from their checkpoints (YaRN), and recorded like
study runs, so that the option's effect gets seeds, paired comparisons and verdicts without
pretraining anything again.

    python -m evaluation.rescore text_lm_infinite               # every run not yet recorded
    python -m evaluation.rescore text_yarn --max-runs 2         # a slice; run again to go on

A rescoring study (`RESCORES`) names its source study, the encodings it takes from it, and
either the `eval.py` overrides (`conf/eval.yaml`) that switch the option on or the `train.py`
overrides of the fine-tuning stage. For every record of the source study
(`results/<source>/<run>.json`, study runs only) with one of those encodings it takes the run's
final checkpoint (`studies/<source>/<run>/checkpoints/last.ckpt`) and
* with eval overrides, measures perplexity at the source run's lengths on its split with the
  option on;
* with a fine-tuning stage, runs `train.py <overrides> init_from=<checkpoint> seed=<the run's>`
  into `studies/<name>/<run>/` and takes its end-of-run report, on the source run's split;

then writes `results/<name>/<run>.json`: the same cell and seed, with the source record's
fingerprint and the evaluation settings (or the fine-tuning command) as its definition. Before
that it measures the checkpoint once as it is, at the training length, and refuses one that
does not give the source record's perplexity (another run's weights, or code that changed what
a run computes). A run whose record exists with the same definition is skipped; a run without
its checkpoint (the source run was made on another machine) is named and left out, and the
command then exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bipe.errors import BipeError, DataError
from evaluation.records import (
    NOT_RECORDED,
    RECORD_VERSION,
    Record,
    all_records,
    definition,
    fingerprint,
    git_commit,
    machine,
    read_record,
    serving,
    study_fingerprint,
    write_record,
)

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
REPRODUCE_RTOL = 1e-4  # the plain 1x perplexity must match the source record this closely


@dataclass(frozen=True)
class Rescore:
    """A rescoring study: `source`'s runs of the encodings `pe`, evaluated with `overrides`, or
    fine-tuned first with `finetune`."""

    name: str
    source: str
    pe: tuple[str, ...]
    about: str  # what the option is, for messages and the README
    overrides: tuple[str, ...] = ()  # eval.py overrides (conf/eval.yaml keys) that set the option
    # train.py overrides of a fine-tuning stage from the run's checkpoint (`init_from`); its
    # end-of-run report, on the source run's split, is then the measurement
    finetune: tuple[str, ...] = ()


RESCORES = {
    "text_lm_infinite": Rescore(
        "text_lm_infinite", source="text_sweep", pe=("rope", "bipe_rope"),
        overrides=("eval.lm_infinite.enabled=true",),
        about="LM-Infinite (Λ-shaped attention, 100 global and 256 local tokens, distance cap "
              "at the training range) on the text study's RoPE and BiPE-RoPE runs"),
    "text_yarn": Rescore(
        "text_yarn", source="text_sweep", pe=("rope", "bipe_rope"),
        finetune=("experiment=yarn_finetune",),
        about="YaRN fine-tuning (factor 4, 200 steps on 1024-token blocks) of the text study's "
              "RoPE and BiPE-RoPE runs"),
}


def planned(spec: Rescore, results: Path) -> list[Record]:
    """The source records this study rescores: study runs of its encodings."""
    return [r for r in serving(all_records(results, spec.source), "study")
            if r.cell.get("pe") in spec.pe]


def checkpoint_of(source: Record, studies: Path) -> Path:
    """The final checkpoint of the run a source record describes."""
    return studies / source.study / source.path.stem / "checkpoints" / "last.ckpt"


def eval_config(spec: Rescore, source: Record, ckpt: Path, cache_dir: Path, options: bool
                ) -> Any:
    """`conf/eval.yaml` composed for one source run: its checkpoint, its corpus, split and
    lengths, and the study's overrides when `options` (else the plain model at 1x)."""
    from hydra import compose, initialize_config_dir  # lazy: only when evaluating

    from evaluation.config import register_eval_configs  # lazy: the Hydra schema, as above

    defn = source.data.get("definition") or {}
    if "eval.lengths" not in defn or "eval.split" not in defn:
        raise DataError(f"{source.path} has no eval.lengths / eval.split in its definition: "
                        "rescoring needs a study that measured perplexity against length")
    if defn.get("eval.max_blocks") is not None:
        raise DataError(f"{source.path} scored only eval.max_blocks={defn['eval.max_blocks']} "
                        "blocks per length; rescoring scores every block of the split, so it "
                        "needs source runs made with eval.max_blocks=null")
    lengths = list(defn["eval.lengths"]) if options else [1]
    overrides = [f"ckpt_path='{ckpt}'", "logger=none", "eval.datasets=[train]",
                 f"eval.split={defn['eval.split']}", "eval.length_unit=multiple",
                 f"eval.lengths=[{','.join(str(m) for m in lengths)}]",
                 "eval.max_tokens=1000000000", f"paths.cache_dir='{cache_dir}'",
                 "paths.output_dir=."]
    if options:
        overrides += list(spec.overrides)
    register_eval_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def eval_definition(cfg: Any, source: Record) -> dict[str, Any]:
    """What defines a rescored run: the source run (its fingerprint) and the evaluation
    settings (`eval.*` less passkey and generation, which rescoring does not run)."""
    from omegaconf import OmegaConf  # lazy: with Hydra

    settings = definition({"eval": OmegaConf.to_container(cfg.eval, resolve=True)})
    return {"source": source.data["fingerprint"],
            **{k: v for k, v in settings.items()
               if not k.startswith(("eval.passkey.", "eval.generation."))}}


def measure(cfg: Any) -> list[dict[str, Any]]:
    """Perplexity rows of the one checkpoint `cfg` names, as `eval.py` measures them."""
    import torch  # lazy: reading records must not need torch

    from evaluation.checkpoints import load_models  # lazy: imports torch
    from evaluation.config import validate_eval_config  # lazy: with Hydra's schema
    from evaluation.runner import run_perplexity  # lazy: imports torch

    validate_eval_config(cfg)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    models = load_models(cfg, device)
    rows, _ = run_perplexity(cfg, models, device, Path(cfg.paths.cache_dir))
    return rows


def finetune_command(spec: Rescore, source: Record, ckpt: Path, out: Path, cache_dir: Path
                     ) -> list[str]:
    """The `train.py` command of a fine-tuning stage from one source run, into `out`."""
    split = (source.data.get("definition") or {}).get("eval.split", "test")
    return [sys.executable, str(ROOT / "train.py"), *spec.finetune, f"init_from='{ckpt}'",
            f"seed={source.seed}", f"eval.split={split}", f"hydra.run.dir='{out}'",
            f"paths.cache_dir='{cache_dir}'", "logger=csv", "extras.print_config=false"]


def finetune(spec: Rescore, source: Record, ckpt: Path, studies: Path, cache_dir: Path
             ) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Fine-tune a source run (`train.py`, in `studies/<name>/<run>/`); its final metrics, the
    end-of-run report's rows and its step. A stage stopped part-way starts again (minutes)."""
    out = studies / spec.name / source.path.stem
    shutil.rmtree(out, ignore_errors=True)
    log.info("%s/%s: fine-tuning in %s", spec.name, source.path.stem, out)
    done = subprocess.run(finetune_command(spec, source, ckpt, out, cache_dir), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or not (out / "metrics.json").is_file():
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise DataError(f"fine-tuning {source.path.stem} failed (exit {done.returncode}: "
                        f"{last}); its log is {out / 'train.log'}")
    final = json.loads((out / "metrics.json").read_text())
    rows = json.loads((out / "length_eval.json").read_text()).get("results", [])
    rows = [{k: v for k, v in r.items() if k not in NOT_RECORDED} for r in rows]
    return ({k: v for k, v in final["metrics"].items() if v is not None}, rows,
            int(final["global_step"]))


def rescore_run(spec: Rescore, source: Record, results: Path, studies: Path,
                cache_dir: Path) -> Path | None:
    """Rescore one source run; its record's path, or None when it was already recorded."""
    started = time.time()
    ckpt = checkpoint_of(source, studies)
    target = results / spec.name / source.path.name
    cfg = eval_config(spec, source, ckpt, cache_dir, options=True)
    if spec.finetune:  # the source run and the command; the code is recorded, not defining
        defn = {"source": source.data["fingerprint"],
                "finetune": [*spec.finetune, f"seed={source.seed}",
                             f"eval.split={cfg.eval.split}"]}
    else:
        defn = eval_definition(cfg, source)
    if target.is_file() and read_record(target).data.get("fingerprint") == fingerprint(defn):
        log.info("%s/%s: recorded in %s; skipped", spec.name, target.stem, target)
        return None
    if not ckpt.is_file():
        raise DataError(f"{ckpt} does not exist: the run of {source.path} was made on another "
                        "machine or its folder was removed; rerun it (python train.py -m "
                        f"experiment={source.study} ...) to rescore it")
    plain = measure(eval_config(spec, source, ckpt, cache_dir, options=False))
    recorded = source.metric("eval/ppl_1x")
    if not math.isclose(plain[0]["ppl"], recorded, rel_tol=REPRODUCE_RTOL):
        raise DataError(f"{ckpt} gives perplexity {plain[0]['ppl']:.4f} at 1x where "
                        f"{source.path} recorded {recorded:.4f}: it is not the run the record "
                        "describes, or the code changed what a run computes; rerun the source "
                        "run")
    if spec.finetune:
        metrics, rows, steps = finetune(spec, source, ckpt, studies, cache_dir)
    else:
        kept = ("length", "multiple", "tokens", "nll", "ppl", "lm_infinite")
        rows = [{k: r.get(k) for k in kept} for r in measure(cfg)]
        metrics = {f"eval/ppl_{m:g}x": r["ppl"]
                   for m, r in zip(cfg.eval.lengths, rows, strict=True)}
        steps = source.data.get("steps")
    commit, dirty = git_commit(ROOT)
    data = {
        "version": RECORD_VERSION, "study": spec.name, "cell": source.cell,
        "seed": source.seed, "stages": ["study"], "fingerprint": fingerprint(defn),
        "study_fingerprint": study_fingerprint(defn, source.cell),
        "source": {"study": source.study, "record": source.path.name,
                   "fingerprint": source.data["fingerprint"], "ppl_1x": recorded,
                   "ppl_1x_measured": plain[0]["ppl"]},
        "commit": commit, "dirty": dirty, "metrics": metrics,
        "results": rows, "steps": steps, "wall_seconds": round(time.time() - started, 1),
        "resumed_from_step": None, "machine": machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "definition": defn,
    }
    path = write_record(target, data)
    log.info("record written: %s", path)
    return path


def run(spec: Rescore, results: Path, studies: Path, cache_dir: Path,
        max_runs: int | None = None) -> int:
    """Rescore every planned run not yet recorded (at most `max_runs` new ones); 0 when all
    went well, 2 when a run could not be rescored (each named on stderr)."""
    sources = planned(spec, results)
    if not sources:
        raise DataError(f"results/{spec.source}/ has no study records of "
                        f"{', '.join(spec.pe)}: run that study first (python train.py -m "
                        f"experiment={spec.source})")
    log.info("%s: %s; %d runs of %s", spec.name, spec.about, len(sources), spec.source)
    done = failed = 0
    for source in sources:
        if max_runs is not None and done >= max_runs:
            log.info("%s/%s deferred: --max-runs %d reached; run the command again to go on",
                     spec.name, source.path.stem, max_runs)
            continue
        try:
            if rescore_run(spec, source, results, studies, cache_dir) is not None:
                done += 1
        except DataError as exc:
            failed += 1
            print(f"not rescored: {exc}", file=sys.stderr)
    log.info("%s: %d runs rescored, %d not", spec.name, done, failed)
    return 2 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.rescore",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the rescoring study: " + "; ".join(
        f"{name} ({spec.about})" for name, spec in RESCORES.items()))
    parser.add_argument("--max-runs", type=int, default=None,
                        help="rescore at most this many runs now (the rest on the next call)")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--studies", type=Path, default=ROOT / "studies",
                        help="the folder of the source study's run folders")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    if args.name not in RESCORES:
        print(f"error: {args.name!r} is not a rescoring study; choose one of "
              f"{', '.join(RESCORES)} (evaluation/rescore.py, RESCORES)", file=sys.stderr)
        return 2
    if args.max_runs is not None and args.max_runs < 0:
        print(f"error: --max-runs {args.max_runs} must be >= 0", file=sys.stderr)
        return 2
    try:
        return run(RESCORES[args.name], args.results, args.studies, args.cache_dir,
                   args.max_runs)
    except BipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
