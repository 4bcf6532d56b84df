"""The `task` config of the synthetic tasks, validated, and what each task generates.

A task turns a random generator into one `EncodedExample` (training draws, one per call) and names
its evaluation settings (one fixed set of examples each). `SyntheticDataModule` does the seeding,
batching and loaders; this module knows nothing about torch.

Keys (`task.*`), with defaults:
  common:     name (arithmetic | bi_nfa), batch_size 64, eval_batch_size 256, n_val 256,
              val_seed 1234, num_workers 0
  arithmetic: operators 4, direct false, test_offsets [1, 2, 3], bos_segment false
  bi_nfa:     alphabet 3, inner_states 5, outer_states 4, density 0.3, automaton_seed 0,
              segment_length [2, 5], segments [1, 8], test_multipliers [1, 2, 4]
An unknown key is an error naming it (a misspelt `task.operator` must not train the default).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bipe.errors import ConfigError

from . import arithmetic, bi_nfa
from .example import EncodedExample

TASK_NAMES = ("arithmetic", "bi_nfa")
# The headline metric of each task (`tasks.synthetic.metrics.RATES`): progress bar, summaries.
MAIN_METRIC = {"arithmetic": "accuracy", "bi_nfa": "sequence_accuracy", "scrolls": "score"}
COMMON_DEFAULTS: dict[str, Any] = {
    "batch_size": 64,
    "eval_batch_size": 256,
    "n_val": 256,  # examples per evaluation setting
    "val_seed": 1234,  # evaluation sets do not depend on the training seed: runs share them
    "num_workers": 0,
}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # N = 4 (tests at 5, 6, 7): chains of at most 42 input tokens. Measured on one shared CPU
    # core (3 layers, hidden 64, batch 64, AdamW 3e-3): RoPE reaches 95% in-distribution answer
    # accuracy after 8 minutes (4,100 steps) and 100% after 9; BiPE-RoPE 81% after 8 minutes
    # (2,900 steps, a busier core). N = 5 with hidden 128 was at 19% after 5 minutes (600
    # steps). Feng et al.'s N = 15 needs ~500-token chains and GPU hours.
    "arithmetic": {"operators": 4, "direct": False, "test_offsets": [1, 2, 3],
                   "bos_segment": False},
    "bi_nfa": {
        "alphabet": bi_nfa.DEFAULTS["alphabet"],
        "inner_states": bi_nfa.DEFAULTS["inner_states"],
        "outer_states": bi_nfa.DEFAULTS["outer_states"],
        "density": bi_nfa.DEFAULTS["density"],
        "automaton_seed": bi_nfa.DEFAULTS["automaton_seed"],
        "segment_length": list(bi_nfa.DEFAULTS["segment_length"]),
        "segments": [1, 8],  # training draws 1..M segments uniformly; M = 8
        "test_multipliers": [1, 2, 4],  # test at M, 2M, 4M segments
    },
}


def _int(cfg: Mapping[str, Any], key: str, lo: int, hi: int | None = None) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
            hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"task.{key}={value!r} must be an integer {bound}")
    return value


def _int_list(cfg: Mapping[str, Any], key: str, lo: int, length: int | None = None) -> list[int]:
    value = cfg[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or (
            length is not None and len(value) != length) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < lo for v in value):
        shape = f"a list of {length}" if length else "a non-empty list of"
        raise ConfigError(f"task.{key}={value!r} must be {shape} integers >= {lo}")
    return [int(v) for v in value]


def _range(cfg: Mapping[str, Any], key: str) -> tuple[int, int]:
    lo, hi = _int_list(cfg, key, 1, length=2)
    if lo > hi:
        raise ConfigError(f"task.{key}={[lo, hi]} must be [min, max] with min <= max")
    return lo, hi


def resolve(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Plain dict of every key with defaults filled in; ConfigError for a bad or unknown key."""
    name = cfg.get("name")
    if name not in TASK_NAMES:
        raise ConfigError(f"task.name={name!r} is not a synthetic task; choose one of "
                          f"{', '.join(TASK_NAMES)}")
    defaults = {"name": name, **COMMON_DEFAULTS, **TASK_DEFAULTS[name]}
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'task.{k}' for k in unknown)} for "
                          f"task.name={name}; valid keys: {', '.join(sorted(defaults))}")
    out = {**defaults, **cfg}
    for key in ("batch_size", "eval_batch_size", "n_val"):
        out[key] = _int(out, key, 1)
    out["val_seed"] = _int(out, "val_seed", 0)
    out["num_workers"] = _int(out, "num_workers", 0)
    if name == "arithmetic":
        out["operators"] = _int(out, "operators", 1, 64)
        for key in ("direct", "bos_segment"):
            if not isinstance(out[key], bool):
                raise ConfigError(f"task.{key}={out[key]!r} must be true or false")
        out["test_offsets"] = _int_list(out, "test_offsets", 1)
    else:
        out["alphabet"] = _int(out, "alphabet", 1, bi_nfa.MAX_ALPHABET)
        out["inner_states"] = _int(out, "inner_states", 2, bi_nfa.MAX_INNER_STATES)
        out["outer_states"] = _int(out, "outer_states", 2, bi_nfa.MAX_OUTER_STATES)
        density = out["density"]
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not (
                0.0 <= density <= 1.0):
            raise ConfigError(f"task.density={density!r} must be a number in [0, 1]")
        out["density"] = float(density)
        out["automaton_seed"] = _int(out, "automaton_seed", 0)
        out["segment_length"] = list(_range(out, "segment_length"))
        out["segments"] = list(_range(out, "segments"))
        out["test_multipliers"] = _int_list(out, "test_multipliers", 1)
    return out


@dataclass(frozen=True)
class EvalSetting:
    """One evaluation set: its name (`ops_6`, `seg_16`) and how to draw one of its examples."""

    name: str
    draw: Callable[[random.Random], EncodedExample]


class ArithmeticTask:
    """Chain-of-thought (or direct) arithmetic mod 11; see `tasks.synthetic.arithmetic`."""

    name = "arithmetic"

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.operators: int = cfg["operators"]
        self.direct: bool = cfg["direct"]
        self.bos_segment: bool = cfg["bos_segment"]
        self.eval_operators = [self.operators] + [self.operators + o for o in cfg["test_offsets"]]
        self.vocab: tuple[str, ...] = arithmetic.VOCAB
        self.pad_id, self.bos_id, self.eod_id = (arithmetic.PAD_ID, arithmetic.BOS_ID,
                                                 arithmetic.EOS_ID)

    def _draw(self, n_ops: int, rng: random.Random) -> EncodedExample:
        return arithmetic.encode(arithmetic.make_example(n_ops, rng, self.direct),
                                 self.bos_segment)

    def train_example(self, rng: random.Random) -> EncodedExample:
        """One training example: 1..N operators, share proportional to the count."""
        return self._draw(arithmetic.sample_operator_count(self.operators, rng), rng)

    def eval_settings(self) -> list[EvalSetting]:
        """In-distribution N, then N + each test offset."""
        return [EvalSetting(f"ops_{n}", lambda rng, n=n: self._draw(n, rng))
                for n in self.eval_operators]

    @staticmethod
    def key(example: EncodedExample) -> tuple[int, ...]:
        """What makes two examples the same question: the prompt (chains may differ)."""
        return example.ids[: example.extras["prompt_len"]]

    def stats(self) -> dict[str, Any]:
        """Plain numbers: bounds over training and evaluation, expected segments per sequence."""
        n = self.operators
        weights = range(1, n + 1)
        # the question + one per step (+ <bos> alone with bos_segment)
        segments = [(2 if self.direct else k + 1) + self.bos_segment for k in weights]
        top = max(self.eval_operators)
        return {
            "operators": n,
            "max_segments_per_block": max(segments),
            "segments_per_block_mean": round(
                sum(w * s for w, s in zip(weights, segments, strict=True)) / sum(weights), 3),
            "max_input_length": arithmetic.input_length_bound(n, self.direct),
            "max_segment_length": arithmetic.segment_length_bound(n),
            "eval_max_input_length": arithmetic.input_length_bound(top, self.direct),
            "eval_max_segment_length": arithmetic.segment_length_bound(top),
        }


class BiNFATask:
    """Bilevel NFA sequences; see `tasks.synthetic.bi_nfa` (its docstring is the definition)."""

    name = "bi_nfa"

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.segment_length: tuple[int, int] = tuple(cfg["segment_length"])
        self.segments: tuple[int, int] = tuple(cfg["segments"])
        self.eval_segments = [m * self.segments[1] for m in cfg["test_multipliers"]]
        try:
            self.automaton = bi_nfa.make_bi_nfa(cfg["alphabet"], cfg["inner_states"],
                                                cfg["outer_states"], cfg["density"],
                                                self.segment_length, cfg["automaton_seed"])
        except ValueError as e:
            raise ConfigError(f"task (bi_nfa): {e}") from e
        self.vocab = bi_nfa.vocab(self.automaton)
        self.pad_id, self.bos_id, self.eod_id = bi_nfa.PAD_ID, bi_nfa.BOS_ID, bi_nfa.EOS_ID

    def _draw(self, n_segments: int, rng: random.Random) -> EncodedExample:
        seq = bi_nfa.sample_sequence(self.automaton, n_segments, self.segment_length, rng)
        return bi_nfa.encode(self.automaton, seq)

    def train_example(self, rng: random.Random) -> EncodedExample:
        """One training sequence with a uniform number of segments in `segments`."""
        return self._draw(rng.randint(*self.segments), rng)

    def eval_settings(self) -> list[EvalSetting]:
        """`M * multiplier` segments for each test multiplier."""
        return [EvalSetting(f"seg_{k}", lambda rng, k=k: self._draw(k, rng))
                for k in self.eval_segments]

    @staticmethod
    def key(example: EncodedExample) -> tuple[int, ...]:
        """The whole sequence (its labels follow from its words)."""
        return example.ids

    def stats(self) -> dict[str, Any]:
        """Plain numbers: bounds, expected segments, and one-level baselines of the labels."""
        lo, hi = self.segments
        top = max(self.eval_segments)
        per_segment = self.segment_length[1] + 2  # word, '#', state token
        baselines = bi_nfa.predictability(self.automaton, self.segment_length)
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


def make_task(cfg: Mapping[str, Any]) -> tuple[ArithmeticTask | BiNFATask, dict[str, Any]]:
    """The task for a `task` config, and the resolved config (defaults filled in)."""
    resolved = resolve(cfg)
    task = ArithmeticTask(resolved) if resolved["name"] == "arithmetic" else BiNFATask(resolved)
    return task, resolved
