"""What a long run meets besides bad settings: Ctrl-C and SIGTERM, crashes, damaged checkpoints,
full or read-only disks, files a killed run left behind. Each ends either in a checkpoint that
resumes exactly (the same logged metrics at the same steps, the same checkpoints, the same
weights as a run that was never stopped) or in one `error:` line, status 2 and nothing
half-written."""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import signal
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

from bipe.errors import CheckpointError
from bipe.io import atomic_write, make_temp_dir, remove_stale_temps
from models.checkpoint import CHECKPOINT_KEY, load_checkpoint, resolve_checkpoint_path, save_atomic
from tests.conftest import ROOT, compose_train, smoke_overrides


class Interrupt(L.Callback):
    """At `hook`, once `step` optimizer steps are done (outside the sanity check): send `kind`
    (SIGINT, SIGTERM) to this process, or raise a RuntimeError (`crash`). Built by Hydra from
    `+callbacks.stop._target_=tests.test_train_faults.Interrupt`."""

    def __init__(self, hook: str, step: int, kind: str = "SIGINT"):
        self.hook, self.step, self.kind, self.fired = hook, step, kind, False

    def _maybe(self, trainer: L.Trainer, hook: str) -> None:
        if (hook != self.hook or self.fired or trainer.sanity_checking
                or trainer.global_step != self.step):
            return
        self.fired = True
        if self.kind == "crash":
            raise RuntimeError(f"simulated crash in {hook}")
        os.kill(os.getpid(), getattr(signal, self.kind))

    def on_before_backward(self, trainer, *args):
        self._maybe(trainer, "on_before_backward")

    def on_train_batch_end(self, trainer, *args):
        self._maybe(trainer, "on_train_batch_end")

    def on_validation_batch_end(self, trainer, *args):
        self._maybe(trainer, "on_validation_batch_end")


class FailOnValidation(L.Callback):
    def on_validation_start(self, trainer, *args):
        raise RuntimeError("a validation ran")


COMMON = ["logger=csv", "callbacks.progress_bar=null", "model.dropout=0.1",
          "trainer.max_steps=10", "trainer.val_check_interval=4"]


def logged(run: Path) -> list[tuple]:
    """Every logged value of a run as (step, key, value), without the timings."""
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [(row["step"], k, v) for row in csv.DictReader(f) for k, v in row.items()
                if v and k != "step" and "per_sec" not in k]


def checkpoint_steps(run: Path) -> dict[str, int]:
    return {p.name: torch.load(p, weights_only=True)["global_step"]
            for p in sorted((run / "checkpoints").glob("*.ckpt")) if p.name != "interrupted.ckpt"}


def dead_pid() -> str:
    """The pid of a process that has ended."""
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def run_cli_job(cfg) -> int:
    """`train.py`'s job wrapper in-process: its exit status."""
    from train import train
    from training.job import run_job

    try:
        run_job(train, cfg)
    except SystemExit as exc:
        return int(exc.code)
    return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus, cache_dir):
    from train import train

    run = tmp_path_factory.mktemp("uninterrupted")
    train(compose_train([*smoke_overrides(corpus, cache_dir), *COMMON], run))
    return run


@pytest.mark.parametrize(("hook", "step", "kind", "status"), [
    ("on_before_backward", 5, "SIGINT", 130),  # mid-step, between validations
    pytest.param("on_train_batch_end", 4, "SIGTERM", 143,  # a validation is due after the step
                 marks=pytest.mark.slow),
    pytest.param("on_validation_batch_end", 4, "SIGINT", 130, marks=pytest.mark.slow),
    pytest.param("on_validation_batch_end", 4, "crash", 1, marks=pytest.mark.slow),
    pytest.param("on_before_backward", 6, "crash", 1, marks=pytest.mark.slow),
])
def test_a_stopped_run_resumes_as_if_never_stopped(hook, step, kind, status, uninterrupted,
                                                   corpus, cache_dir, tmp_path):
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    common = [*smoke_overrides(corpus, cache_dir), *COMMON]
    cfg = compose_train([*common, "+callbacks.stop._target_=tests.test_train_faults.Interrupt",
                         f"+callbacks.stop.hook={hook}", f"+callbacks.stop.step={step}",
                         f"+callbacks.stop.kind={kind}"], stopped)
    if kind == "crash":
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_cli_job(cfg)
    else:
        assert run_cli_job(cfg) == status  # 128 + the signal, as a shell reports a killed job
    interrupted = stopped / "checkpoints" / "interrupted.ckpt"
    assert interrupted.is_file()
    assert not (stopped / "length_eval.json").exists()  # a stopped run skips its report
    # As if an earlier kill had cut a checkpoint write short: the resume removes the leftover.
    leftover = stopped / "checkpoints" / f".last.ckpt.{dead_pid()}.tmp"
    leftover.write_bytes(b"half a checkpoint")

    assert run_cli_job(compose_train([*common, f"ckpt_path={stopped}"], resumed)) == 0
    assert not leftover.exists()
    # The two halves log exactly what the uninterrupted run logged: same steps, same values
    # (a checkpoint one batch off shifts every validation and logged point by a step). A crash
    # mid-step may have logged that step's learning rate already; the resume logs it again.
    halves, whole = Counter(logged(stopped) + logged(resumed)), Counter(logged(uninterrupted))
    assert not whole - halves, "values the uninterrupted run logged are missing"
    again = halves - whole
    if kind == "crash":
        again = Counter({row: n for row, n in again.items() if not row[1].startswith("lr-")})
    assert not again, "values logged twice or at other steps"
    assert checkpoint_steps(resumed) == checkpoint_steps(uninterrupted)
    a = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_through_the_command_line_exits_143_after_saving(corpus, cache_dir, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1"}
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *smoke_overrides(corpus, cache_dir),
         "trainer.max_steps=50", "+callbacks.stop._target_=tests.test_train_faults.Interrupt",
         "+callbacks.stop.hook=on_train_batch_end", "+callbacks.stop.step=2",
         "+callbacks.stop.kind=SIGTERM", f"hydra.run.dir={run}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == (
        f"stopped: stopped by SIGTERM at step 2; resume with "
        f"ckpt_path={run / 'checkpoints' / 'interrupted.ckpt'}")
    assert load_checkpoint(run / "checkpoints" / "interrupted.ckpt")["global_step"] == 2


def test_a_resume_in_a_new_folder_warns_about_nothing(corpus, cache_dir, tmp_path, caplog):
    from train import train

    common = [*smoke_overrides(corpus, cache_dir), "trainer.max_steps=3"]
    train(compose_train(common, tmp_path / "first"))
    train(compose_train([*common, "trainer.max_steps=6", f"ckpt_path={tmp_path / 'first'}"],
                        tmp_path / "second"))
    warnings = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith("trainer.max_steps: 3 -> 6")


# -- damaged checkpoints ---------------------------------------------------------------------


class Payload:
    """A Python object a checkpoint of ours never holds."""


def test_a_flipped_byte_in_tensor_data_is_refused_in_one_line(tmp_path):
    path = tmp_path / "run.ckpt"
    weight = torch.full((256,), 1.5)
    save_atomic({"state_dict": {"w": weight}, CHECKPOINT_KEY: {"format_version": 1}}, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], weight)  # intact: loads
    raw = bytearray(path.read_bytes())
    at = raw.find(weight.numpy().tobytes()[:64]) + 130  # inside the tensor's bytes
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))
    # torch.load alone reads it without complaint, a wrong weight included
    assert not torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], weight)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, key="ckpt_path")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"ckpt_path={path} is corrupted")
    assert "CRC-32" in message


def test_a_checkpoint_with_python_objects_is_refused_without_advice_to_unpickle(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, CHECKPOINT_KEY: {"x": Payload()}}, path)
    with pytest.raises(CheckpointError, match="holds Python objects") as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)


def test_random_bytes_are_not_a_checkpoint_that_holds_python_objects(tmp_path):
    import random
    import zipfile

    garbage = tmp_path / "random.ckpt"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(garbage, key="ckpt_path")
    message = str(info.value)
    assert message.startswith(f"ckpt_path={garbage} cannot be read: it is not a checkpoint")
    assert "Python objects" not in message and "\n" not in message
    # A sound archive whose pickle is random bytes: damage too, not Python objects.
    good = tmp_path / "good.ckpt"
    save_atomic({"state_dict": {"w": torch.ones(3)}, CHECKPOINT_KEY: {"format_version": 1}}, good)
    damaged = tmp_path / "damaged.ckpt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(damaged, "w") as out:
        for name in src.namelist():  # valid CRCs, so only torch.load can judge the pickle
            data = src.read(name)
            out.writestr(name, random.Random(1).randbytes(len(data))
                         if name.endswith("data.pkl") else data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(damaged, key="ckpt_path")
    assert str(info.value).startswith(f"ckpt_path={damaged} cannot be read (truncated or "
                                      "corrupted?)")
    assert "Python objects" not in str(info.value)


def test_checkpoint_errors_name_the_option_that_was_typed(tmp_path):
    from hydra import compose, initialize_config_dir

    from evaluation.checkpoints import load_models
    from tests.conftest import CONF
    from training.checkpoint_io import AtomicCheckpointIO

    # Lightning reads a resumed run's checkpoint through the plugin: train.py's ckpt_path=.
    with pytest.raises(CheckpointError, match=r"^ckpt_path=.*gone\.ckpt does not exist"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "gone.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    for option in ("ckpt_path", "ckpts"):  # eval.py
        value = f"[{bad}]" if option == "ckpts" else str(bad)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="eval", overrides=[f"{option}={value}"])
        with pytest.raises(CheckpointError) as info:
            load_models(cfg, "cpu")
        assert str(info.value).startswith(f"{option}={bad} cannot be read")


def test_a_run_folder_with_only_an_interrupted_checkpoint_resolves_to_it(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "interrupted.ckpt").write_bytes(b"x")
    assert resolve_checkpoint_path(tmp_path).name == "interrupted.ckpt"


def test_partial_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    left = tmp_path / f".last.ckpt.{dead_pid()}.tmp"
    live = tmp_path / f".best.ckpt.{os.getpid()}.tmp"
    other = tmp_path / ".notes.tmp"  # not ours: no pid
    for p in (left, live, other):
        p.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == [left]
    assert live.exists() and other.exists() and not left.exists()


def test_cache_folders_get_the_permissions_of_the_umask(tmp_path):
    # A cache a group shares needs group access; mkdtemp alone would make it 0700.
    old = os.umask(0o002)
    try:
        folder = make_temp_dir(tmp_path, ".tmp-x-")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o775


# -- the machine fails -----------------------------------------------------------------------


def _full_disk(path, obj=None):
    """A writer that gets half way and finds the disk full."""
    def write(f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    atomic_write(path, write)


def test_a_full_output_disk_is_one_error_line_and_leaves_nothing_half_written(
        corpus, cache_dir, tmp_path, monkeypatch, capsys):
    import training.checkpoint_io

    monkeypatch.setattr(training.checkpoint_io, "save_atomic", lambda obj, path: _full_disk(path))
    run = tmp_path / "run"
    status = run_cli_job(compose_train(smoke_overrides(corpus, cache_dir), run))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("error: cannot use ") and "the disk is full" in err[0]
    assert "paths.root" in err[0]
    assert list((run / "checkpoints").iterdir()) == []  # no partial or temporary file


TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def torch_save_on_a_full_disk(obj, f):
    """What `torch.save` does when the disk fills: the write's OSError (which names no file)
    turns into a RuntimeError raised while handling it."""
    f.write(b"PK\x03\x04 half a checkpoint")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError(TORCH_FULL)  # noqa: B904 - the implicit context is what torch leaves


def torch_save_to_a_path_on_a_full_disk(obj, f):
    """`torch.save` writing a path itself: its C++ stream keeps no OSError."""
    f.write(b"PK\x03\x04 half a checkpoint")
    raise RuntimeError(TORCH_FULL)


def disk_with(free_bytes: int, read_only: bool = False):
    """An `os.statvfs` that reports `free_bytes` available, for every folder."""
    def statvfs(path):
        return os.statvfs_result((4096, 4096, 1 << 20, free_bytes // 4096, free_bytes // 4096,
                                  1000, 10, 10, os.ST_RDONLY if read_only else 0, 255))
    return statvfs


@pytest.mark.parametrize("how", ["chained", "torch_message"])
def test_a_full_disk_torch_reports_as_a_runtime_error_is_one_error_line(
        how, corpus, cache_dir, tmp_path, monkeypatch, capsys):
    import models.checkpoint

    if how == "chained":
        monkeypatch.setattr(models.checkpoint.torch, "save", torch_save_on_a_full_disk)
    else:  # no OSError to go by: the message and the disk (os.statvfs) must both say so
        monkeypatch.setattr(models.checkpoint.torch, "save", torch_save_to_a_path_on_a_full_disk)
        monkeypatch.setattr(models.checkpoint.os, "statvfs", disk_with(4096))
    run = tmp_path / "run"
    status = run_cli_job(compose_train(smoke_overrides(corpus, cache_dir), run))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    # It names the checkpoint being written (the OSError of a write names no file).
    assert err[0].startswith(f"error: cannot use {run / 'checkpoints'}/")
    assert "the disk is full" in err[0] and "paths.root" in err[0]
    assert list((run / "checkpoints").iterdir()) == []  # no partial or temporary file


class FullDisk(L.Callback):
    """From its construction on, `torch.save` fails as on a full disk. Built by Hydra from
    `+callbacks.disk._target_=tests.test_train_faults.FullDisk` in a `train.py` process."""

    def __init__(self):
        import models.checkpoint

        models.checkpoint.torch.save = torch_save_on_a_full_disk


@pytest.mark.slow
def test_a_full_disk_through_the_command_line_is_one_line_and_status_2(corpus, cache_dir,
                                                                         tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1"}
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *smoke_overrides(corpus, cache_dir),
         "+callbacks.disk._target_=tests.test_train_faults.FullDisk", f"hydra.run.dir={run}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot use {run / 'checkpoints'}/")
    assert "the disk is full" in errors[0]
    assert list((run / "checkpoints").iterdir()) == []


def test_a_runtime_error_of_torch_save_is_a_full_disk_only_when_the_disk_is_full(
        tmp_path, monkeypatch):
    import models.checkpoint

    path = tmp_path / "last.ckpt"
    monkeypatch.setattr(models.checkpoint.torch, "save", torch_save_to_a_path_on_a_full_disk)
    monkeypatch.setattr(models.checkpoint.os, "statvfs", disk_with(50 << 30))  # 50 GiB free
    with pytest.raises(RuntimeError, match="unexpected pos"):  # as it came: not a full disk
        save_atomic({"w": torch.zeros(3)}, path)
    monkeypatch.setattr(models.checkpoint.os, "statvfs", disk_with(50 << 30, read_only=True))
    with pytest.raises(OSError) as info:
        save_atomic({"w": torch.zeros(3)}, path)
    assert info.value.errno == errno.EROFS and info.value.filename == str(path)

    def bug(obj, f):
        raise RuntimeError("a bug in the code")

    monkeypatch.setattr(models.checkpoint.torch, "save", bug)
    monkeypatch.setattr(models.checkpoint.os, "statvfs", disk_with(0))
    with pytest.raises(RuntimeError, match="a bug in the code"):  # a full disk, yet not why
        save_atomic({"w": torch.zeros(3)}, path)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_when_saving_after_an_error_leaves_the_error_to_report(caplog):
    from training.interrupted import InterruptedCheckpoint

    callback = InterruptedCheckpoint("/nowhere")
    trainer = type("Trainer", (), {"global_step": 5})()
    crash = ValueError("the run's own error")

    def full(trainer):
        torch_save_on_a_full_disk(None, io.BytesIO())

    callback.save = full
    callback.on_exception(trainer, None, crash)  # a warning, not a second error
    assert "could not save" in caplog.text and "No space left" in caplog.text

    def bug(trainer):
        raise RuntimeError("a bug while saving")

    callback.save = bug
    with pytest.raises(RuntimeError, match="a bug while saving"):
        callback.on_exception(trainer, None, crash)


def test_a_read_only_cache_is_one_error_line(corpus, tmp_path, monkeypatch, capsys):
    import data.packing

    def read_only(parent, prefix):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(parent))

    monkeypatch.setattr(data.packing, "make_temp_dir", read_only)
    cache = tmp_path / "cache"
    overrides = smoke_overrides(corpus, str(cache))
    status = run_cli_job(compose_train(overrides, tmp_path / "run"))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "read-only" in err[0], err
    assert "paths.cache_dir" in err[0]
    assert [p.name for p in (cache / "packed").iterdir() if p.suffix != ".lock"] == []


def test_an_error_from_the_code_keeps_its_traceback(monkeypatch):
    from training.job import environment_error

    assert environment_error(FileNotFoundError(errno.ENOENT, "x", "f")) is None
    assert environment_error(ValueError("x")) is None
    assert "read-only" in environment_error(OSError(errno.EROFS, "x", "/f"))
    # Behind another error: found through __cause__ and __context__, the named one preferred.
    hidden = RuntimeError("unexpected pos")
    hidden.__context__ = OSError(errno.ENOSPC, "full")
    outer = OSError(errno.ENOSPC, "full")  # the flush on close: no file either
    outer.__context__ = RuntimeError("x")
    outer.__context__.__cause__ = OSError(errno.ENOSPC, "full", "/disk/last.ckpt")
    assert environment_error(hidden).startswith("cannot use a file: the disk is full")
    assert environment_error(outer).startswith("cannot use /disk/last.ckpt: the disk is full")
    bug = RuntimeError("a bug")
    bug.__context__ = FileNotFoundError(errno.ENOENT, "x", "f")
    assert environment_error(bug) is None
    loop = RuntimeError("a")
    loop.__context__ = ValueError("b")
    loop.__context__.__context__ = loop  # a cycle ends the walk
    assert environment_error(loop) is None


def test_a_too_large_block_size_is_reported_before_any_validation(corpus, cache_dir, tmp_path):
    from bipe.errors import DataError
    from train import train

    cfg = compose_train([*smoke_overrides(corpus, cache_dir), "data.block_size=4096",
                         "+callbacks.stop._target_=tests.test_train_faults.FailOnValidation"],
                        tmp_path)
    # The sanity validation would crash the run; the data check must come first.
    with pytest.raises(DataError, match="data.block_size=4096"):
        train(cfg)


def test_an_edited_cached_tokenizer_is_retrained_not_reused(tmp_path, caplog):
    from data.tokenizer import train_or_load_cached

    caplog.set_level(logging.INFO, logger="data.tokenizer")
    texts = [f"line {i} of some text, with words and more words." for i in range(200)]
    first = train_or_load_cached(texts, 300, str(tmp_path))
    (cached,) = (tmp_path / "tokenizers").glob("*.json")
    # Valid JSON, different tokenizer: a checksum is the only way to notice.
    cached.write_text(cached.read_text().replace('"line"', '"lime"', 1))
    again = train_or_load_cached(texts, 300, str(tmp_path))
    assert "not used: its bytes do not match its checksum" in caplog.text
    assert again.to_str() == first.to_str()
    caplog.clear()
    train_or_load_cached(texts, 300, str(tmp_path))
    assert "reusing tokenizer" in caplog.text


@pytest.mark.slow
def test_eval_composes_its_corpora_without_the_training_configs(tmp_path):
    # eval.py registers what `eval.datasets` compose with; train.py is never imported there.
    code = ("import sys; from pathlib import Path; import eval; "
            "from evaluation.streams import corpus_config; "
            "from hydra.core.config_store import ConfigStore; "
            "assert 'train_schema.yaml' not in ConfigStore.instance().repo; "
            f"print(corpus_config('python_code', Path({str(tmp_path)!r}))['segmenter'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "lines"
