"""Sources: Shakespeare Markdown cleaning, stdlib selection, hash splits, hub streaming."""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from data.config import DataConfig  # noqa: E402
from data.sources import (  # noqa: E402
    Document,
    HubSource,
    PythonCodeSource,
    ShakespeareSource,
    hash_split,
    markdown_to_text,  # noqa: E402
)

PLAY = """# The Test

## ACT I

### SCENE I. A room.

_Enter HAMLET and
HORATIO_

**HAMLET**|
To be, or not to be:|
that is the question. __\\[Aside]_|
Whether 'tis nobler.

**HORATIO**|
_\\[Aside to HAMLET]_|
My lord!

*Exeunt.*
""".replace("|\n", "  \n")  # "|" marks a Markdown hard break


def test_markdown_rules_on_a_snippet():
    assert markdown_to_text(PLAY) == (
        "The Test\n\nACT I\n\nSCENE I. A room.\n\n[Enter HAMLET and HORATIO]\n\n"
        "HAMLET:\nTo be, or not to be:\nthat is the question. [Aside]\nWhether 'tis nobler.\n\n"
        "HORATIO:\n[Aside to HAMLET]\nMy lord!\n\n[Exeunt.]\n"
    )


def test_real_shakespeare_corpus(tmp_path):
    # the one test on the real corpus: cleaning and the split (no tokenization)
    src = ShakespeareSource(DataConfig.from_dict({"cache_dir": str(tmp_path)}))
    corpus = src.load()
    sizes = {s: len(d) for s, d in corpus.splits.items()}
    assert sizes == {"train": 32, "validation": 3, "test": 3}
    names = {s: {d.name for d in docs} for s, docs in corpus.splits.items()}
    assert names["validation"] == {"julius-caesar", "the-tempest", "twelfth-night"}
    assert not names["train"] & (names["validation"] | names["test"])
    hamlet = next(d.text for d in corpus.splits["train"] if d.name == "hamlet")
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "\nBERNARDO:\nWho's there?\n" in hamlet and "[Enter Ghost]" in hamlet
    for docs in corpus.splits.values():
        for d in docs:
            assert not re.search(r"\*\*|\\|^#|_", d.text, re.M), d.name  # no markup left
            assert "\n\n\n" not in d.text and d.text.endswith("\n")
    assert sum(len(d.text) for docs in corpus.splits.values() for d in docs) > 4_500_000
    # the cache key material is cheap and stable
    assert src.fingerprint() == src.fingerprint()


def test_held_out_plays_are_validated(tmp_path):
    from bipe.errors import ConfigError

    cfg = DataConfig.from_dict({"cache_dir": str(tmp_path), "validation_plays": ["hamlet2"]})
    with pytest.raises(ConfigError, match="data.validation_plays"):
        ShakespeareSource(cfg).fingerprint()


def test_python_code_skips_test_suites(tmp_path):
    root = tmp_path / "lib"
    for rel in ("os.py", "abc.py", "json/__init__.py", "test/test_os.py", "unittest/test/t.py",
                "idlelib/idle_test/x.py", "lib2to3/tests/y.py", "site-packages/pkg/z.py",
                "json/data.bin"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    (root / "bad.py").write_bytes(b"\x00\x01binary")
    src = PythonCodeSource(DataConfig.from_dict({"name": "python_code", "cache_dir": str(tmp_path),
                                                 "stdlib_path": str(root)}))
    files = sorted(p.relative_to(root).as_posix() for p in src._files())
    assert files == ["abc.py", "bad.py", "json/__init__.py", "os.py"]
    corpus = src.load()
    assert corpus.stats["skipped_binary_files"] == 1
    assert sorted(d.name for v in corpus.splits.values() for d in v) == [
        "abc.py", "json/__init__.py", "os.py"]


def test_hash_split_is_stable_and_non_empty():
    docs = [Document(f"file{i}.txt", "x") for i in range(200)]
    splits = hash_split(docs, 0.1, 0.1, "test")
    assert sum(len(v) for v in splits.values()) == 200
    assert 5 < len(splits["validation"]) < 40 and 5 < len(splits["test"]) < 40
    # adding documents never moves an existing one to another split
    more = hash_split(docs + [Document(f"new{i}", "x") for i in range(50)], 0.1, 0.1, "test")
    for s in splits:
        assert {d.name for d in splits[s]} <= {d.name for d in more[s]}
    tiny = hash_split(docs[:3], 0.01, 0.01, "test")  # empty splits borrow training documents
    assert [len(tiny[s]) for s in ("train", "validation", "test")] == [1, 1, 1]


def test_pile_streaming_filters_subset_and_caps(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    records = [{"text": f"Doc {i}.", "meta": {"pile_set_name": "ArXiv" if i % 2 else "Github"}}
               for i in range(100)]
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, revision=None):
        calls.append((path, split, streaming))
        return iter(records)

    monkeypatch.setattr("data.sources.hub.offline_reason", lambda timeout=2.0: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig.from_dict({"name": "pile", "subset": "ArXiv", "cache_dir": str(tmp_path),
                                "max_train_documents": 7, "max_eval_documents": 3})
    corpus = HubSource(cfg).load()
    assert [len(corpus.splits[s]) for s in ("train", "validation", "test")] == [7, 3, 3]
    assert all(int(d.text.split()[1][:-1]) % 2 == 1 for d in corpus.splits["train"])
    assert calls[0] == ("monology/pile-uncopyrighted", "train", True)
