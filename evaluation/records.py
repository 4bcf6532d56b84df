"""Study records: one small JSON file per finished run of a study, kept under version control.

A study is an experiment config with a sweep (`conf/experiment/<study>.yaml`, `study.name`). Each
finished run writes `results/<study>/<cell>,seed=<k>.json`: the study, the cell (the values of the
keys the study names in `study.cell`, e.g. `pe`, `model.hidden_size`, `optim.lr`), the seed, the
git commit, the metrics the study reports, steps, wall time and the machine. Records are the
data every table and verdict of the README is generated from (`evaluation.report`).

What makes two runs "the same run" is their *definition*: the resolved run config with the keys
that say where and how a run is watched left out (`NOT_DEFINING`: paths, logger, callbacks,
progress bars, the study's own bookkeeping) and null values dropped, so that a new optional
setting whose default (null) keeps the old behaviour does not invalidate the records made before
it. Its hash is the record's `fingerprint`; a run whose record exists with the same fingerprint is
not run again, a record with another fingerprint is of another study definition and is replaced
when the run finishes. The code version is recorded (`commit`) but is not part of the
definition: a change of code that changes results must change a setting (or the records be
deleted) to be rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bipe.errors import DataError
from bipe.io import atomic_write_text

RECORD_VERSION = 1
# Report-row fields a record leaves out: timings (in wall_seconds) and what the cell already says.
NOT_RECORDED = {"seconds", "peak_mib", "model", "group", "pe", "seed"}

# Keys (or prefixes, ending in ".") that do not change what a run computes: where it writes, how
# it is watched, how the study is driven. Everything else defines the run.
NOT_DEFINING = ("study.", "paths.", "logger.", "callbacks.", "extras.", "tags", "ckpt_path",
                "optimized_metric", "compile", "data.cache_dir", "data.pack_workers",
                "data.num_workers", "data.pin_memory", "trainer.default_root_dir",
                "trainer.enable_progress_bar", "trainer.enable_model_summary",
                "trainer.log_every_n_steps")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists and empty mappings stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _defining(key: str) -> bool:
    return not any(key == p.rstrip(".") or (p.endswith(".") and key.startswith(p))
                   for p in NOT_DEFINING)


def definition(run: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that define a run: the flattened resolved config less `NOT_DEFINING` and
    null values, sorted by key."""
    flat = flatten(run)
    return {k: flat[k] for k in sorted(flat) if _defining(k) and flat[k] is not None}


def fingerprint(defn: Mapping[str, Any]) -> str:
    """A short stable hash of a definition (16 hex digits of its canonical JSON's SHA-256)."""
    text = json.dumps(defn, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_values(run: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """`{key: value}` of the cell keys in the resolved config; a key naming a config group with a
    `name` (`pe`, `data`, `task`) gives that name. DataError for a key the config lacks."""
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = run
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise DataError(f"study.cell names {key}, which the config does not have; name "
                                "keys such as pe, model.hidden_size, optim.lr")
            node = node[part]
        if isinstance(node, Mapping):
            if "name" not in node:
                raise DataError(f"study.cell names {key}, a config section without a name; "
                                "name one of its keys instead")
            node = node["name"]
        out[key] = node
    return out


def format_value(value: Any) -> str:
    """A cell value as it appears in a record's name: floats in `%g` form (`0.005`)."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def record_name(cell: Mapping[str, Any], seed: int) -> str:
    """`pe=rope,hidden_size=48,lr=0.005,seed=0`: the cell's keys by their last part, in the
    study's order, then the seed (also the run folder's name inside `studies/<study>/`)."""
    parts = [f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in cell.items()]
    name = ",".join([*parts, f"seed={seed}"])
    return "".join(c if c.isalnum() or c in "._,=+-" else "_" for c in name)


def study_fingerprint(defn: Mapping[str, Any], cell_keys: Iterable[str]) -> str:
    """The fingerprint of what a study's cells share: the definition less the cell keys (a
    group key such as `pe` drops its whole section) and the seed. Records of one study that
    disagree here were made under different study definitions."""
    drop = [*cell_keys, "seed"]
    shared = {k: v for k, v in defn.items()
              if not any(k == d or k.startswith(d + ".") for d in drop)}
    return fingerprint(shared)


def git_commit(root: str | os.PathLike[str]) -> tuple[str | None, bool]:
    """`(commit, dirty)` of the work tree at `root`; `(None, False)` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=root, capture_output=True, text=True, timeout=10,
                                check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit, bool(status.strip())


def machine() -> dict[str, Any]:
    """The CPU (model name), thread count and GPU (if any) a run used; torch is imported lazily."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch  # lazy: reading records must not need torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "torch": torch.__version__, "python": platform.python_version()}


@dataclass(frozen=True)
class Record:
    """One record file, read back."""

    path: Path
    data: dict[str, Any]

    @property
    def study(self) -> str:
        return self.data["study"]

    @property
    def cell(self) -> dict[str, Any]:
        return self.data["cell"]

    @property
    def seed(self) -> int:
        return int(self.data["seed"])

    @property
    def metrics(self) -> dict[str, Any]:
        return self.data["metrics"]

    def metric(self, name: str) -> float:
        """A metric of the record (NaN for `null`, a diverged run); DataError naming the file
        for a metric the record does not have."""
        if name not in self.metrics:
            raise DataError(f"{self.path} has no metric {name}; it has "
                            f"{', '.join(sorted(self.metrics))}")
        value = self.metrics[name]
        return math.nan if value is None else float(value)


def write_record(path: Path, data: Mapping[str, Any]) -> Path:
    """Write a record atomically (sorted keys, indented: diffs stay readable). Non-finite
    floats become null (JSON has no NaN)."""
    text = json.dumps(_finite(dict(data)), indent=1, sort_keys=True, default=str)
    return atomic_write_text(path, text + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def read_record(path: Path) -> Record:
    """One record; DataError naming the file when it is not a record."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); restore it with git or delete "
                        "it and rerun the study") from None
    missing = [k for k in ("study", "cell", "seed", "fingerprint", "metrics") if k not in data]
    if missing:
        raise DataError(f"{path} is not a study record (no {', '.join(missing)})")
    return Record(path, data)


def all_records(results: Path, study: str) -> list[Record]:
    """Every record of a study in `results/<study>/`, the tuning grid's among them (sorted by
    file name); [] when there are none yet."""
    folder = results / study
    return [read_record(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def serving(records: Iterable[Record], stage: str) -> list[Record]:
    """The records that serve `stage` (`study`: the study itself; `tuning`: its learning-rate
    grid; one run can serve both)."""
    return [r for r in records if stage in r.data.get("stages", ["study"])]


def load_records(folder: Path) -> list[Record]:
    """Every record in `results/<study>/` (sorted by file name); DataError if there is none."""
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist; run the study (python train.py -m "
                        f"experiment={folder.name}) or name a folder of results/")
    records = [read_record(p) for p in sorted(folder.glob("*.json"))]
    if not records:
        raise DataError(f"no records in {folder}: none of the study's runs has finished")
    return records
