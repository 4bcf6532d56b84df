"""SCROLLS: the official metrics, truncation, and fine-tuning + scoring + summary end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bipe.errors import ConfigError
from data import DataConfig
from data.tokenizer import train_bpe
from tasks.scrolls import ScrollsConfig
from tasks.scrolls_data import ScrollsEncoder
from tasks.scrolls_metrics import exact_match, f1, normalize_answer, rouge, score
from tests.conftest import WORDS, compose_train


def test_normalisation_drops_case_punctuation_and_articles():
    assert normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"


def test_f1_by_hand_and_best_reference():
    # "cat sat" vs "cat sat down": 2 common, precision 1, recall 2/3 -> F1 0.8
    assert f1("The cat sat", ["a cat sat down"]) == pytest.approx(80.0)
    assert f1("The cat sat", ["dog", "cat sat down", "the cat sat"]) == pytest.approx(100.0)
    assert f1("dog", ["cat"]) == 0.0
    assert f1("", [""]) == 100.0 and f1("a", [""]) == 100.0  # both empty after normalisation


def test_exact_match_after_normalisation_any_reference():
    assert exact_match("The Answer.", ["answer"]) == 100.0
    assert exact_match("Not mentioned", ["Entailment", "not mentioned"]) == 100.0
    assert exact_match("yes", ["no"]) == 0.0


def test_rouge_is_the_geometric_mean_of_the_best_of_each_measure():
    assert rouge("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge("alpha beta", ["gamma delta"]) == 0.0
    # One shared unigram out of two each, no shared bigram: ROUGE-2 = 0 -> geometric mean 0.
    assert rouge("alpha beta", ["alpha gamma"]) == 0.0
    # R1 = 2/3 (2 of 3 words each way), R2 = 1/2, RLsum = 2/3: (2/3 * 1/2 * 2/3) ** (1/3).
    expected = 100 * (2 / 3 * 1 / 2 * 2 / 3) ** (1 / 3)
    assert rouge("alpha beta gamma", ["alpha beta delta"]) == pytest.approx(expected)
    assert rouge("alpha beta gamma", ["x", "alpha beta delta"]) == pytest.approx(expected)
    assert score("gov_report", "alpha beta gamma", ["alpha beta delta"]) == pytest.approx(expected)
    assert score("qasper", "The cat sat", ["a cat sat down"]) == pytest.approx(80.0)


def test_bad_scrolls_configs_name_the_key():
    with pytest.raises(ConfigError, match="task.subset='squad'"):
        ScrollsConfig(**{"name": "scrolls", "subset": "squad"})
    with pytest.raises(ConfigError, match="task.truncate"):
        ScrollsConfig(**{"name": "scrolls", "truncate": "start"})
    with pytest.raises(ConfigError, match="task.data_files"):
        ScrollsConfig(**{"name": "scrolls", "data_files": {"train": "a.jsonl"}})


@pytest.fixture(scope="module")
def encoder_parts():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=40)) + "." for _ in range(50)]
    tok = train_bpe(texts, 300)
    return tok, DataConfig.from_dict({"name": "text_files", "glob": "x", "segmenter": "lines"})


@pytest.mark.parametrize("truncate", ["end", "middle"])
def test_truncation_keeps_exactly_the_configured_input_and_never_cuts_the_answer(
        encoder_parts, truncate):
    tok, data = encoder_parts
    eod = tok.token_to_id("<|endoftext|>")
    enc = ScrollsEncoder(tok, data, eod, max_input_tokens=10, truncate=truncate,
                         separator="\nAnswer:")
    text = "\n".join(" ".join(WORDS[i : i + 6]) for i in range(0, 18, 3))
    answer = "the brave king and the gentle queen speak of peace"
    full = tok.encode(text, add_special_tokens=False).ids
    assert len(full) > 10
    ex = enc.example(text, answer, index=3)
    p = ex.extras["prompt_len"]
    kept, sep = list(ex.ids[: p - len(enc.separator)]), list(ex.ids[p - len(enc.separator) : p])
    assert len(kept) == 10 and sep == enc.separator.tolist()
    if truncate == "end":
        assert kept == full[:10]
    else:
        assert kept == full[:5] + full[-5:]
    assert list(ex.ids[p:]) == tok.encode(answer, add_special_tokens=False).ids + [eod]
    assert ex.scored == (False,) * p + (True,) * (len(ex.ids) - p)  # loss on the answer only
    assert ex.boundary[p - 1] and ex.boundary[-1]  # separator and EOD close segments
    short = enc.example("a king", "yes", index=0)  # shorter than the limit: untouched
    assert list(short.ids[: len(tok.encode("a king").ids)]) == tok.encode("a king").ids


def write_scrolls(folder, n_train=6, n_val=3):
    rows = {"train": [], "validation": []}
    for split, n in (("train", n_train), ("validation", n_val)):
        for i in range(n):
            word = WORDS[i % len(WORDS)]
            question = f"Question {i}: which word follows? The king said {word}."
            rows[split].append({"id": f"{split}{i}", "pid": f"{split}{i}_0",
                                "input": question, "output": word})
    rows["validation"].append({"id": "validation0", "pid": "validation0_1", "input":
                               rows["validation"][0]["input"], "output": "another answer"})
    files = {}
    for split, records in rows.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        files[split] = str(path)
    return files


def test_scrolls_fine_tunes_scores_and_summarises(run_train, tmp_path):
    from evaluation.task_summary import main as summary_main
    from models import Transformer
    from tasks.scrolls_data import ScrollsDataModule
    from train import train

    _, base = run_train("base", "pe=bipe_rope")
    files = write_scrolls(tmp_path)
    sweep = tmp_path / "sweep"
    reports = []
    for n, subset in enumerate(["qasper", "quality"]):
        run_dir = sweep / f"{n}_task.subset={subset}"
        cfg = compose_train([
            "task=scrolls", f"init_from={base}", f"task.subset={subset}", "logger=none",
            f"task.data_files={{train: {files['train']}, validation: {files['validation']}}}",
            "task.max_input_tokens=24", "task.max_new_tokens=3", "task.batch_size=2",
            "task.eval_batch_size=2", "task.n_val=2", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.enable_model_summary=false",
            "optim.warmup_steps=1", f"paths.cache_dir={tmp_path / 'cache'}"], run_dir)
        metrics = train(cfg)
        report = json.loads((run_dir / "task_eval.json").read_text())
        reports.append(report)
        row = report["results"][0]
        assert report["task"] == "scrolls" and report["split"] == "validation"
        assert row["setting"] == subset and row["count"] == 3  # every validation id
        assert metrics[f"test/{subset}/score"] == row["score"]
        # The reported score is the saved final model's, recomputed by hand here.
        model = Transformer.from_pretrained(run_dir / "checkpoints" / "last.ckpt")
        meta = model.meta
        assert meta["model_config"]["pe"]["name"] == "bipe_rope"  # from the pretrained run
        dm = ScrollsDataModule(report["task_config"], meta["tokenizer"],
                               meta["data_stats"]["text_data"])
        answers = [a for b in dm.test_dataloader()[0] for a in dm.predict(model, b)]
        by_hand = np.mean([score(subset, a, ex.outputs) / 100
                           for a, ex in zip(answers, dm.validation, strict=True)])
        assert row["score"] == pytest.approx(by_hand)
        assert len(dm.validation[0].outputs) == 2  # two references for one id

    assert summary_main([str(sweep), "--wandb-mode", "disabled"]) == 0
    table = (sweep / "summary.md").read_text()
    assert "qasper" in table and "quality" in table and "average" in table
    mean = 100 * np.mean([r["results"][0]["score"] for r in reports])
    assert f"{mean:.1f}%" in table.splitlines()[-1]


def test_scrolls_needs_a_pretrained_checkpoint(tmp_path):
    from train import train

    cfg = compose_train(["task=scrolls", "logger=none", "task.data_files={train: a, "
                         "validation: b}"], tmp_path)
    with pytest.raises(ConfigError, match="init_from="):
        train(cfg)
