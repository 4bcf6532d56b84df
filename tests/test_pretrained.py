"""One loader, one saver, and the way out to other tools: `Transformer.from_pretrained` /
`save_pretrained`, `LanguageModel.load_from_checkpoint`, the transformers Llama export and the
lm-evaluation-harness model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models import Transformer
from tests.helpers import ENCODINGS, TEXTS, random_batch, tiny_model, write_run


@pytest.mark.parametrize("pe", ENCODINGS)
@torch.no_grad()
def test_every_loader_gives_the_same_model_for_every_encoding(pe, tokenizer, tmp_path):
    """A run folder, its .ckpt and the folder save_pretrained writes load to identical logits;
    the saved folder is the Hub layout and carries the tokenizer and the metadata."""
    model = tiny_model(pe, vocab=tokenizer.get_vocab_size(), train_len=32, seed=3)
    run = write_run(tmp_path / "run", model, tokenizer)
    ids, boundary = random_batch(2, 24, vocab=tokenizer.get_vocab_size())
    want = model(ids, boundary)
    from_run = Transformer.from_pretrained(run)
    from_ckpt = Transformer.from_pretrained(run / "checkpoints" / "last.ckpt")
    saved = from_run.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors",
                                                       "tokenizer.json"]
    from_saved = Transformer.from_pretrained(saved)
    for loaded in (from_run, from_ckpt, from_saved):
        assert not loaded.training and loaded.config == model.config
        assert torch.equal(loaded(ids, boundary), want)
        assert loaded.tokenizer.to_str() == tokenizer.to_str()
        assert loaded.meta["data_stats"] == {"max_segments_per_block": 12}
    # save -> load -> save gives the same files' content
    again = Transformer.from_pretrained(from_saved.save_pretrained(tmp_path / "again"))
    assert torch.equal(again(ids, boundary), want)
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == \
        json.loads((saved / "config.json").read_text())


def test_a_foreign_or_damaged_folder_is_one_clear_error(tokenizer, tmp_path):
    from bipe.errors import CheckpointError

    model = tiny_model("rope", vocab=tokenizer.get_vocab_size())
    saved = model.save_pretrained(tmp_path / "saved", tokenizer=tokenizer)
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read"):
        Transformer.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="models.convert_hf"):
        Transformer.from_pretrained(saved)


def test_hugging_face_scaling_keys_give_the_same_frequencies():
    from bipe.rope import rope_frequencies

    ours = {"type": "yarn", "factor": 4.0, "original_max_position": 256, "beta_fast": 32,
            "beta_slow": 1}
    hf = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
          "beta_fast": 32, "beta_slow": 1}
    a, sa = rope_frequencies(32, 10000.0, ours)
    b, sb = rope_frequencies(32, 10000.0, hf)
    assert torch.equal(a, b) and sa == sb == pytest.approx(0.1 * math.log(4) + 1)
    assert rope_frequencies(32, 10000.0, {"rope_type": "default"})[1] == 1.0
    lin = rope_frequencies(32, 10000.0, {"rope_type": "linear", "factor": 2.0})[0]
    torch.testing.assert_close(lin, rope_frequencies(32, 10000.0)[0] / 2)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 16}])
@torch.no_grad()
def test_a_rope_model_exports_to_transformers_llama_with_equal_logits(scaling, tokenizer,
                                                                     tmp_path):
    transformers = pytest.importorskip("transformers")
    from bipe.config import PEConfig
    from models.export_hf import main

    pe = PEConfig.named("rope", scaling=scaling)
    model = tiny_model(pe, vocab=tokenizer.get_vocab_size(), seed=1)
    run = write_run(tmp_path / "run", model, tokenizer, block_size=16)
    out = tmp_path / "llama"
    assert main(["--ckpt", str(run), "--out", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids, _ = random_batch(2, 40, vocab=tokenizer.get_vocab_size())  # longer than 16: scaled
    torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = TEXTS[0]
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tok.eos_token == "<|endoftext|>"


def test_other_encodings_export_their_own_folder_and_say_why(tokenizer, tmp_path, capsys):
    from models.export_hf import main

    model = tiny_model("bipe_rope", vocab=tokenizer.get_vocab_size())
    run = write_run(tmp_path / "run", model, tokenizer)
    assert main(["--ckpt", str(run), "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    assert "not a Llama model" in said and "intra-segment table" in said
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_the_lightning_module_loads_from_its_checkpoint_alone(run_train):
    """`LanguageModel.load_from_checkpoint(path)`, no other argument, for a training run."""
    from training.module import LanguageModel

    _, run = run_train("module", "pe=bipe_alibi")
    last = run / "checkpoints" / "last.ckpt"
    module = LanguageModel.load_from_checkpoint(last)
    model = Transformer.from_pretrained(last)
    ids, boundary = random_batch(2, 16, vocab=model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(module(ids, boundary), model(ids, boundary))
    assert not module.training and module.optim.lr == pytest.approx(3e-3)
