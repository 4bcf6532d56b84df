"""The Bi-NFA generator against an independent simulation of the automaton it prints."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import bi_nfa as bn
from tests.helpers import synthetic_dm

ROOT = Path(__file__).resolve().parents[1]


def simulate(automaton, words):
    """Plain set simulation of the JSON automaton: (inner sets, outer state labels)."""
    inner_sets, labels = [], []
    outer = set(automaton["outer_start"])
    for word in words:
        inner = set(automaton["inner_start"])
        for letter in word:  # the inner NFA restarts at every segment
            inner = {r for q in inner for r in automaton["inner_delta"][q][letter]}
        index = sum(1 << q for q in inner)  # the documented inner-set index of outer_delta
        outer = {r for p in outer for r in automaton["outer_delta"][p][index]}
        inner_sets.append(sorted(inner))
        labels.append("{" + ",".join(map(str, sorted(outer))) + "}")
    return inner_sets, labels


@pytest.fixture(scope="module")
def cli_output():
    out = subprocess.run(
        [sys.executable, "-m", "tasks.bi_nfa", "--count", "30", "--seed", "3",
         "--segments", "6", "--automaton-seed", "5"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    return lines[0]["automaton"], lines[1:]


def test_state_labels_equal_an_independent_simulation_of_the_printed_automaton(cli_output):
    automaton, sequences = cli_output
    assert len(sequences) == 30
    labels_seen = set()
    for seq in sequences:
        inner_sets, labels = simulate(automaton, seq["segments"])
        assert seq["states"] == labels
        assert seq["inner_sets"] == inner_sets
        assert len(seq["segments"]) == 6
        tokens = ["<bos>"]
        for word, label in zip(seq["segments"], labels, strict=True):
            tokens += [*word, "#", label]
        assert seq["tokens"] == " ".join(tokens)
        labels_seen.update(labels)
    assert len(labels_seen) >= 3  # a non-degenerate automaton: labels vary


def test_the_cli_automaton_is_the_library_automaton(cli_output):
    automaton, sequences = cli_output
    a = bn.make_bi_nfa(3, 5, 4, 0.3, (2, 5), seed=5)  # the CLI defaults
    assert a.to_json() == automaton
    rng = random.Random(3)
    first = bn.sample_sequence(a, 6, (2, 5), rng)
    assert first.to_json(a) == sequences[0]


def test_automaton_is_deterministic_screened_and_never_loses_all_states():
    a = bn.make_bi_nfa(3, 4, 3, 0.3, (2, 5), seed=0)
    assert a == bn.make_bi_nfa(3, 4, 3, 0.3, (2, 5), seed=0)
    assert a != bn.make_bi_nfa(3, 4, 3, 0.3, (2, 5), seed=1)
    assert all(m for row in a.inner_delta for m in row)
    assert all(m for row in a.outer_delta for m in row)
    assert len(a.outer_delta[0]) == 2**4  # defined on every inner set
    assert not bn.is_degenerate(bn.predictability(a, (2, 5)))


def test_screening_rejects_a_collapsed_automaton():
    # Every inner transition goes to state 0: the inner set is always {0}, so the label follows
    # from the previous outer set alone.
    a = bn.BiNFA(2, 2, 2, 1, 1, ((1, 1), (1, 1)), ((2, 1, 2, 1), (1, 2, 1, 2)))
    assert bn.predictability(a, (2, 3))["from_previous_state"] == 1.0
    assert bn.is_degenerate(bn.predictability(a, (2, 3)))


def test_encoding_scores_and_flags_only_state_tokens():
    a = bn.make_bi_nfa(3, 4, 3, 0.3, (2, 5), seed=0)
    vocab = bn.vocab(a)
    seq = bn.sample_sequence(a, 5, (2, 5), random.Random(0))
    enc = bn.encode(a, seq)
    tokens = [vocab[i] for i in enc.ids]
    assert tokens == seq.tokens(a)
    is_state = [t.startswith("{") for t in tokens]
    assert list(enc.scored) == is_state == list(enc.boundary)
    assert sum(is_state) == 5
    # every state token directly follows the separator
    assert all(tokens[i - 1] == "#" for i, s in enumerate(is_state) if s)


def test_set_tokens_enumerate_bitmasks():
    assert bn.set_token(0b101) == "{0,2}" and bn.set_token(0) == "{}"
    assert bn.members(0b1010) == [1, 3] and bn.mask_of([1, 3]) == 0b1010
    a = bn.make_bi_nfa(3, 4, 3, 0.3, (2, 5), seed=0)
    offset = bn.state_token_offset(a)
    assert [bn.vocab(a)[offset + m] for m in range(8)] == [bn.set_token(m) for m in range(8)]


def words_of(dm, batch):
    """Per row: the segment word lengths and the number of segments (letters between marks)."""
    vocab = dm.task.vocab
    out = []
    for row, n in zip(batch["input_ids"].tolist(), batch["length"].tolist(), strict=True):
        tokens = [vocab[i] for i in row[:n]][1:]  # drop <bos>
        lengths, run = [], 0
        for t in tokens:
            if t == "#":
                lengths.append(run)
                run = 0
            elif t.isalpha():
                run += 1
            else:
                assert t.startswith("{")
        out.append(lengths)
    return out


def test_longer_splits_have_more_segments_with_the_same_segment_lengths():
    dm = synthetic_dm({"name": "bi_nfa", "segments": [1, 4], "n_val": 40,
                              "eval_batch_size": 40, "batch_size": 32}, seed=0)
    assert dm.val_names == ["seg_4", "seg_8", "seg_16"]
    train = [w for k in range(3) for w in words_of(dm, dm.train_dataloader().dataset.batch(k))]
    assert max(map(len, train)) == 4 and min(map(len, train)) == 1
    assert {n for w in train for n in w} == {2, 3, 4, 5}
    for name, loader in zip(dm.val_names, dm.val_dataloader(), strict=True):
        batch = next(iter(loader))
        rows = words_of(dm, batch)
        k = int(name.split("_")[1])
        assert all(len(w) == k for w in rows)  # the last state token is a target, not an input
        assert (batch["segments"] == k).all()
        assert {n for w in rows for n in w} == {2, 3, 4, 5}
        # only the state tokens are targets: one per segment, each predicted from a '#'
        scored = batch["targets"] != -100
        assert (scored.sum(1) == k).all()
        assert (batch["input_ids"][scored] == bn.SEP_ID).all()


def test_sequence_sizes_are_bounded_on_the_command_line_and_in_the_config():
    from bipe.errors import ConfigError

    # 10 million segments would be built whole in memory (gigabytes): refused, naming the limit.
    for args, needle in [(["--segments", "10000000"], f"1..{bn.MAX_SEGMENTS}"),
                         (["--max-length", "100000"], f"<= {bn.MAX_SEGMENT_LENGTH}")]:
        result = subprocess.run([sys.executable, "-m", "tasks.bi_nfa", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stdout == ""
        assert "error: " in result.stderr.splitlines()[-1] and needle in result.stderr
    at_limit = subprocess.run(
        [sys.executable, "-m", "tasks.bi_nfa", "--segments", str(bn.MAX_SEGMENTS), "--count", "1"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    assert len(json.loads(at_limit[1])["segments"]) == bn.MAX_SEGMENTS
    # The task: the longest test split (max segments x the largest multiplier) is bounded too.
    bn.BiNFAConfig(segments=[1, bn.MAX_SEGMENTS // 4], test_multipliers=[1, 4])
    for kwargs, key, limit in [
            ({"segments": [1, bn.MAX_SEGMENTS // 4 + 1], "test_multipliers": [4]},
             "task.segments", bn.MAX_SEGMENTS),
            ({"segment_length": [2, bn.MAX_SEGMENT_LENGTH + 1]}, "task.segment_length",
             bn.MAX_SEGMENT_LENGTH)]:
        with pytest.raises(ConfigError, match=key) as info:
            bn.BiNFAConfig(**kwargs)
        assert f"at most {limit}" in str(info.value)
