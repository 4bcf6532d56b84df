"""`python -m evaluation.report`: the verdict rule on constructed records with known answers, the
README's generated blocks reproduced exactly, and `--check` catching every disagreement."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bipe.errors import DataError
from evaluation import report
from evaluation.records import Record, all_records, read_record, record_name, write_record
from evaluation.stats import Spread
from evaluation.tuning import study_grid
from evaluation.verdicts import (
    NOT_SHOWN,
    REPRODUCED,
    REVERSED,
    seeds_to_resolve,
    seeds_to_resolve_text,
    verdict,
)
from tests.conftest import ROOT

CONF = ROOT / "conf"
TEMPLATE = "".join(f"## {n}\n<!-- report:{n} -->\n<!-- /report:{n} -->\n"
                   for n in [*report.STUDIES, "paper"])


def put(results: Path, study: str, cell: dict, seed: int, metrics: dict,
        stages: tuple[str, ...] = ("study",), results_rows: list | None = None) -> Path:
    path = results / study / f"{record_name(cell, seed)}.json"
    write_record(path, {"version": 1, "study": study, "cell": cell, "seed": seed,
                        "stages": list(stages), "fingerprint": "f", "metrics": metrics,
                        "results": results_rows or [],
                        "definition": {"data.block_size": 256}})
    return path


def arithmetic(results: Path, offsets: dict[str, list[float]], hidden: int = 48) -> None:
    """Accuracies at 4 operators: alibi and rope at 0.6 + seed noise, the others offset."""
    noise = [0.0, 0.05, -0.04, 0.02, -0.01]
    for pe in ("alibi", "rope", "bipe_alibi", "bipe_rope"):
        for seed, extra in enumerate(offsets.get(pe, [0.0] * 3)):
            acc = 0.6 + noise[seed] + extra
            put(results, "arithmetic_sweep", {"pe": pe, "model.hidden_size": hidden,
                                              "optim.lr": 0.005}, seed,
                {"test/ops_4/accuracy": acc, "test/ops_5/accuracy": acc / 2},
                results_rows=[{"setting": "ops_4"}, {"setting": "ops_5"}])


def verdicts_of(results: Path, study: str) -> dict[tuple[str, str, str], dict]:
    _, info = report.study_block(report.STUDIES[study], results, CONF, results / "figures",
                                 results, draw=False)
    return {(v["claim"].a, v["claim"].b, v["claim"].metric): v
            for v in info["verdicts"] if v["claim"].where.get("model.hidden_size", 48) == 48}


def test_the_verdict_rule_on_spreads_with_known_answers():
    assert verdict(Spread.of([0.2, 0.3, 0.25]), higher_is_better=True) == REPRODUCED
    assert verdict(Spread.of([0.2, 0.3, 0.25]), higher_is_better=False) == REVERSED
    assert verdict(Spread.of([-2.0, -3.0, -2.5]), higher_is_better=False) == REPRODUCED
    assert verdict(Spread.of([0.3, -0.2, 0.1]), higher_is_better=True) == NOT_SHOWN
    assert verdict(Spread.of([0.3]), higher_is_better=True) == NOT_SHOWN  # no interval
    # mean 1, std 1: t(0.975, n-1) / sqrt(n) < 1 first at n = 7 (2.447 / 2.646 = 0.92)
    assert seeds_to_resolve(Spread.of([0.0, 1.0, 2.0])) == 7
    assert seeds_to_resolve(Spread.of([0.0, 0.0, 0.0])) is None  # no difference to resolve
    assert seeds_to_resolve_text(Spread.of([0.0, 1.0, 2.0])) == "~7 seeds"
    tiny = Spread.of([-30.0, 30.5, 0.0])  # mean +0.17, std 30: beyond any count worth running
    assert seeds_to_resolve(tiny) is None and seeds_to_resolve_text(tiny) == "over 1,000 seeds"
    assert seeds_to_resolve_text(Spread.of([0.0, 0.0, 0.0])) is None
    assert seeds_to_resolve_text(Spread.of([0.3])) is None  # one seed: no spread to go by


def test_paired_verdicts_on_constructed_records(tmp_path):
    arithmetic(tmp_path, {"bipe_alibi": [0.30, 0.31, 0.29],  # clearly better, every seed
                          "bipe_rope": [-0.2, -0.21, -0.19],  # clearly worse: reversed
                          })
    v = verdicts_of(tmp_path, "arithmetic_sweep")
    ours = v["bipe_alibi", "alibi", "test/ops_4/accuracy"]
    assert ours["verdict"] == REPRODUCED and ours["pair"].seeds == (0, 1, 2)
    assert ours["pair"].diff.mean == pytest.approx(0.30)
    assert v["bipe_rope", "rope", "test/ops_4/accuracy"]["verdict"] == REVERSED


def test_pairing_by_seed_removes_what_the_seeds_share(tmp_path):
    # The seed noise (+-5 points) swamps a 2-point gain between two unpaired groups, but every
    # seed shows the gain: the paired interval excludes zero.
    arithmetic(tmp_path, {"bipe_alibi": [0.02, 0.021, 0.019]})
    pair = verdicts_of(tmp_path, "arithmetic_sweep")["bipe_alibi", "alibi",
                                                      "test/ops_4/accuracy"]["pair"]
    assert pair.a.low < pair.b.high  # the unpaired intervals overlap
    assert pair.diff.low > 0


def test_a_difference_inside_the_noise_is_not_shown_and_says_how_many_seeds(tmp_path):
    arithmetic(tmp_path, {"bipe_alibi": [0.1, -0.05, 0.08]})
    v = verdicts_of(tmp_path, "arithmetic_sweep")["bipe_alibi", "alibi", "test/ops_4/accuracy"]
    assert v["verdict"] == NOT_SHOWN and v["seeds_needed"] and v["seeds_needed"] > 3


def text(results: Path, pe: str, seed: int, ppl: dict[int, float]) -> None:
    """A text record; seed 0 also serves the tuning grid (as the study reuses it)."""
    put(results, "text_sweep", {"pe": pe, "optim.lr": 0.003}, seed,
        {"val/loss": 4.0, **{f"eval/ppl_{m}x": p for m, p in ppl.items()}},
        stages=("tuning", "study") if seed == 0 else ("study",))


def test_level_and_growth_past_the_training_length_are_separate_verdicts(tmp_path):
    # BiPE-ALiBi: better at every length, but degrades faster; ALiBi: worse but flat.
    for seed, jitter in enumerate([0.0, 3.0, -2.0]):
        text(tmp_path, "alibi", seed, {1: 200 + jitter, 4: 200 + jitter, 8: 201 + jitter,
                                       16: 202 + jitter})
        text(tmp_path, "bipe_alibi", seed, {1: 150 + jitter, 4: 160 + jitter, 8: 170 + jitter,
                                            16: 180 + jitter})
    v = verdicts_of(tmp_path, "text_sweep")
    assert v["bipe_alibi", "alibi", "eval/ppl_8x"]["verdict"] == REPRODUCED
    assert v["bipe_alibi", "alibi", "growth_16x"]["verdict"] == REVERSED
    assert v["bipe_rope", "rope", "eval/ppl_4x"]["verdict"] == "no records"


def test_the_readme_blocks_are_regenerated_exactly_and_check_catches_changes(tmp_path):
    results = tmp_path / "results"
    arithmetic(results, {"bipe_alibi": [0.3, 0.31, 0.29]})
    for seed in range(3):
        text(results, "rope", seed, {1: 100.0 + seed, 2: 120.0, 16: 300.0 + seed})
        text(results, "bipe_rope", seed, {1: 101.0, 2: 105.0 + seed, 16: 150.0})
    put(results, "text_sweep", {"pe": "rope", "optim.lr": 0.01}, 0,
        {"val/loss": 5.0, "eval/ppl_1x": 1.0},
        stages=("tuning",))  # a tuning point at another rate: not part of the study's table
    readme = tmp_path / "README.md"
    readme.write_text(TEMPLATE)
    args = ["--readme", str(readme), "--results", str(results)]
    assert report.main(args) == 0
    first = readme.read_text()
    assert "| bipe_alibi" in first and "reproduced" in first and "| 0.01 " not in first
    grid = first[first.index("val/loss by learning rate"):].splitlines()
    # the grid of conf/hparams_search/text_lr.yaml (7.5e-4 to 6e-3) and the run at 1e-2
    assert grid[2].split()[:4] == ["bipe_rope", "4*", "-", "0.003"]
    assert "(incomplete: no run at 0.00075, 0.0015, 0.006, 0.01)" in grid[2]
    assert grid[3].split()[:4] == ["rope", "4*", "5", "0.003"]
    assert "(incomplete: no run at 0.00075, 0.0015, 0.006)" in grid[3]
    assert ("| rope      | 0.003 |     3 | 101.00 ± 2.48 | 120.00 ± 0.00 | 301.00 ± 2.48 |  2.98 ± "
            "0.05x |") in first
    assert "Not yet recorded" in first and "`pe=alibi,seed=0`" in first
    assert (results / "figures" / "text_sweep.png").is_file()
    assert report.main([*args, "--check"]) == 0
    assert report.main(args) == 0 and readme.read_text() == first  # regenerating is stable

    readme.write_text(first.replace("101.00 ± 2.48", "99.00 ± 2.48"))  # a number typed by hand
    assert report.main([*args, "--check"]) == 1
    readme.write_text(first)
    path = results / "text_sweep" / "pe=bipe_rope,lr=0.003,seed=2.json"
    data = read_record(path).data
    write_record(path, {**data, "metrics": {**data["metrics"], "eval/ppl_16x": 151.0}})
    problems = report.check(readme, results, CONF, results / "figures")
    assert any("text_sweep.png was not drawn from the current records" in p for p in problems)
    assert any("+++ README.md (from results/)" in p for p in problems)


def test_the_readme_agrees_with_the_records_in_the_repository():
    result = subprocess.run([sys.executable, "-m", "evaluation.report", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr


def test_records_read_back_as_written(tmp_path):
    path = put(tmp_path, "s", {"pe": "rope"}, 1, {"val/loss": float("nan")})
    record = read_record(path)
    assert isinstance(record, Record) and record.seed == 1 and record.cell == {"pe": "rope"}
    assert record.metrics["val/loss"] is None  # JSON has no NaN: a diverged run reads as NaN
    assert record.metric("val/loss") != record.metric("val/loss")


def test_each_study_says_what_its_records_took(tmp_path):
    xeon = {"cpu": "Xeon", "torch_threads": 1}
    for seed, minutes in enumerate([10, 20, 30]):
        path = put(tmp_path, "text_sweep", {"pe": "rope", "optim.lr": 0.003}, seed,
                   {"eval/ppl_1x": 100.0, "val/loss": 4.5},
                   stages=("tuning", "study") if seed == 0 else ("study",))
        data = read_record(path).data
        write_record(path, {**data, "wall_seconds": minutes * 60.0, "machine": xeon})
    assert report.compute_line(all_records(tmp_path, "text_sweep")) == (
        "**Compute.** 3 runs (1 of them tuning), 1.0 core-hours, 10 to 30 min per run (1 thread "
        "each), on Xeon.")
    data = read_record(path).data  # seed 2, resumed on a 2-thread GPU machine
    write_record(path, {**data, "resumed_from_step": 400,
                        "machine": {"cpu": "EPYC", "gpu": "H100", "torch_threads": 2}})
    line = report.compute_line(all_records(tmp_path, "text_sweep"))
    assert line is not None and "1.5 core-hours at least" in line  # 10 + 20 + 2 x 30 minutes
    assert "1 to 2 threads" in line and "H100 (1), Xeon (2)" in line
    assert "1 resumed from a checkpoint recorded only the last part" in line
    assert report.compute_line(all_records(tmp_path, "text_sweep"), missing=4).endswith(
        "The 4 runs not yet recorded need about 1.3 core-hours more at the median run so far.")
    assert report.compute_line(all_records(tmp_path, "bi_nfa_sweep")) is None
    seed_1 = [r for r in all_records(tmp_path, "text_sweep") if r.seed == 1]
    assert report.compute_line(seed_1 * 2) == (  # one length of run is not a range
        "**Compute.** 2 runs, 0.7 core-hours, 20 min per run (1 thread each), on Xeon.")
    block, _ = report.study_block(report.STUDIES["text_sweep"], tmp_path, CONF,
                                  tmp_path / "figures", tmp_path, draw=False)
    assert line in block


def test_a_missing_readme_is_one_line_and_status_2(tmp_path, capsys):
    assert report.main(["--readme", str(tmp_path / "README.md"), "--results",
                        str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--readme" in err and "does not exist" in err


def test_a_tuning_record_without_the_metric_is_named_as_the_record(tmp_path):
    path = put(tmp_path, "text_sweep", {"pe": "rope", "optim.lr": 0.003}, 0,
               {"eval/ppl_1x": 100.0}, stages=("tuning",))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))} has no val/loss; it has "
                                        "eval/ppl_1x$"):
        report.tuning_table(all_records(tmp_path, "text_sweep"), "text_sweep")


def test_an_interval_below_the_shown_precision_gets_two_significant_digits():
    def spread(mean, half):
        return Spread(mean=mean, std=half, ci95=half, n=5, min=mean - half, max=mean + half)

    assert report.fmt(spread(2.1712, 0.0712), False) == "2.17 ± 0.07"
    assert report.fmt(spread(0.98724, 0.00128), False) == "0.9872 ± 0.0013"
    assert report.fmt(spread(0.00178, 0.00152), False, signed=True) == "+0.0018 ± 0.0015"
    assert report.fmt(spread(0.99, 0.0), False) == "0.99 ± 0.00"  # no spread: nothing to show
    assert report.fmt(spread(0.974, 0.0004), True) == "97.400 ± 0.040"


def test_a_rate_at_the_edge_of_its_grid_is_named_beside_the_verdict(tmp_path):
    for seed in range(3):
        text(tmp_path, "alibi", seed, {1: 200.0 + seed, 8: 201.0 + seed})
        text(tmp_path, "bipe_alibi", seed, {1: 150.0 + seed, 8: 160.0 + seed})
    grid = study_grid("text_sweep")
    for lr, loss in ((min(grid), 3.0), (max(grid), 5.0)):  # bipe_alibi's best: the lowest rate
        put(tmp_path, "text_sweep", {"pe": "bipe_alibi", "optim.lr": lr}, 0, {"val/loss": loss},
            stages=("tuning",))
    _, done = report.blocks(tmp_path, CONF, tmp_path / "figures", tmp_path, draw=False)
    assert done["text_sweep"]["at_edge"] == {"bipe_alibi"}
    row = next(line for line in report.paper_block(done).splitlines()
               if "Text past the training length: BiPE-ALiBi beats ALiBi" in line)
    assert "reproduced" in row and "tuned rate of bipe_alibi at the edge of its grid" in row
    row = next(line for line in report.paper_block(done).splitlines()
               if "Text past the training length: BiPE-RoPE" in line)
    assert "edge" not in row


def test_a_rescoring_study_is_paired_with_the_runs_it_rescored(tmp_path):
    # LM-Infinite on the text study's rope runs: flat at 16x where the plain runs grow.
    for seed, noise in enumerate([0.0, 2.0, -1.5]):
        cell = {"pe": "rope", "optim.lr": 0.003}
        put(tmp_path, "text_sweep", cell, seed,
            {"eval/ppl_1x": 100.0 + noise, "eval/ppl_16x": 250.0 + 3 * noise})
        if seed < 2:  # seed 2 not rescored yet
            put(tmp_path, "text_lm_infinite", cell, seed,
                {"eval/ppl_1x": 100.0 + noise, "eval/ppl_16x": 101.0 + noise})
    block, info = report.study_block(report.STUDIES["text_lm_infinite"], tmp_path, CONF,
                                     tmp_path / "figures", tmp_path, draw=False)
    level = next(v for v in info["verdicts"]
                 if v["claim"].a == "rope" and v["claim"].metric == "eval/ppl_16x")
    assert level["pair"].seeds == (0, 1) and level["verdict"] == REPRODUCED
    assert level["pair"].diff.mean == pytest.approx(((101 - 250) + (103 - 256)) / 2)
    assert re.search(r"\| rope \+ LM-Infinite vs rope +\| .* \| +reproduced \|", block)
    assert "`pe=rope,lr=0.003,seed=2`" in block  # the source run still to rescore
    assert "python -m evaluation.rescore text_lm_infinite" in block
    paper = report.paper_block({"text_lm_infinite": info})
    assert re.search(r"LM-Infinite keeps RoPE fluent .*\| reproduced", paper)
    assert re.search(r"LM-Infinite keeps BiPE-RoPE fluent .*\| not run", paper)  # no records
