"""`python -m models.export_hf` never deletes what it did not write: a folder of other files needs
`--overwrite` and keeps them, a previous export is replaced as a whole, and the files it writes
get the umask's permissions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from models.export_hf import main
from tests.helpers import tiny_model, write_run

# rope: a transformers Llama folder; bipe_rope: a save_pretrained folder
KINDS = ["rope", "bipe_rope"]


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(folder: Path) -> set[str]:
    return set(json.loads((folder / "bipe_manifest.json").read_text())["files"])


def user_folder(out: Path) -> dict[str, bytes]:
    """A folder of a user's own files, one of them named like an export's."""
    (out / "data").mkdir(parents=True)
    (out / "notes.md").write_text("mine")
    (out / "data" / "table.csv").write_text("a,b\n1,2\n")
    (out / "config.json").write_text('{"mine": true}\n')
    return contents(out)


@pytest.mark.parametrize("pe", KINDS)
def test_export_into_a_folder_of_other_files_needs_overwrite_and_keeps_them(pe, tokenizer,
                                                                            tmp_path, capsys):
    pytest.importorskip("transformers")
    run = write_run(tmp_path / "run", tiny_model(pe, vocab=tokenizer.get_vocab_size()),
                    tokenizer, block_size=16)
    out = tmp_path / "out"
    before = user_folder(out)
    assert main(["--ckpt", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out={out} is not empty"), err
    assert "--overwrite" in err[0]
    assert contents(out) == before  # refused before anything was written

    assert main(["--ckpt", str(run), "--out", str(out), "--overwrite"]) == 0
    after = contents(out)
    assert {k: after[k] for k in ("notes.md", "data/table.csv")} == \
        {k: before[k] for k in ("notes.md", "data/table.csv")}
    assert after["config.json"] != before["config.json"]  # a name the export writes is its own
    written = manifest(out)
    assert "config.json" in written and not written & {"notes.md", "data/table.csv"}
    assert set(after) == written | {"bipe_manifest.json", "notes.md", "data/table.csv"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # now a previous export: the next one needs no --overwrite and still keeps the user's files
    assert main(["--ckpt", str(run), "--out", str(out)]) == 0
    assert contents(out) == after

    (tmp_path / "file").write_text("x")
    assert main(["--ckpt", str(run), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_new_export_replaces_a_previous_one_of_another_kind_as_a_whole(tokenizer, tmp_path):
    """A Llama export followed by a save_pretrained one leaves no Llama file behind (a folder
    transformers would still half read), and the user's file added in between stays."""
    pytest.importorskip("transformers")
    from models import Transformer

    vocab = tokenizer.get_vocab_size()
    rope = write_run(tmp_path / "rope", tiny_model("rope", vocab=vocab), tokenizer)
    bipe = write_run(tmp_path / "bipe", tiny_model("bipe_rope", vocab=vocab), tokenizer)
    out = tmp_path / "out"
    assert main(["--ckpt", str(rope), "--out", str(out)]) == 0
    llama = manifest(out)
    assert {"generation_config.json", "tokenizer_config.json"} <= llama
    (out / "notes.md").write_text("mine")
    assert main(["--ckpt", str(bipe), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "bipe_manifest.json", "config.json", "model.safetensors", "notes.md", "tokenizer.json"]
    assert Transformer.from_pretrained(out).config.pe.name == "bipe_rope"


@pytest.mark.parametrize("pe", KINDS)
def test_exported_files_get_the_permissions_of_the_umask(pe, tokenizer, tmp_path):
    """transformers writes the weights through a private temporary file; a folder a group shares
    must still be readable by the group."""
    pytest.importorskip("transformers")
    run = write_run(tmp_path / "run", tiny_model(pe, vocab=tokenizer.get_vocab_size()),
                    tokenizer)
    out = tmp_path / "out"
    old = os.umask(0o002)
    try:
        assert main(["--ckpt", str(run), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o664}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
