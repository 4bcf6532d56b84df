"""The Bi-NFA task: a bilevel nondeterministic automaton read segment by segment.

This docstring is the task's definition (docs/methods.md section 3 gives its intent: the BiPE paper
models segmented text with a bilevel automaton; the paper's own construction is not reproduced).

Automaton. States are numbered from 0; a *set* of states is what an NFA is simulated on.
  * Alphabet: the first `alphabet` lowercase letters `a, b, c, ...`.
  * Inner NFA: states `0..n-1` (n = `inner_states`), start set `I = {0}`, transitions
    `delta(q, x)`, a set of states for every state q and letter x. Run on a segment
    `w = x_1 .. x_L`: `S_0 = I`, `S_t = union of delta(q, x_t) over q in S_{t-1}`; the segment's
    *inner set* is `S_L`. The inner NFA restarts from `I` at every segment.
  * Outer NFA: states `0..m-1` (m = `outer_states`), start set `J = {0}`. Its letters are the
    subsets of inner states: `Delta(p, S)` is a set of outer states for every outer state p and
    every inner set S (all `2^n` of them, so the function is defined everywhere). After segment j
    with inner set `S_j`: `T_0 = J`, `T_j = union of Delta(p, S_j) over p in T_{j-1}`. It moves
    exactly once per segment.
  * Random automaton from `automaton_seed` (fixed in config, so training and every test split
    share one automaton). Candidate c is drawn with `random.Random(f"{automaton_seed}/{c}")`:
    each possible transition `q' in delta(q, x)` is present independently with probability
    `density` (loops: q, then x, then q'), then likewise each `p' in Delta(p, S)` (p, then S in
    bitmask order, then p'); a (q, x) or (p, S) that drew no successor gets one uniform random
    successor, so no set ever becomes empty. Candidates c = 0, 1, 2, ... are screened and the
    first non-degenerate one is the automaton. Degenerate means, measured on a fixed probe of
    200 sequences of 8 segments (drawn with `random.Random("probe")`, word lengths from
    `segment_length`; see `predictability`): one state token makes up more
    than half of the labels, or the label is predictable to more than 80% from the segment's
    inner set alone or from the previous outer set alone. Random automata often collapse (the
    inner set ends up the same whatever the word, or the outer set forgets its past); screening
    keeps both levels necessary, so the task stays bilevel.

Sequences. `<bos> w_1 # T_1 w_2 # T_2 ... w_K # T_K`: K segments, each a word of letters (length
uniform in `segment_length = [lo, hi]`, letters uniform) closed by the separator `#` and one token
naming the outer set after it. Set tokens are written `{0,2}` (members in increasing order) and
enumerated by bitmask (`2^m` tokens, `{}` included; bit p of the mask = outer state p), which is
why `outer_states` is capped at 6 (and `inner_states` at 10: `Delta` has `m * 2^n` entries). One
state on either level makes the labels trivial, so both need at least 2. The state token is the
automaton's chain of thought: it is predicted from the word, the `#` and the true earlier state
tokens (teacher forcing).

Segments and loss. Segment j is `w_j # T_j` (`<bos>` belongs to the first); its state token closes
it (boundary True), so the `#` that predicts `T_j` shares segment j's `inter` index with its word.
Only state tokens are targets. Length extrapolation: training draws K uniformly in
`segments = [min, M]`; test splits use K = M, 2M, 4M with the same segment-length range, so only
the number of segments grows.

Command line: `python -m tasks.bi_nfa --count K --seed S` prints one JSON line
`{"automaton": ...}` and then K lines, one sequence each, with its words, inner sets and state
labels (sizes as options; defaults are the task defaults).
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from bipe.errors import ConfigError
from tasks.base import (
    EvalSetting,
    GeneratedTask,
    GeneratedTaskConfig,
    check_int,
    check_int_list,
    register,
)
from tasks.example import EncodedExample

MAX_ALPHABET = 26
MAX_INNER_STATES = 10  # the outer transition table has outer_states * 2^inner_states entries
MAX_OUTER_STATES = 6  # 2^6 = 64 set tokens
MAX_MAJORITY = 0.5  # screening thresholds (module docstring, "degenerate")
MAX_ONE_LEVEL = 0.8
MAX_CANDIDATES = 200
# Sequence sizes: a sequence is built whole in memory (about 340 bytes a segment), and the
# screening runs 200 x 8 words per candidate automaton, so both are bounded; far past any
# block size a model trains on (1024 segments of 64 letters: ~68,000 tokens).
MAX_SEGMENTS = 1024
MAX_SEGMENT_LENGTH = 64

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
SEPARATOR = "#"
PAD_ID, BOS_ID, EOS_ID, SEP_ID = 0, 1, 2, 3


def members(mask: int) -> list[int]:
    """States in a bitmask, increasing: `0b101 -> [0, 2]`."""
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def mask_of(states: Sequence[int]) -> int:
    """Bitmask of a collection of states: `[0, 2] -> 0b101`."""
    mask = 0
    for s in states:
        mask |= 1 << s
    return mask


def set_token(mask: int) -> str:
    """Token naming a set of outer states: `0b101 -> '{0,2}'`, `0 -> '{}'`."""
    return "{" + ",".join(map(str, members(mask))) + "}"


@dataclass(frozen=True)
class BiNFA:
    """A Bi-NFA with transitions as bitmasks (see the module docstring for the semantics)."""

    alphabet: int
    inner_states: int
    outer_states: int
    inner_start: int  # bitmask
    outer_start: int  # bitmask
    inner_delta: tuple[tuple[int, ...], ...]  # [q][letter] -> bitmask of successors
    outer_delta: tuple[tuple[int, ...], ...]  # [p][inner-set bitmask] -> bitmask of successors

    @property
    def letters(self) -> tuple[str, ...]:
        """Letter tokens `a, b, ...`."""
        return tuple(string.ascii_lowercase[: self.alphabet])

    @cached_property
    def _inner_table(self) -> tuple[tuple[int, ...], ...]:
        # Subset transitions [S][letter] -> S', built once: a run is then one lookup per letter.
        table = []
        for s in range(1 << self.inner_states):
            row = []
            for x in range(self.alphabet):
                nxt = 0
                for q in members(s):
                    nxt |= self.inner_delta[q][x]
                row.append(nxt)
            table.append(tuple(row))
        return tuple(table)

    @cached_property
    def _outer_table(self) -> tuple[tuple[int, ...], ...]:
        # [T][S] -> T': the outer set after reading inner set S from outer set T.
        table = []
        for t in range(1 << self.outer_states):
            row = []
            for s in range(1 << self.inner_states):
                nxt = 0
                for p in members(t):
                    nxt |= self.outer_delta[p][s]
                row.append(nxt)
            table.append(tuple(row))
        return tuple(table)

    def inner_run(self, word: Sequence[int]) -> int:
        """Inner set (bitmask) after reading `word` (letter indices) from the start set."""
        s = self.inner_start
        for x in word:
            s = self._inner_table[s][x]
        return s

    def outer_step(self, outer: int, inner: int) -> int:
        """Outer set after one segment whose inner set is `inner` (both bitmasks)."""
        return self._outer_table[outer][inner]

    def run(self, words: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
        """(inner sets, outer sets) after each word, as bitmasks."""
        inner_sets, outer_sets = [], []
        t = self.outer_start
        for word in words:
            s = self.inner_run(word)
            t = self.outer_step(t, s)
            inner_sets.append(s)
            outer_sets.append(t)
        return inner_sets, outer_sets

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON description with sets as lists of states and letters by name."""
        letters = self.letters
        return {
            "alphabet": list(letters),
            "inner_states": self.inner_states,
            "outer_states": self.outer_states,
            "inner_start": members(self.inner_start),
            "outer_start": members(self.outer_start),
            # inner_delta[q][letter] = successors of inner state q on that letter
            "inner_delta": [{x: members(self.inner_delta[q][i]) for i, x in enumerate(letters)}
                            for q in range(self.inner_states)],
            # outer_delta[p][i] = successors of outer state p on the inner set whose bitmask is i
            "outer_delta": [[members(m) for m in row] for row in self.outer_delta],
            "outer_delta_index": "bitmask of the inner set: bit q set iff inner state q is in it",
            "state_tokens": [set_token(m) for m in range(1 << self.outer_states)],
        }


def random_bi_nfa(alphabet: int, inner_states: int, outer_states: int, density: float,
                  seed: int | str) -> BiNFA:
    """One random candidate automaton (unscreened), a function of its arguments only."""
    check_sizes(alphabet, inner_states, outer_states, density)
    rng = random.Random(seed)

    def successors(n: int) -> int:
        mask = mask_of([s for s in range(n) if rng.random() < density])
        return mask or 1 << rng.randrange(n)  # never empty: sets stay informative

    inner = tuple(tuple(successors(inner_states) for _ in range(alphabet))
                  for _ in range(inner_states))
    outer = tuple(tuple(successors(outer_states) for _ in range(1 << inner_states))
                  for _ in range(outer_states))
    return BiNFA(alphabet, inner_states, outer_states, 1, 1, inner, outer)


def predictability(automaton: BiNFA, segment_length: tuple[int, int], sequences: int = 200,
                   segments: int = 8) -> dict[str, float]:
    """Label shares of the majority token and of the best predictors from one level only."""
    rng = random.Random("probe")  # the same probe words for every candidate
    labels: Counter[int] = Counter()
    by_inner: defaultdict[int, Counter[int]] = defaultdict(Counter)
    by_previous: defaultdict[int, Counter[int]] = defaultdict(Counter)
    for _ in range(sequences):
        seq = sample_sequence(automaton, segments, segment_length, rng)
        previous = automaton.outer_start
        for s, t in zip(seq.inner_sets, seq.outer_sets, strict=True):
            labels[t] += 1
            by_inner[s][t] += 1
            by_previous[previous][t] += 1
            previous = t
    total = sum(labels.values())
    return {
        "majority": max(labels.values()) / total,
        "from_inner_set": sum(max(c.values()) for c in by_inner.values()) / total,
        "from_previous_state": sum(max(c.values()) for c in by_previous.values()) / total,
    }


def is_degenerate(stats: dict[str, float]) -> bool:
    """The screening rule of the module docstring."""
    return (stats["majority"] > MAX_MAJORITY or stats["from_inner_set"] > MAX_ONE_LEVEL
            or stats["from_previous_state"] > MAX_ONE_LEVEL)


def make_bi_nfa(alphabet: int, inner_states: int, outer_states: int, density: float,
                segment_length: tuple[int, int], seed: int) -> BiNFA:
    """The task's automaton: the first non-degenerate candidate for `seed` (module docstring)."""
    for c in range(MAX_CANDIDATES):
        automaton = random_bi_nfa(alphabet, inner_states, outer_states, density, f"{seed}/{c}")
        if not is_degenerate(predictability(automaton, segment_length)):
            return automaton
    raise ValueError(
        f"no non-degenerate automaton among {MAX_CANDIDATES} candidates for alphabet={alphabet}, "
        f"inner_states={inner_states}, outer_states={outer_states}, density={density}; "
        "use more states or a density nearer 0.3"
    )


def check_sizes(alphabet: int, inner_states: int, outer_states: int, density: float) -> None:
    """ValueError naming the size that is out of range."""
    # One inner state makes the inner set constant, one outer state the label: no task.
    for name, value, low, top in (("alphabet", alphabet, 1, MAX_ALPHABET),
                                  ("inner_states", inner_states, 2, MAX_INNER_STATES),
                                  ("outer_states", outer_states, 2, MAX_OUTER_STATES)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
            raise ValueError(f"{name}={value!r} must be an integer in {low}..{top}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density!r} must be in [0, 1]")


def vocab(automaton: BiNFA) -> tuple[str, ...]:
    """`<pad> <bos> <eos> #`, the letters, then the `2^m` set tokens in bitmask order."""
    return (*SPECIAL_TOKENS, SEPARATOR, *automaton.letters,
            *(set_token(m) for m in range(1 << automaton.outer_states)))


def state_token_offset(automaton: BiNFA) -> int:
    """Id of the set token `{}`; the set with bitmask m has id offset + m."""
    return len(SPECIAL_TOKENS) + 1 + automaton.alphabet


@dataclass(frozen=True)
class BiNFASequence:
    """Words (letter indices) with the inner and outer sets (bitmasks) after each."""

    words: tuple[tuple[int, ...], ...]
    inner_sets: tuple[int, ...]
    outer_sets: tuple[int, ...]

    def tokens(self, automaton: BiNFA) -> list[str]:
        """`<bos> w_1 # T_1 ... w_K # T_K` as token strings."""
        letters = automaton.letters
        out = ["<bos>"]
        for word, t in zip(self.words, self.outer_sets, strict=True):
            out += [*(letters[x] for x in word), SEPARATOR, set_token(t)]
        return out

    def to_json(self, automaton: BiNFA) -> dict[str, Any]:
        """Words, inner sets, state labels and the token string, as plain JSON."""
        letters = automaton.letters
        return {
            "segments": [[letters[x] for x in w] for w in self.words],
            "inner_sets": [members(s) for s in self.inner_sets],
            "states": [set_token(t) for t in self.outer_sets],
            "tokens": " ".join(self.tokens(automaton)),
        }


def sample_sequence(automaton: BiNFA, n_segments: int, segment_length: tuple[int, int],
                    rng: random.Random) -> BiNFASequence:
    """`n_segments` uniform random words of length in `segment_length`, with their sets."""
    lo, hi = segment_length
    words = tuple(tuple(rng.randrange(automaton.alphabet) for _ in range(rng.randint(lo, hi)))
                  for _ in range(n_segments))
    inner, outer = automaton.run(words)
    return BiNFASequence(words, tuple(inner), tuple(outer))


def encode(automaton: BiNFA, sequence: BiNFASequence) -> EncodedExample:
    """Token ids; state tokens are the boundaries and the only targets."""
    offset = state_token_offset(automaton)
    first_letter = len(SPECIAL_TOKENS) + 1
    ids = [BOS_ID]
    for word, t in zip(sequence.words, sequence.outer_sets, strict=True):
        ids += [first_letter + x for x in word]
        ids += [SEP_ID, offset + t]
    is_state = tuple(i >= offset for i in ids)
    return EncodedExample(tuple(ids), is_state, is_state,
                          {"segments": len(sequence.words)})


DEFAULTS: dict[str, Any] = {
    "alphabet": 3,
    "inner_states": 5,
    "outer_states": 4,
    "density": 0.3,
    "segment_length": (2, 5),
    "automaton_seed": 0,
}


@torch.no_grad()
def bi_nfa_accuracy(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
    """Per-state-token and per-sequence accuracy of the argmax at the scored positions.

    Teacher forcing is the task's chain of thought: each state token is predicted from the word,
    `#` and the true earlier state tokens. Batch: `input_ids`, `boundary`, `targets` `[B, T]`.
    """
    was_training = model.training
    model.eval()
    try:
        logits = model(batch["input_ids"], batch["boundary"])  # [B, T, V]
    finally:
        model.train(was_training)
    targets = batch["targets"]
    scored = targets != -100
    hit = (logits.argmax(dim=-1) == targets) & scored
    tokens, tokens_correct = int(scored.sum()), int(hit.sum())
    has_targets = scored.any(dim=1)
    sequences = int(has_targets.sum())
    sequences_correct = int(((hit | ~scored).all(dim=1) & has_targets).sum())
    return {
        "token_accuracy": tokens_correct / max(tokens, 1),
        "sequence_accuracy": sequences_correct / max(sequences, 1),
        "tokens_correct": float(tokens_correct),
        "tokens": float(tokens),
        "sequences_correct": float(sequences_correct),
        "sequences": float(sequences),
    }


def _range(key: str, value: Any, top: int) -> list[int]:
    lo, hi = check_int_list(key, value, 1, length=2)
    if lo > hi:
        raise ConfigError(f"{key}={[lo, hi]} must be [min, max] with min <= max")
    if hi > top:
        raise ConfigError(f"{key}={[lo, hi]}: at most {top}")
    return [lo, hi]


@dataclass
class BiNFAConfig(GeneratedTaskConfig):
    """`task.*` of `task=bi_nfa` (conf/task/bi_nfa.yaml says what each key does)."""

    name: str = "bi_nfa"
    alphabet: int = DEFAULTS["alphabet"]
    inner_states: int = DEFAULTS["inner_states"]
    outer_states: int = DEFAULTS["outer_states"]
    density: float = DEFAULTS["density"]
    automaton_seed: int = DEFAULTS["automaton_seed"]
    segment_length: list[int] = field(default_factory=lambda: list(DEFAULTS["segment_length"]))
    segments: list[int] = field(default_factory=lambda: [1, 8])  # training draws 1..M
    test_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4])  # M, 2M, 4M

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("task.alphabet", self.alphabet, 1, MAX_ALPHABET)
        check_int("task.inner_states", self.inner_states, 2, MAX_INNER_STATES)
        check_int("task.outer_states", self.outer_states, 2, MAX_OUTER_STATES)
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not (
                0.0 <= self.density <= 1.0):
            raise ConfigError(f"task.density={self.density!r} must be a number in [0, 1]")
        self.density = float(self.density)
        check_int("task.automaton_seed", self.automaton_seed, 0)
        self.segment_length = _range("task.segment_length", self.segment_length,
                                     MAX_SEGMENT_LENGTH)
        self.segments = _range("task.segments", self.segments, MAX_SEGMENTS)
        self.test_multipliers = check_int_list("task.test_multipliers", self.test_multipliers, 1)
        top = self.segments[1] * max(self.test_multipliers)
        if top > MAX_SEGMENTS:
            raise ConfigError(f"task.segments max x max(task.test_multipliers) = {top} segments; "
                              f"at most {MAX_SEGMENTS}")


@register
class BiNFATask(GeneratedTask):
    """Bilevel NFA sequences (the module docstring is the definition); state-token and
    whole-sequence accuracy under teacher forcing."""

    name = "bi_nfa"
    config = BiNFAConfig
    main_metric = "sequence_accuracy"
    pad_id, bos_id, eod_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        c = self.cfg
        self.segment_length: tuple[int, int] = tuple(c.segment_length)
        self.segments: tuple[int, int] = tuple(c.segments)
        self.eval_segments = [m * self.segments[1] for m in c.test_multipliers]
        try:
            self.automaton = make_bi_nfa(c.alphabet, c.inner_states, c.outer_states, c.density,
                                         self.segment_length, c.automaton_seed)
        except ValueError as e:
            raise ConfigError(f"task (bi_nfa): {e}") from e
        self.vocab = vocab(self.automaton)

    def _draw(self, n_segments: int, rng: random.Random) -> EncodedExample:
        seq = sample_sequence(self.automaton, n_segments, self.segment_length, rng)
        return encode(self.automaton, seq)

    def train_example(self, rng: random.Random) -> EncodedExample:
        """One training sequence with a uniform number of segments in `segments`."""
        return self._draw(rng.randint(*self.segments), rng)

    def eval_settings(self) -> list[EvalSetting]:
        """`M * multiplier` segments for each test multiplier."""
        return [EvalSetting(f"seg_{k}", lambda rng, k=k: self._draw(k, rng))
                for k in self.eval_segments]

    def key(self, example: EncodedExample) -> tuple[int, ...]:
        """The whole sequence (its labels follow from its words)."""
        return example.ids

    def stats(self) -> dict[str, Any]:
        """Plain numbers: bounds, expected segments, and one-level baselines of the labels."""
        lo, hi = self.segments
        top = max(self.eval_segments)
        per_segment = self.segment_length[1] + 2  # word, '#', state token
        baselines = predictability(self.automaton, self.segment_length)
        return {
            "max_segments_per_block": hi,
            "segments_per_block_mean": (lo + hi) / 2,
            "max_input_length": hi * per_segment,  # <bos> in, the last state token out
            "max_segment_length": per_segment + 1,  # the first segment holds <bos>
            "eval_max_input_length": top * per_segment,
            "eval_max_segment_length": per_segment + 1,
            "state_tokens": 1 << self.automaton.outer_states,
            **{f"baseline_{k}": round(v, 4) for k, v in baselines.items()},
        }

    def score(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        return bi_nfa_accuracy(model, batch)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.bi_nfa",
        description="Print a random Bi-NFA and labelled sequences as JSON lines.",
    )
    parser.add_argument("--count", type=int, default=10, help="number of sequences")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sequences")
    parser.add_argument("--segments", type=int, default=8, help="segments per sequence")
    parser.add_argument("--min-length", type=int, default=DEFAULTS["segment_length"][0])
    parser.add_argument("--max-length", type=int, default=DEFAULTS["segment_length"][1])
    parser.add_argument("--alphabet", type=int, default=DEFAULTS["alphabet"])
    parser.add_argument("--inner-states", type=int, default=DEFAULTS["inner_states"])
    parser.add_argument("--outer-states", type=int, default=DEFAULTS["outer_states"])
    parser.add_argument("--density", type=float, default=DEFAULTS["density"])
    parser.add_argument("--automaton-seed", type=int, default=DEFAULTS["automaton_seed"])
    args = parser.parse_args(argv)
    if not 1 <= args.segments <= MAX_SEGMENTS:
        parser.error(f"--segments must be in 1..{MAX_SEGMENTS} (a sequence is built whole in "
                     "memory)")
    if not 1 <= args.min_length <= args.max_length <= MAX_SEGMENT_LENGTH or args.count < 0:
        parser.error(f"need 1 <= --min-length <= --max-length <= {MAX_SEGMENT_LENGTH} and "
                     "--count >= 0")
    length = (args.min_length, args.max_length)
    try:
        automaton = make_bi_nfa(args.alphabet, args.inner_states, args.outer_states,
                                args.density, length, args.automaton_seed)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps({"automaton": automaton.to_json()}))
    rng = random.Random(args.seed)
    for _ in range(args.count):
        seq = sample_sequence(automaton, args.segments, length, rng)
        print(json.dumps(seq.to_json(automaton)))


if __name__ == "__main__":
    _main()
