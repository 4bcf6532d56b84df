"""`python -m bench`: every section runs in its smallest configuration and writes its files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench.__main__ import parse_args  # noqa: E402
from bench.report import fmt  # noqa: E402
from bench.runner import run  # noqa: E402
from bench.settings import SECTIONS, SMOKE  # noqa: E402
from bench.timing import interleave, rotations  # noqa: E402

SENTENCES = ["The king is dead.", "Long live the queen!", "What say you, my lord?",
             "Is this a dagger which I see before me?", "All things that are, are with more "
             "spirit chased than enjoyed."]


def _corpus(root: Path) -> str:
    root.mkdir(parents=True)
    for i in range(6):
        lines = [" ".join(SENTENCES[(i + j + k) % len(SENTENCES)] for k in range(2))
                 for j in range(40)]
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(root / "*.txt")


def _positive_medians(record: dict) -> list[float]:
    """Median times and rates: must be > 0. Memory medians are left out: a tiny forward pass may
    reach no new resident peak, so its measured increase can be exactly 0 MiB."""
    return [v for k, v in record.items() if k.startswith("median_") and isinstance(v, float)
            and "mib" not in k]


def test_rotations_interleave_contenders() -> None:
    assert rotations(["a", "b", "c"], 3) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    calls: list[str] = []
    got = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                     warmup=1, reps=2)
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert all(len(s) == 2 and min(s) >= 0 for s in got.values())


def test_cli_defaults_and_format() -> None:
    args = parse_args([])
    assert args.profile == "quick" and args.only is None
    assert parse_args(["--full", "--only", "data", "ceiling"]).only == ["data", "ceiling"]
    assert fmt(2534.4) == "2,534" and fmt(0.01234) == "0.0123" and fmt(None) == "-"


def test_missing_optional_packages_are_skipped_with_a_note(monkeypatch) -> None:
    from bench.contenders import Skipped, build
    from bench.settings import TINY
    from bench.training import run_training

    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "x_transformers", None)
    assert isinstance(build("hf-llama-sdpa", TINY, 32), Skipped)
    assert isinstance(build("xt-alibi", TINY, 32), Skipped)
    res = run_training(SMOKE.replace(precisions=("fp32",)))
    assert {r["contender"] for r in res.records} == {"ours"}
    assert sum("skipped" in n for n in res.notes) == 4
    assert res.records[0]["median_tokens_per_s"] > 0


@pytest.mark.slow
def test_smoke_profile_writes_every_section(tmp_path: Path) -> None:
    data_cfg = {"name": "text_files", "glob": _corpus(tmp_path / "corpus"), "segmenter": "punkt",
                "cache_dir": str(tmp_path / "cache"), "tokenizer": {"vocab_size": 300},
                "block_size": 16, "batch_size": 2}
    profile = SMOKE.replace(data_cfg=data_cfg)
    md_path, json_path, md = run(profile, tmp_path / "out")
    assert md_path.is_file() and json_path.is_file()
    payload = json.loads(json_path.read_text())
    assert set(payload["sections"]) == set(SECTIONS)
    assert payload["machine"]["torch threads"] >= 1
    for key, section in payload["sections"].items():
        figures = [v for r in section["records"] for v in _positive_medians(r)]
        assert figures, f"section {key} has no figures"
        assert all(v > 0 for v in figures), (key, figures)
        memory = [v for r in section["records"] for k, v in r.items()
                  if k.startswith("median_") and "mib" in k and isinstance(v, float)]
        assert all(v >= 0 for v in memory), (key, memory)
        assert f"## {section['title']}" in md
    training = payload["sections"]["training"]["records"]
    assert {r["contender"] for r in training} >= {"ours"}
    lc = payload["sections"]["long_context"]["records"]
    measured = {r["contender"] for r in lc if r["median_tokens_per_s"]}
    assert measured >= {"rope", "alibi", "bipe_alibi", "kerple"}
    assert all(r["kernel"] for r in lc if r["contender"] in measured - {"hf-llama-sdpa"})
    assert all(r["median_peak_mib"] is not None for r in lc if r["contender"] in measured)
    compiled = payload["sections"]["compiled"]["records"]
    assert compiled and all(r["loss_abs_diff"] < 1e-3 for r in compiled)
    ends = [r for r in payload["sections"]["data"]["records"] if r["stage"] == "end to end"]
    assert sorted(r["workers"] for r in ends) == [1, 2]
    decoding = payload["sections"]["decoding"]["records"]
    full_cache = {r["context"]: r["cache_mib"] for r in decoding if r["method"] == "full"}
    assert all(r["cache_mib"] < full_cache[r["context"]] for r in decoding
               if r["method"] == "lm-infinite" and r["context"] > 64)
