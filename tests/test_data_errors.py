"""Bad input: each case gives a one-line error naming the problem, or a logged recovery."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from bipe.positions import bilevel_ids

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bipe.errors import ConfigError, DataError  # noqa: E402
from data import LMDataModule  # noqa: E402


def corpus(root: Path, n: int = 6) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"d{i}.txt").write_text(
            "".join(f"Line {j} of file {i}. Another sentence here!\n" for j in range(40))
        )
    return str(root / "*.txt")


def cfg_for(tmp_path: Path, **overrides) -> dict:
    cfg = {"name": "text_files", "segmenter": "lines", "block_size": 16, "batch_size": 2,
           "tokenizer": {"vocab_size": 280}, "cache_dir": str(tmp_path / "cache"),
           "validation_fraction": 0.2, "test_fraction": 0.2}
    if "glob" not in overrides and "train_glob" not in overrides:
        cfg["glob"] = corpus(tmp_path / "corpus")
    cfg.update(overrides)
    return cfg


def ready(cfg: dict) -> LMDataModule:
    dm = LMDataModule(cfg)
    dm.setup("fit")
    return dm


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_unknown_source_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        LMDataModule({"name": "wikipedia"})
    msg = one_line(e)
    assert "data.name" in msg and "shakespeare" in msg and "text_files" in msg


def test_block_size_below_two():
    with pytest.raises(ConfigError) as e:
        LMDataModule({"block_size": 1})
    assert "data.block_size" in one_line(e)


def test_unknown_segmenter():
    with pytest.raises(ConfigError) as e:
        LMDataModule({"segmenter": "words"})
    assert "data.segmenter" in one_line(e) and "punkt" in str(e.value)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError) as e:
        ready(cfg_for(tmp_path, glob=str(tmp_path / "nothing" / "*.txt")))
    assert "data.glob" in one_line(e) and "matched no files" in str(e.value)


def test_missing_path_is_named(tmp_path):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(DataError) as e:
        ready(cfg_for(tmp_path, glob=missing))
    assert missing in one_line(e) and "no such file" in str(e.value)
    with pytest.raises(DataError) as e:
        ready(cfg_for(tmp_path, tokenizer={"path": str(tmp_path / "tok.json")}))
    assert "data.tokenizer.path" in one_line(e)


def test_empty_corpus(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.txt").write_text("  \n\n")
    with pytest.raises(DataError) as e:
        ready(cfg_for(tmp_path, glob=str(root / "*.txt")))
    assert "no text" in one_line(e)


def test_too_few_documents_for_a_split(tmp_path):
    (tmp_path / "one.txt").write_text("Just one document.\n")
    with pytest.raises(DataError) as e:
        ready(cfg_for(tmp_path, glob=str(tmp_path / "one.txt")))
    assert "data.train_glob" in one_line(e)


def test_binary_file_skipped_and_counted(tmp_path, caplog):
    glob = corpus(tmp_path / "c")
    binary = tmp_path / "c" / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with caplog.at_level(logging.WARNING):
        dm = ready(cfg_for(tmp_path, glob=glob))
    assert dm.stats["skipped_binary_files"] == 1
    assert str(binary) in caplog.text


def test_invalid_utf8_replaced_and_counted(tmp_path, caplog):
    glob = corpus(tmp_path / "c")
    bad = tmp_path / "c" / "latin1.txt"
    # two invalid bytes, plus a U+FFFD that was valid UTF-8 already and must not be counted
    bad.write_bytes("caf\u00e9 ok \ufffd.\n".encode() + b"na\xefve \xff end.\n")
    with caplog.at_level(logging.WARNING):
        dm = ready(cfg_for(tmp_path, glob=glob))
    assert dm.stats["invalid_utf8_replacements"] == 2
    assert "latin1.txt" in caplog.text and "U+FFFD" in caplog.text


def test_jsonl_bad_line_skipped_and_missing_key_named(tmp_path, caplog):
    lines = [json.dumps({"text": f"Record {i}. It has text.\n"}) for i in range(8)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + '\n{"text": "truncat')
    with caplog.at_level(logging.WARNING):
        dm = ready(cfg_for(tmp_path, glob=str(path), block_size=4))
    assert dm.stats["skipped_jsonl_lines"] == 1 and dm.stats["documents"] >= 1
    with pytest.raises(DataError) as e:
        ready(cfg_for(tmp_path, glob=str(path), text_key="content"))
    assert "data.text_key" in one_line(e)


def test_megabyte_document_without_boundary(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta"], 200_000)
    (root / "big.txt").write_text(" ".join(words))  # ~1.2 MB, no full stop, no newline
    for i in range(2):
        (root / f"small{i}.txt").write_text("A short one. Yes.\n")
    cfg = cfg_for(tmp_path, train_glob=str(root / "big.txt"),
                  validation_glob=str(root / "small*.txt"), segmenter="punkt", block_size=64)
    dm = ready(cfg)
    s = dm.stats
    assert s["segments"] == 1 and s["tokens_per_segment_max"] == s["tokens"]
    assert s["segments_longer_than_block"] == 1 and s["max_segments_per_block"] == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 64)
    # One segment spans every block: the intra index runs 0..63 in each (a table of 16 rows
    # clips the last 48 tokens of every block).
    intra, inter = bilevel_ids(batch["boundary"])
    assert int((intra >= 16).sum()) == 2 * (64 - 16) and int(inter.max()) == 0


@pytest.mark.parametrize("name", ["pg19", "pile"])
def test_hub_offline_fails_at_once(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dm = LMDataModule({"name": name, "subset": "ArXiv", "cache_dir": str(tmp_path)})
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        dm.prepare_data()
    assert time.perf_counter() - t0 < 2.0
    msg = one_line(e)
    assert "HF_DATASETS_OFFLINE" in msg
    assert "data=shakespeare" in msg and "data=python_code" in msg and "data.glob=" in msg
    assert not list((tmp_path / "packed").glob(f"{name}-*"))  # nothing half-written


def test_corrupted_cache_is_detected_and_rebuilt(tmp_path, caplog):
    cfg = cfg_for(tmp_path)
    dm = ready(cfg)
    ids_ref = np.array(dm.split_arrays("train")[0])
    path = dm.cache_path / "train.ids"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        dm2 = ready(cfg)
    assert dm2.built_cache and "checksum mismatch" in caplog.text
    assert np.array_equal(np.array(dm2.split_arrays("train")[0]), ids_ref)


def test_truncated_cache_is_detected_and_rebuilt(tmp_path, caplog):
    cfg = cfg_for(tmp_path)
    dm = ready(cfg)
    path = dm.cache_path / "validation.boundary"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 3)
    with caplog.at_level(logging.WARNING):
        dm2 = ready(cfg)
    assert dm2.built_cache and "truncated" in caplog.text
    (dm2.cache_path / "meta.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert ready(cfg).built_cache
    assert "meta.json is unreadable" in caplog.text
    dm3 = ready(cfg)
    (dm3.cache_path / "tokenizer.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        dm4 = ready(cfg)
    assert dm4.built_cache and "tokenizer.json checksum mismatch" in caplog.text
    assert dm4.tokenizer.get_vocab_size() == dm.tokenizer.get_vocab_size()


def test_run_killed_while_writing_leaves_nothing_usable(tmp_path, monkeypatch, caplog):
    cfg = cfg_for(tmp_path)
    packed = tmp_path / "cache" / "packed"

    class Killed(BaseException):
        pass

    def die(self, *args, **kwargs):
        raise Killed  # like SIGKILL in the middle of writing the test split

    # A real kill gets no chance to clean up: disable the cleanup, then die mid-build.
    monkeypatch.setattr("data.packing.shutil.rmtree", lambda *a, **k: None)
    monkeypatch.setattr("data.packing.SplitWriter.add", die)
    with pytest.raises(Killed):
        ready(cfg)
    monkeypatch.undo()
    leftovers = list(packed.glob(".tmp-*"))
    assert leftovers and not [p for p in packed.iterdir() if not p.name.startswith(".")]
    with caplog.at_level(logging.WARNING):
        dm = ready(cfg)
    assert dm.built_cache and not any(p.exists() for p in leftovers)
    assert "interrupted run" in caplog.text


def test_batch_size_larger_than_the_corpus(tmp_path):
    # At setup("fit"), before Lightning's sanity validation, not when the loader is first asked
    dm = LMDataModule(cfg_for(tmp_path, block_size=512, batch_size=64))
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    assert "data.batch_size" in one_line(e) and "data.block_size" in str(e.value)


def test_a_full_disk_while_building_the_cache_names_the_cache_folder(tmp_path, monkeypatch):
    import errno

    from training.job import environment_error

    def full(self, ids, boundary, eod_id):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write to an open file

    monkeypatch.setattr("data.packing.SplitWriter.add", full)
    with pytest.raises(OSError) as e:
        ready(cfg_for(tmp_path))
    packed = tmp_path / "cache" / "packed"
    assert Path(e.value.filename).parent == packed and e.value.filename.startswith(
        str(packed / "text_files-"))
    message = environment_error(e.value)
    assert message.startswith(f"cannot use {e.value.filename}: the disk is full")
    assert "paths.cache_dir" in message
    assert [p.name for p in packed.iterdir() if p.suffix != ".lock"] == []  # no partial folder


def _build_in_child(cfg: dict, events: Path) -> None:
    """Build `cfg`'s cache in this (forked) process, its build held open for a second; report
    the build and whether this process built it in `events`."""
    real = LMDataModule._build

    def slow(self, tmp, source):
        with open(events, "a") as f:
            f.write(f"start {time.monotonic()}\n")
        time.sleep(1.0)  # long enough for the other builder to arrive at the lock
        out = real(self, tmp, source)
        with open(events, "a") as f:
            f.write(f"end {time.monotonic()}\n")
        return out

    LMDataModule._build = slow
    dm = ready(cfg)
    with open(events, "a") as f:
        f.write(f"built {dm.built_cache}\n")


def test_two_builders_of_one_cache_take_turns(tmp_path):
    import multiprocessing as mp

    cfg = cfg_for(tmp_path, pack_workers=1)
    events = tmp_path / "events"
    fork = mp.get_context("fork")  # both from this state: same corpus, same cache key
    builders = [fork.Process(target=_build_in_child, args=(cfg, events)) for _ in range(2)]
    for p in builders:
        p.start()
    for p in builders:
        p.join(120)
    assert [p.exitcode for p in builders] == [0, 0]
    lines = events.read_text().split()
    # One builder built; the other waited for the lock, then found the finished cache.
    assert lines.count("start") == lines.count("end") == 1
    assert sorted(lines[i + 1] for i, w in enumerate(lines) if w == "built") == ["False", "True"]
    assert len(list((tmp_path / "cache" / "packed").glob("text_files-*"))) == 1


# A train.py whose cache build stops in a worker until it is interrupted, signalling `ready`.
CTRL_C_CHILD = """
import pathlib, runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (not SIG_IGN)
root, ready = sys.argv[1], pathlib.Path(sys.argv[2])
sys.argv = [root + "/train.py", *sys.argv[3:]]
sys.path.insert(0, root)
import data.encode

real = data.encode._encode_in_worker

def stuck(texts):
    ready.touch()
    time.sleep(300)
    return real(texts)

stuck.__module__, stuck.__qualname__ = real.__module__, real.__qualname__  # pickled by name
data.encode._encode_in_worker = stuck
runpy.run_path(root + "/train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_while_building_the_cache_is_one_line_status_130_and_no_partial_cache(tmp_path):
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    cache, ready_file = tmp_path / "cache", tmp_path / "ready"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1"}
    # Its own process group, which Ctrl-C in a terminal signals as a whole: pool workers too.
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_CHILD, str(ROOT), str(ready_file), "experiment=smoke",
         "data=text_files", f"data.glob={corpus(tmp_path / 'corpus')}", "data.pack_workers=2",
         f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ready_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready_file.exists(), proc.communicate(timeout=60)[1][-3000:]
        assert list((cache / "packed").glob(".tmp-*"))  # mid-build: its temporary folder
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "ForkPoolWorker" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "stopped: interrupted by SIGINT (Ctrl-C)"
    assert [p.name for p in (cache / "packed").iterdir() if p.suffix != ".lock"] == []
