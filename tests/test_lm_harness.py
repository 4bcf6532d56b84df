"""lm-evaluation-harness scores our checkpoints: the `bipe` model on a local task (a task YAML
over a local jsonl, offline), its log-likelihoods equal to a direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from data.config import DataConfig  # noqa: E402
from data.segment import Segmenter  # noqa: E402
from data.tokenizer import DocumentEncoder  # noqa: E402
from tests.helpers import tiny_model, write_run  # noqa: E402

DOCS = [{"question": "the king\nthe queen\nthe", "choices": [" lord", " sword", " night"],
         "answer": 0},
        {"question": "good lady\nnoble", "choices": [" crown", " war"], "answer": 1}]
TASK = """task: bipe_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """The continuation's log-probability, computed here with the run's own segmenter."""
    segmenter = Segmenter(DataConfig.from_dict({"name": "text_files", "glob": "x",
                                                "segmenter": "lines"}), tok)
    text = context + continuation
    ids, starts = DocumentEncoder(tok).encode_many([text])[0]
    flags = torch.tensor(np.asarray(segmenter.boundaries(text, ids, starts)))
    n = len(ids) - len(tok.encode(context).ids)
    x = torch.tensor(ids.astype(np.int64))
    with torch.no_grad():
        logits = model(x[None, :-1], flags[None, :-1])[0, -n:]
    return float(F.log_softmax(logits, -1).gather(1, x[-n:, None]).sum())


@pytest.mark.parametrize("pe", ["rope", "bipe_rope"])
def test_lm_eval_scores_a_local_task_with_our_loglikelihoods(pe, tokenizer, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import evaluation.lm_harness  # noqa: F401  registers --model bipe

    model = tiny_model(pe, vocab=tokenizer.get_vocab_size(), train_len=32, seed=5)
    run = write_run(tmp_path / "run", model, tokenizer)
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "bipe_local_mc.yaml").write_text(TASK.format(path=data))
    results = lm_eval.simple_evaluate(
        model="bipe", model_args=f"pretrained={run}", tasks=["bipe_local_mc"],
        task_manager=TaskManager(include_path=str(tasks)), device="cpu", batch_size=1,
        log_samples=True)
    assert 0.0 <= results["results"]["bipe_local_mc"]["acc,none"] <= 1.0
    samples = results["samples"]["bipe_local_mc"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        got = [resp[0][0] for resp in sample["resps"]]
        pairs = [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else tuple(a)
                 for a in sample["arguments"]]
        assert [p[0] for p in pairs] == [sample["doc"]["question"]] * len(pairs)
        want = [direct_loglikelihood(model, tokenizer, *p) for p in pairs]
        assert got == pytest.approx(want, abs=1e-4)


def test_rolling_loglikelihood_and_generation(tokenizer, tmp_path):
    from lm_eval.api.instance import Instance

    from evaluation.lm_harness import BipeLM

    model = tiny_model("bipe_alibi", vocab=tokenizer.get_vocab_size(), train_len=32, seed=2)
    lm = BipeLM(pretrained=str(write_run(tmp_path / "run", model, tokenizer)))
    text = "the king\nthe queen\n" * 6
    ids = tokenizer.encode(text).ids
    # Windows that tile the document exactly: each one the next `w` tokens after the last.
    w = next(d for d in range(8, len(ids) + 1) if len(ids) % d == 0)
    lm.max_length = w
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    # By hand: disjoint windows of w inputs, the first after the end-of-document token.
    eod = tokenizer.token_to_id("<|endoftext|>")
    seq = [eod, *ids]
    flags = [True, *lm.encode(text)[1]]
    total = 0.0
    for a in range(0, len(ids), w):
        x = torch.tensor(seq[a:a + w + 1])
        b = torch.tensor(flags[a:a + w + 1])
        with torch.no_grad():
            logits = model(x[None, :-1], b[None, :-1])[0]
        total += float(F.log_softmax(logits, -1).gather(1, x[1:, None]).sum())
    assert rolling == pytest.approx(total, abs=1e-3)
    out = lm.generate_until([Instance("generate_until", {}, ("the king\n", {
        "until": ["\n\n"], "max_gen_toks": 5}), 0)])[0]
    assert isinstance(out, str) and "\n\n" not in out


def lm_harness_cli(*args: str):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "evaluation.lm_harness", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_a_bad_pretrained_is_one_line_before_lm_eval_starts(tmp_path, monkeypatch, capsys):
    import lm_eval.__main__

    import evaluation.lm_harness as harness

    def lm_eval_started():
        raise AssertionError("lm_eval started before pretrained= was checked")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lm_eval_started)
    garbage = tmp_path / "random.ckpt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    cases = [(["--model_args", f"pretrained={tmp_path / 'nope'}"], "does not exist"),
             (["--model_args", f'{{"pretrained": "{garbage}"}}'], "is not a checkpoint"),
             (["-a", "device=cpu", "batch_size=1"], "needs --model_args pretrained=")]
    for args, needle in cases:
        with pytest.raises(SystemExit) as info:
            harness.main(["--model", "bipe", *args, "--tasks", "lambada_openai"])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1, err
        assert err[0].startswith("error: ") and needle in err[0]
        assert "checkpoint=" not in err[0]  # the option is pretrained=


def test_a_good_pretrained_is_loaded_once(tokenizer, tmp_path, monkeypatch):
    import lm_eval.__main__

    import evaluation.lm_harness as harness
    from models import Transformer

    run = write_run(tmp_path / "run", tiny_model("rope", vocab=tokenizer.get_vocab_size()),
                    tokenizer)
    loads, built = [], []
    real = Transformer.from_pretrained

    def counted(path, **kwargs):
        loads.append(path)
        return real(path, **kwargs)

    def lm_eval_run():  # what lm_eval does with --model bipe: the model from its arguments
        built.append(harness.BipeLM(pretrained=str(run)))
        return 0

    monkeypatch.setattr(Transformer, "from_pretrained", counted)
    monkeypatch.setattr(harness.sys, "argv", ["lm_harness"])
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lm_eval_run)
    with pytest.raises(SystemExit) as info:
        harness.main(["--model", "bipe", "--model_args", f"pretrained={run},device=cpu"])
    # Checked before lm_eval started, then handed over: loaded once.
    assert info.value.code == 0 and loads == [str(run)] and len(built) == 1
    assert harness.BipeLM(pretrained=str(run)).model is not built[0].model  # not kept twice
    assert harness.pretrained_arg(["--model", "hf", "--model_args", "pretrained=gpt2"]) is None


def test_the_command_with_a_missing_pretrained_is_one_line(tmp_path):
    result = lm_harness_cli("--model", "bipe", "--model_args", f"pretrained={tmp_path / 'x'}",
                            "--tasks", "lambada_openai", "--device", "cpu")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: pretrained={tmp_path / 'x'} does not exist"]
