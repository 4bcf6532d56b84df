"""`python -m evaluation.rescore`: a study's finished runs evaluated again with an inference-time
option, recorded like study runs; skipped once recorded; a checkpoint that does not reproduce its
source record, or one that is missing, is named and refused."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from evaluation import rescore
from evaluation.records import read_record, write_record
from tests.conftest import compose_train, smoke_overrides

RUN = "pe=rope,lr=0.003,seed=0"
SPEC = rescore.Rescore("tiny_lminf", source="tiny", pe=("rope",),
                       overrides=("eval.lm_infinite.enabled=true",), about="LM-Infinite")


@pytest.fixture
def study(corpus, cache_dir, tmp_path) -> Path:
    """A one-run study `tiny` laid out as a real one: results/tiny/<run>.json and the run's
    folder studies/tiny/<run>/ with its checkpoints."""
    from train import train

    cfg = compose_train([*smoke_overrides(corpus, cache_dir), "pe=rope", "study.name=tiny",
                         "study.cell=[pe,optim.lr]", f"study.results_dir={tmp_path / 'results'}",
                         "eval.lengths=[1,2]", "eval.max_blocks=null"],
                        tmp_path / "studies" / "tiny" / RUN)
    train(cfg)
    assert (tmp_path / "results" / "tiny" / f"{RUN}.json").is_file()
    return tmp_path


def call(root: Path, cache_dir: str, spec: rescore.Rescore = SPEC) -> int:
    return rescore.run(spec, root / "results", root / "studies", Path(cache_dir))


def test_a_rescored_run_is_recorded_once_beside_its_source(study, cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="evaluation.rescore")
    assert call(study, cache_dir) == 0
    source = read_record(study / "results" / "tiny" / f"{RUN}.json")
    path = study / "results" / "tiny_lminf" / f"{RUN}.json"
    record = read_record(path)
    assert record.study == "tiny_lminf" and record.cell == source.cell
    assert record.seed == source.seed and record.data["steps"] == source.data["steps"]
    assert record.data["definition"]["source"] == source.data["fingerprint"]
    assert record.data["definition"]["eval.lm_infinite.enabled"] is True
    assert set(record.metrics) == {"eval/ppl_1x", "eval/ppl_2x"}
    assert all(row["lm_infinite"] for row in record.data["results"])
    # Inside the training length the Λ window (n_local = the training length) sees every key and
    # the distance cap is not reached: LM-Infinite must give the plain perplexity there.
    assert math.isclose(record.metric("eval/ppl_1x"), source.metric("eval/ppl_1x"),
                        rel_tol=1e-4)
    assert math.isfinite(record.metric("eval/ppl_2x"))
    written = path.read_text()
    assert call(study, cache_dir) == 0
    assert path.read_text() == written and "skipped" in caplog.text

    # Another evaluation setting is another definition: the run is rescored and replaced.
    wider = rescore.Rescore("tiny_lminf", source="tiny", pe=("rope",), about="LM-Infinite",
                            overrides=("eval.lm_infinite.enabled=true",
                                       "eval.lm_infinite.n_global=4"))
    assert call(study, cache_dir, wider) == 0
    assert read_record(path).data["definition"]["eval.lm_infinite.n_global"] == 4


def test_a_checkpoint_that_does_not_reproduce_its_record_is_refused(study, cache_dir, capsys):
    source = study / "results" / "tiny" / f"{RUN}.json"
    data = json.loads(source.read_text())
    data["metrics"]["eval/ppl_1x"] *= 1.01  # as if the record described other weights
    write_record(source, data)
    assert call(study, cache_dir) == 2
    err = capsys.readouterr().err
    assert "is not the run the record describes" in err and err.count("\n") == 1
    assert not (study / "results" / "tiny_lminf").exists()  # nothing half-made


def test_a_missing_checkpoint_is_named_and_the_exit_is_2(study, cache_dir, capsys):
    folder = study / "studies" / "tiny" / RUN / "checkpoints"
    for ckpt in folder.glob("*.ckpt"):
        ckpt.unlink()
    assert call(study, cache_dir) == 2
    err = capsys.readouterr().err
    assert "last.ckpt does not exist" in err and "python train.py -m experiment=tiny" in err


def test_an_unknown_study_or_a_source_without_records_is_one_line(tmp_path, capsys):
    assert rescore.main(["nope", "--results", str(tmp_path)]) == 2
    assert "is not a rescoring study; choose one of text_lm_infinite" in capsys.readouterr().err
    assert rescore.main(["text_lm_infinite", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results/text_sweep/ has no study records of rope, bipe_rope" in err


def test_a_source_that_scored_a_subset_of_blocks_is_refused(tmp_path, capsys):
    write_record(tmp_path / "results" / "tiny" / f"{RUN}.json", {
        "study": "tiny", "cell": {"pe": "rope", "optim.lr": 0.003}, "seed": 0,
        "fingerprint": "f", "metrics": {"eval/ppl_1x": 100.0}, "stages": ["study"],
        "definition": {"eval.lengths": [1, 2], "eval.split": "test", "eval.max_blocks": 4}})
    assert call(tmp_path, str(tmp_path / "cache")) == 2
    assert "needs source runs made with eval.max_blocks=null" in capsys.readouterr().err


def test_a_finetuning_stage_trains_from_each_run_and_records_its_report(study, corpus,
                                                                         cache_dir):
    from models.checkpoint import load_checkpoint

    yarn = ("experiment=smoke", "data=text_files", f"data.glob={corpus}",
            "finetune.model_from_checkpoint=true", "finetune.block_size_factor=2",
            "pe.relative.scaling={type: yarn, factor: 2, original_max_position: null}",
            "optim.lr=2e-5", "eval.lengths=[1,2]", "eval.max_blocks=null")
    spec = rescore.Rescore("tiny_yarn", source="tiny", pe=("rope",), about="YaRN",
                           finetune=yarn)
    assert call(study, cache_dir, spec) == 0
    record = read_record(study / "results" / "tiny_yarn" / f"{RUN}.json")
    assert record.data["definition"]["finetune"][:len(yarn)] == list(yarn)
    assert set(record.metrics) >= {"eval/ppl_1x", "eval/ppl_2x", "val/loss"}
    assert record.data["steps"] == 6
    assert [row["length"] for row in record.data["results"]] == [64, 128]  # 2 x 32-token blocks
    # The stage started from the source run's weights and carries the YaRN scaling it trained.
    meta = load_checkpoint(study / "studies" / "tiny_yarn" / RUN / "checkpoints" / "last.ckpt"
                           )["bipe"]
    assert meta["run_config"]["init_from"].endswith(f"{RUN}/checkpoints/last.ckpt")
    assert meta["model_config"]["pe"]["relative"]["scaling"]["type"] == "yarn"
