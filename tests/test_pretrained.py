"""One loader, one saver, and the way out to other tools: `Transformer.from_pretrained` /
`save_pretrained` / `push_to_hub`, `LanguageModel.load_from_checkpoint`, the transformers Llama
export and the lm-evaluation-harness model."""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from bipe.errors import CheckpointError
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
    assert sorted(p.name for p in saved.iterdir()) == ["bipe_manifest.json", "config.json",
                                                       "model.safetensors", "tokenizer.json"]
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
    model = tiny_model("rope", vocab=tokenizer.get_vocab_size())
    saved = model.save_pretrained(tmp_path / "saved", tokenizer=tokenizer)
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors does not match its SHA-256"):
        Transformer.from_pretrained(saved)
    (saved / "bipe_manifest.json").unlink()  # as saved before manifests: safetensors judges
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


# -- a saved folder is whole or absent -------------------------------------------------------


class Disk:
    """The file-system steps of a save (file writes, fsyncs, links and copies, renames, the
    folder exchange), counted; step `fail_at` fails as a full disk would, a write half done.
    With `kill`, every later step fails too and nothing is removed: what a process killed at
    that step leaves behind."""

    def __init__(self, mp: pytest.MonkeyPatch, fail_at: int | None = None, kill: bool = False,
                 exchange: bool = True):
        import bipe.io

        self.steps, self.fail_at, self.kill, self.dead = 0, fail_at, kill, False
        rmtree = shutil.rmtree

        def fails() -> bool:
            self.steps += 1
            if self.dead:
                return True
            if self.steps == self.fail_at:
                self.dead = kill
                return True
            return False

        def full() -> OSError:
            return OSError(errno.ENOSPC, "No space left on device (injected)")

        def step(real):
            def run(*args, **kwargs):
                if fails():
                    raise full()
                return real(*args, **kwargs)
            return run

        def half(real):
            def write(path, data, *args, **kwargs):
                was_dead = self.dead
                if fails():
                    if not was_dead:
                        real(path, data[:len(data) // 2], *args, **kwargs)
                    raise full()
                return real(path, data, *args, **kwargs)
            return write

        def remove(path, ignore_errors=False, **kwargs):
            if not self.dead:  # a killed process removes nothing
                rmtree(path, ignore_errors=ignore_errors, **kwargs)

        mp.setattr(Path, "write_bytes", half(Path.write_bytes))
        mp.setattr(Path, "write_text", half(Path.write_text))
        for name in ("fsync", "rename", "replace", "link"):
            mp.setattr(os, name, step(getattr(os, name)))
        mp.setattr(shutil, "copy2", step(shutil.copy2))
        mp.setattr(shutil, "rmtree", remove)
        mp.setattr(bipe.io, "exchange_paths",
                   step(bipe.io.exchange_paths) if exchange else lambda a, b: False)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("existing", [True, False], ids=["over-a-save", "new-folder"])
@torch.no_grad()
def test_a_save_cut_short_at_any_step_leaves_the_old_folder_or_the_new_one(
        existing, exchange, tokenizer, tmp_path, monkeypatch):
    """A failure (full disk) or a kill at every step of save_pretrained leaves, at the folder,
    the old save or the new one, never new weights beside the old tokenizer or config; the
    user's own file stays; the next save removes what a killed one left. The new save has no
    tokenizer, so an old tokenizer.json left beside it would show."""
    vocab = tokenizer.get_vocab_size()
    models = {"old": tiny_model("bipe_rope", vocab=vocab, seed=1),
              "new": tiny_model("bipe_rope", vocab=vocab, seed=2)}
    ids, boundary = random_batch(1, 16, vocab=vocab)
    want = {name: model(ids, boundary) for name, model in models.items()}

    def save(folder: Path, which: str) -> None:
        models[which].save_pretrained(folder, tokenizer=tokenizer if which == "old" else None,
                                      meta={"which": which})

    def state(folder: Path) -> str:
        if not folder.exists():
            return "absent"
        loaded = Transformer.from_pretrained(folder)
        which = loaded.meta["which"]
        assert torch.equal(loaded(ids, boundary), want[which])
        assert (loaded.tokenizer is not None) == (which == "old")
        if existing:
            assert (folder / "notes.md").read_text() == "mine"
        return which

    def cut_short(fail_at: int | None, kill: bool) -> tuple[Path, int]:
        folder = tmp_path / f"{fail_at}-{kill}" / "model"
        if existing:
            save(folder, "old")
            (folder / "notes.md").write_text("mine")
        with monkeypatch.context() as mp:
            disk = Disk(mp, fail_at, kill, exchange)
            try:
                save(folder, "new")
            except OSError as exc:
                assert "injected" in str(exc)
        return folder, disk.steps

    folder, steps = cut_short(None, kill=False)
    assert state(folder) == "new" and steps >= 8
    seen = set()
    for kill in (False, True):
        for n in range(1, steps + 1):
            folder, _ = cut_short(n, kill)
            found = state(folder)
            seen.add((kill, found))
            if found == "absent" and existing:  # killed between the two renames
                assert kill and not exchange
                with pytest.raises(CheckpointError, match="was interrupted .* rename that"):
                    Transformer.from_pretrained(folder)
            else:
                assert found in ({"old", "new"} if existing else {"absent", "new"}), (kill, n)
            if not kill:  # a failure removes its own hidden folders
                assert [p.name for p in folder.parent.iterdir()] in ([], ["model"])
            save(folder, "new")
            assert state(folder) == "new"
            assert [p.name for p in folder.parent.iterdir()] == ["model"]  # leftovers removed
    # both sides of the swap were hit, and only two renames can leave no folder
    assert {(False, "new"), (True, "new")} <= seen
    if existing:
        assert {(False, "old"), (True, "old")} <= seen
        assert ((True, "absent") in seen) == (not exchange)


@torch.no_grad()
def test_a_changed_byte_in_a_saved_folder_is_refused_in_one_line(tokenizer, tmp_path, caplog,
                                                                 capsys):
    from safetensors.torch import load_file

    from models.export_hf import main

    model = tiny_model("rope", vocab=tokenizer.get_vocab_size())
    saved = model.save_pretrained(tmp_path / "saved", tokenizer=tokenizer)
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] = (data[-2] + 137) % 256  # inside the last tensor: one weight off, no format damage
    weights.write_bytes(bytes(data))
    assert load_file(weights)  # safetensors alone takes it
    with pytest.raises(CheckpointError) as info:
        Transformer.from_pretrained(saved)
    said = str(info.value)
    assert "\n" not in said and said.startswith(f"{weights} does not match its SHA-256")
    assert "copy the folder again" in said
    assert main(["--ckpt", str(saved), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(weights) in err[0]
    # an edited config is refused the same way
    fresh = model.save_pretrained(tmp_path / "fresh", tokenizer=tokenizer)
    config = fresh / "config.json"
    config.write_text(config.read_text().replace('"n_layers": 2', '"n_layers": 1'))
    with pytest.raises(CheckpointError, match="config.json does not match its SHA-256"):
        Transformer.from_pretrained(fresh)
    # saved before manifests existed: loads, with a warning that nothing was verified
    (saved / "bipe_manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="models.pretrained"):
        loaded = Transformer.from_pretrained(saved)
    assert "cannot be verified" in caplog.text
    ids, boundary = random_batch(1, 8, vocab=tokenizer.get_vocab_size())
    assert not torch.equal(loaded(ids, boundary), model(ids, boundary))  # what it would cost


def test_a_folder_saved_over_other_files_is_refused_unless_asked(tokenizer, tmp_path):
    model = tiny_model("alibi", vocab=tokenizer.get_vocab_size())
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.md").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty .* overwrite=True"):
        model.save_pretrained(folder, tokenizer=tokenizer)
    assert [p.name for p in folder.iterdir()] == ["notes.md"]
    model.save_pretrained(folder, tokenizer=tokenizer, overwrite=True)
    model.save_pretrained(folder)  # a previous save: replaced, no tokenizer left behind
    assert sorted(p.name for p in folder.iterdir()) == [
        "bipe_manifest.json", "config.json", "model.safetensors", "notes.md"]
    with pytest.raises(CheckpointError, match="is a file"):
        model.save_pretrained(folder / "notes.md")


def test_evaluating_a_saved_folder_without_its_tokenizer_is_one_clear_error(tokenizer, tmp_path,
                                                                            cache_dir):
    from eval import evaluate
    from tests.test_eval import compose_eval

    model = Transformer.from_pretrained(
        write_run(tmp_path / "run", tiny_model("rope", vocab=tokenizer.get_vocab_size()),
                  tokenizer))
    model.tokenizer = None
    bare = model.save_pretrained(tmp_path / "bare")
    with pytest.raises(CheckpointError) as info:
        evaluate(compose_eval([f"ckpt_path={bare}", "logger=none"], tmp_path / "e", cache_dir))
    said = str(info.value)
    assert "\n" not in said and said.startswith(f"{bare} has no tokenizer.json")
    # a copy that lost the tokenizer.json its manifest lists
    copy = Transformer.from_pretrained(tmp_path / "run").save_pretrained(tmp_path / "copy")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer.json is missing, though bipe_manifest"):
        evaluate(compose_eval([f"ckpt_path={copy}", "logger=none"], tmp_path / "e", cache_dir))


# -- the Hub ---------------------------------------------------------------------------------


class FakeHub:
    """`HfApi` and `snapshot_download` over a local folder (`<root>/<owner>/<name>`), so the
    Hub code runs without the network."""

    def __init__(self, root: Path):
        self.root, self.commits, self.downloads = root, [], 0

    def api(self, token=None):
        return self

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **_):
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, delete_patterns=(),
                      **_):
        repo, new = self.root / repo_id, {p.name: p for p in Path(folder_path).iterdir()}
        assert repo.is_dir(), "upload_folder before create_repo"
        for old in repo.iterdir():  # as the Hub does: a pattern never deletes an uploaded file
            if old.name not in new and any(fnmatch.fnmatch(old.name, d) for d in delete_patterns):
                old.unlink()
        for name, path in new.items():
            shutil.copyfile(path, repo / name)
        self.commits.append(commit_message)
        return f"commit {len(self.commits)}"

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, **_):
        self.downloads += 1
        repo, cache = self.root / repo_id, self.root.parent / "cache" / repo_id
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        for path in repo.iterdir():
            if any(fnmatch.fnmatch(path.name, a) for a in allow_patterns or ["*"]):
                shutil.copyfile(path, cache / path.name)
        return str(cache)


@torch.no_grad()
def test_a_model_pushed_to_the_hub_loads_back_by_its_repo_id(tokenizer, tmp_path, monkeypatch):
    import huggingface_hub

    from models.pretrained import is_hub_id

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    monkeypatch.chdir(tmp_path)
    vocab = tokenizer.get_vocab_size()
    model = tiny_model("bipe_alibi", vocab=vocab, seed=4)
    ids, boundary = random_batch(2, 16, vocab=vocab)
    assert model.push_to_hub("me/tiny", tokenizer=tokenizer, meta={"note": "v1"}) == "commit 1"
    repo = hub.root / "me" / "tiny"
    (repo / "README.md").write_text("model card")  # written on the Hub, not by us
    loaded = Transformer.from_pretrained("me/tiny")
    assert torch.equal(loaded(ids, boundary), model(ids, boundary))
    assert loaded.tokenizer.to_str() == tokenizer.to_str() and loaded.meta["note"] == "v1"
    # a second push is one commit that also removes the first one's tokenizer.json
    model.push_to_hub("me/tiny", meta={"note": "v2"})
    assert sorted(p.name for p in repo.iterdir()) == [
        "README.md", "bipe_manifest.json", "config.json", "model.safetensors"]
    assert Transformer.from_pretrained("me/tiny").tokenizer is None
    # an existing local path is never taken for a repo id
    other = tiny_model("bipe_alibi", vocab=vocab, seed=5)
    other.save_pretrained(tmp_path / "me" / "tiny")
    downloads = hub.downloads
    assert torch.equal(Transformer.from_pretrained("me/tiny")(ids, boundary),
                       other(ids, boundary))
    assert hub.downloads == downloads
    assert not any(map(is_hub_id, ["./me/x", str(tmp_path / "x"), "runs/last.ckpt", "a/b/c",
                                   Path("me/x"), "bad//id"]))


def test_a_hub_repo_id_offline_is_one_clear_error(tokenizer, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no request can leave the machine
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        Transformer.from_pretrained("me/not-cached", key="ckpt_path")
    said = str(info.value)
    assert "\n" not in said and said.startswith("ckpt_path=me/not-cached is no local path")
    assert "HF_HUB_OFFLINE=1" in said
    model = tiny_model("rope", vocab=tokenizer.get_vocab_size())
    with pytest.raises(CheckpointError, match="cannot push to Hub repo me/x: HF_HUB_OFFLINE"):
        model.push_to_hub("me/x", tokenizer=tokenizer)
