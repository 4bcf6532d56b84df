"""Segmenters: boundaries land on the right tokens and never change the tokens."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bipe.errors import ConfigError  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.segment import (  # noqa: E402
    Segmenter,
    attach_whitespace,
    cuts_to_boundaries,
    newline_runs,
    separator_token_ids,
)
from data.tokenizer import DocumentEncoder, chunk_starts, train_bpe  # noqa: E402

PARAGRAPH = "Mr. Smith went to Washington. He arrived at 5 p.m. on Monday! Did he stay? Yes."
CODE = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"


@pytest.fixture(scope="module")
def tok():
    text = (PARAGRAPH + "\n" + CODE) * 20 + "The end. Hello world.\n\nNew para . x\n"
    return train_bpe([text], vocab_size=400)


def segments_of(text: str, kind: str, tok, cache_dir, **extra) -> list[str]:
    """Segment texts as decoded from the token boundaries (the real pipeline path)."""
    cfg = DataConfig.from_dict({"segmenter": kind, "cache_dir": str(cache_dir), **extra})
    (ids, starts), = DocumentEncoder(tok).encode_many([text])
    boundary = Segmenter(cfg, tok).boundaries(text, ids, starts)
    ends = np.flatnonzero(boundary).tolist() + [len(ids) - 1]  # eod closes the last segment
    out, prev = [], 0
    for e in ends:
        if e >= prev:
            out.append(text[starts[prev] : (starts[e + 1] if e + 1 < len(ids) else len(text))])
        prev = e + 1
    return out


def test_punkt_boundaries_fall_on_sentence_ends(tok, tmp_path):
    segs = segments_of(PARAGRAPH, "punkt", tok, tmp_path)
    assert segs == [
        "Mr. Smith went to Washington.",
        " He arrived at 5 p.m. on Monday!",
        " Did he stay?",
        " Yes.",
    ]
    # offline on a fresh machine: the punkt_tab files were written into the cache dir
    lang = tmp_path / "nltk_data"
    assert len(list(lang.glob("punkt-*/tokenizers/punkt_tab/english/*"))) == 4


def test_punkt_newlines_and_whitespace_attachment(tok, tmp_path):
    text = "Who is there?\n\nHe came. And\nwent\n  away.\nEnd"
    assert segments_of(text, "punkt", tok, tmp_path) == [
        "Who is there?\n\n", "He came.", " And\n", "went\n", "  away.\n", "End",
    ]
    # without newline boundaries a newline run after a sentence still goes with that sentence
    assert segments_of(text, "punkt", tok, tmp_path, newline_boundaries=False) == [
        "Who is there?\n\n", "He came.", " And\nwent\n  away.\n", "End",
    ]


def test_lines_segmenter_for_code(tok, tmp_path):
    # every line ends a segment; blank lines join the line before. Byte-level BPE glues
    # indentation to the newline ("\n   " is one pre-token), so that token straddles the cut.
    segs = segments_of(CODE, "lines", tok, tmp_path)
    assert "".join(segs) == CODE
    assert [s.strip() for s in segs] == ["def f(x):", "return x + 1", "class A:", "pass"]
    assert all(s.rstrip(" ").endswith("\n") for s in segs)


def test_segmentation_never_changes_tokens(tok, tmp_path):
    text = PARAGRAPH + "\n" + CODE + "caf\u00e9 \U0001f600 end."
    enc = DocumentEncoder(tok)
    (ids, starts), = enc.encode_many([text])
    counts = set()
    for kind in ("punkt", "lines", "separators", "fixed", "none"):
        cfg = DataConfig.from_dict({"segmenter": kind, "cache_dir": str(tmp_path),
                                    "segment_length": 5, "separator_match": "contains"})
        seg = Segmenter(cfg, tok)
        b = seg.boundaries(text, ids, starts)
        assert b.shape == ids.shape and b.dtype == bool
        counts.add(int(b.sum()))
        (ids2, _), = enc.encode_many([text])  # tokenization is independent of the segmenter
        assert np.array_equal(ids, ids2)
    assert len(counts) > 1  # the segmenters really differ
    assert enc.tok.decode(ids.tolist()) == text


def test_chunked_encoding_equals_whole_document(tok):
    text = ("Line one, with words.\n  indented line\n\n\nx=1\n" * 400) + "tail without newline"
    enc = DocumentEncoder(tok, chunk_chars=257)
    assert len(chunk_starts(text, 257)) > 50
    (ids, starts), = enc.encode_many([text])
    whole = enc.tok.encode(text, add_special_tokens=False)
    assert ids.tolist() == whole.ids
    assert starts.tolist() == [a for a, _ in whole.offsets]


def test_literal_eod_text_is_not_the_special_token(tok):
    eod = tok.token_to_id("<|endoftext|>")
    (ids, _), = DocumentEncoder(tok).encode_many(["a <|endoftext|> b"])
    assert eod not in ids.tolist()


def test_straddling_tokens_and_cut_mapping():
    # tokens start at chars 0, 3, 5, 5 (a multi-byte char split in two tokens), 6
    starts = np.array([0, 3, 5, 5, 6])
    b = cuts_to_boundaries(np.array([2, 4, 6, 7]), starts)
    # cut 2 -> token 0; cut 4 -> token 1; cut 6 -> the last piece of the split char (3); 7 -> 4
    assert b.tolist() == [True, True, False, True, True]
    runs_start, runs_cut = newline_runs("ab \n\n cd\nef")
    assert runs_start.tolist() == [2, 8] and runs_cut.tolist() == [5, 9]
    assert attach_whitespace(np.array([2, 7]), runs_start, runs_cut).tolist() == [5, 7]


def test_separators_match_the_released_rule(tok, tmp_path):
    torch = pytest.importorskip("torch")
    text = "A b .\nC d.\n\nE f\n"
    cfg = DataConfig.from_dict({"segmenter": "separators", "cache_dir": str(tmp_path)})
    seg = Segmenter(cfg, tok)
    (ids, starts), = DocumentEncoder(tok).encode_many([text])
    got = seg.boundaries(text, ids, starts)
    expected = [tok.decode([i]) in ("\n", " .") for i in ids.tolist()]
    assert got.tolist() == expected and any(expected)
    exact = set(separator_token_ids(tok, ("\n",), "exact").tolist())
    contains = set(separator_token_ids(tok, ("\n",), "contains").tolist())
    assert exact < contains  # merged newline runs only count with separator_match=contains
    positions = pytest.importorskip("bipe.positions")
    ref = positions.boundaries_from_separators(torch.as_tensor(ids[None].astype(np.int64)),
                                               seg.separator_ids.tolist())
    assert ref[0].tolist() == got.tolist()


def test_explicit_separator_ids_win_over_strings(tok, tmp_path):
    text = "A b .\nC d.\n\nE f\n"
    (ids, starts), = DocumentEncoder(tok).encode_many([text])
    chosen = int(ids[1])
    cfg = DataConfig.from_dict({"segmenter": "separators", "cache_dir": str(tmp_path),
                                "separator_ids": [chosen]})
    got = Segmenter(cfg, tok).boundaries(text, ids, starts)
    assert got.tolist() == (ids == chosen).tolist()
    bad = DataConfig.from_dict({"segmenter": "separators", "cache_dir": str(tmp_path),
                                "separator_ids": [10**7]})
    with pytest.raises(ConfigError, match="data.separator_ids"):
        Segmenter(bad, tok)


def test_fixed_and_none(tok, tmp_path):
    ids = np.arange(10, dtype=np.uint32)
    starts = np.arange(10)
    fixed = Segmenter(DataConfig.from_dict({"segmenter": "fixed", "segment_length": 4,
                                            "cache_dir": str(tmp_path)}), tok)
    assert np.flatnonzero(fixed.boundaries("x" * 10, ids, starts)).tolist() == [3, 7]
    none = Segmenter(DataConfig.from_dict({"segmenter": "none", "cache_dir": str(tmp_path)}), tok)
    assert not none.boundaries("x" * 10, ids, starts).any()


def test_punkt_tab_round_trips_the_pretrained_model(tmp_path):
    punkt = pytest.importorskip("punkt")
    from data.punkt_data import load_punkt

    params = load_punkt(str(tmp_path))._params  # nltk read our punkt_tab files
    ref = punkt.load_model("english")
    assert params.abbrev_types == set(ref.abbrev_types) and ". . " in params.abbrev_types
    assert params.collocations == set(ref.collocations)
    assert params.sent_starters == set(ref.sent_starters)
    assert dict(params.ortho_context) == {k: int(v) for k, v in ref.ortho_context.items()}
