"""Chain-of-thought arithmetic modulo 11 (Feng et al. 2023; docs/methods.md section 2).

Numbers. The field of integers modulo 11: `+ - *` as usual, `a / b = a * b^-1` with `b != 0`
(every nonzero residue has an inverse because 11 is prime). Each residue 0..10 is one token.

Reading rule (the one the generator prints for and the chain of thought follows).
`*` and `/` bind tighter than `+` and `-`; operators of equal precedence evaluate left to right,
so `a - b - c` means `(a - b) - c` and `a / b * c` means `(a / b) * c`.

Brackets. An expression is a binary tree; an operand that is itself an operation is bracketed iff
  * its operator binds less tightly than its parent's (`a * (b + c)`, `(a - b) / c`), or
  * it is the right operand, of equal precedence, of `-` or `/` (`a - (b + c)`, `a - (b - c)`,
    `a / (b * c)`, `a / (b / c)`).
Nothing else is bracketed. A left operand never needs brackets (left to right already groups it),
and a right operand of equal precedence under `+` or `*` does not either: `a + (b - c)` is printed
`a + b - c` and `a * (b / c)` is printed `a * b / c`, which the reading rule groups as
`(a + b) - c` and `(a * b) / c`, the same value for every a, b, c (associativity, and
`x - c = x + (-c)`, `x / c = x * c^-1` with `c != 0`). So every bracket pair that is printed is
needed (removing it changes the value as a function of the numbers) and no needed pair is missing:
the minimal bracketing of Feng et al.'s generator (guyuntian/CoT_benchmark `arithmetic/data.py`),
stated on the tree instead of on neighbouring tokens.

Construction. Start from one uniform random number. Then `n` times: pick a uniform random number
(leaf) of the expression and replace it by `a op b` that evaluates to it, with `op` uniform in
`+ - * /` and `(a, b)` uniform among the pairs with `a op b` equal to the leaf's value (`b != 0` for
`/`, so division by zero never occurs). The expression keeps the value of the starting number.

Chain of thought. It undoes the construction: step k is the expression after `n - k` replacements,
i.e. each step evaluates exactly one operator, the one created last (whose operands are numbers),
and the last step is the single number that started it, the answer. The printed steps are joined by
`=`: `3 * 4 - 5 = 1 - 5 = 7`. The direct-answer control (`direct=True`) keeps only the answer:
`3 * 4 - 5 = 7`. Several trees can print the same expression (`a + b - c` from `(a + b) - c` or
`a + (b - c)`), so, as in Feng et al., the next step is not always unique; every printed step is
correct and has the same value.

Sequence and segments. `<bos> question = step_1 = ... = answer <eos>`. Segments are steps
(docs/methods.md section 1, "one reasoning step per segment"): the token that closes a step is its
boundary, i.e. every `=` and the final `<eos>`. The question with `<bos>` is the first segment;
the answer with `<eos>` the last. With `bos_segment=True` `<bos>` closes a segment of its own, so
the question starts at intra-segment offset 0 like every step (a variant: by default the
question's tokens sit one offset later than the same tokens of the first step). A generated
`=` or `<eos>` thus gets its flag from `separator_ids=(EQ_ID, EOS_ID)` exactly as in training.

Loss. Only the tokens after the first `=` are targets (the steps, the answer and `<eos>`); the
prompt for greedy decoding is everything up to and including the first `=`.

Command line: `python -m tasks.arithmetic --operators N --count K --seed S [--direct]`
prints K examples with N operators, one a line (`--mix` draws 1..N operators as in training).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bipe.errors import ConfigError
from models.generation import generate
from tasks.base import (
    EvalSetting,
    GeneratedTask,
    GeneratedTaskConfig,
    check_int,
    check_int_list,
    register,
)
from tasks.example import EncodedExample

MODULUS = 11
MAX_OPERATORS = 64  # a chain has about 2 N^2 tokens: 64 operators give ~8,400
OPERATORS = ("+", "-", "*", "/")
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
NON_ASSOCIATIVE = ("-", "/")  # a right operand of equal precedence must keep its brackets

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
VOCAB: tuple[str, ...] = (*SPECIAL_TOKENS, *OPERATORS, "(", ")", "=",
                          *(str(v) for v in range(MODULUS)))
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, EQ_ID = (TOKEN_ID[t] for t in ("<pad>", "<bos>", "<eos>", "="))
NUMBER_OFFSET = TOKEN_ID["0"]  # number v has id NUMBER_OFFSET + v
SEPARATOR_IDS = (EQ_ID, EOS_ID)  # tokens that close a segment (a step)

_INVERSE = (0, *(pow(v, -1, MODULUS) for v in range(1, MODULUS)))  # _INVERSE[0] is never used


def apply_op(op: str, a: int, b: int) -> int:
    """`a op b` modulo 11; `/` multiplies by the inverse and refuses `b = 0`."""
    if op == "+":
        return (a + b) % MODULUS
    if op == "-":
        return (a - b) % MODULUS
    if op == "*":
        return a * b % MODULUS
    if op == "/":
        if b % MODULUS == 0:
            raise ZeroDivisionError(f"{a} / {b} modulo {MODULUS}")
        return a * _INVERSE[b % MODULUS] % MODULUS
    raise ValueError(f"unknown operator {op!r}")


# _SPLITS[op][x]: every (a, b) with a op b == x; never empty (b = 0 excluded for "/").
_SPLITS: dict[str, tuple[tuple[tuple[int, int], ...], ...]] = {
    op: tuple(
        tuple((a, b) for a in range(MODULUS) for b in range(MODULUS)
              if not (op == "/" and b == 0) and apply_op(op, a, b) == x)
        for x in range(MODULUS)
    )
    for op in OPERATORS
}


@dataclass(eq=False)
class Node:
    """A number (`op is None`) or an operation `left op right`; `value` is its value mod 11."""

    value: int
    op: str | None = None
    left: Node | None = None
    right: Node | None = None


def needs_brackets(child: Node, parent_op: str, is_right: bool) -> bool:
    """Whether operand `child` of `parent_op` is printed in brackets (module docstring rule)."""
    if child.op is None:
        return False
    mine, theirs = PRECEDENCE[child.op], PRECEDENCE[parent_op]
    return mine < theirs or (is_right and mine == theirs and parent_op in NON_ASSOCIATIVE)


def render(node: Node) -> list[str]:
    """The tokens of `node` printed with minimal brackets, e.g. `['3', '*', '(', ...]`."""
    out: list[str] = []

    def emit(n: Node) -> None:
        if n.op is None:
            out.append(str(n.value))
            return
        for child, is_right in ((n.left, False), (n.right, True)):
            if is_right:
                out.append(n.op)
            wrap = needs_brackets(child, n.op, is_right)
            if wrap:
                out.append("(")
            emit(child)
            if wrap:
                out.append(")")

    emit(node)
    return out


def build_expression(n_ops: int, rng: random.Random) -> tuple[Node, list[list[str]]]:
    """Feng et al.'s construction -> (tree, history); `history[k]` = tokens after k replacements."""
    if n_ops < 0:
        raise ValueError(f"n_ops={n_ops} must be >= 0")
    root = Node(rng.randrange(MODULUS))
    leaves = [root]
    history = [render(root)]
    for _ in range(n_ops):
        leaf = leaves.pop(rng.randrange(len(leaves)))  # uniform over the numbers printed
        op = rng.choice(OPERATORS)
        a, b = rng.choice(_SPLITS[op][leaf.value])
        leaf.op, leaf.left, leaf.right = op, Node(a), Node(b)
        leaves += [leaf.left, leaf.right]
        history.append(render(root))
    return root, history


@dataclass(frozen=True)
class ArithmeticExample:
    """A question, its chain-of-thought steps (the last one is the answer) and the answer."""

    question: tuple[str, ...]
    steps: tuple[tuple[str, ...], ...]
    answer: int
    operators: int
    tree: Node | None = field(default=None, compare=False, repr=False)

    def tokens(self) -> list[str]:
        """`<bos> question = step_1 = ... = answer <eos>` as token strings."""
        out = ["<bos>", *self.question]
        for step in self.steps:
            out += ["=", *step]
        return [*out, "<eos>"]

    def text(self) -> str:
        """Readable form `question = step_1 = ... = answer`."""
        return " = ".join(" ".join(part) for part in (self.question, *self.steps))


def make_example(n_ops: int, rng: random.Random, direct: bool = False) -> ArithmeticExample:
    """One example with `n_ops` operators; `direct=True` drops the intermediate steps."""
    if n_ops < 1:
        raise ValueError(f"n_ops={n_ops} must be >= 1 (a question needs an operator)")
    tree, history = build_expression(n_ops, rng)
    chain = history[::-1]  # question first, the starting number (= answer) last
    steps = chain[-1:] if direct else chain[1:]
    return ArithmeticExample(tuple(chain[0]), tuple(tuple(s) for s in steps), tree.value, n_ops,
                             tree)


def sample_operator_count(max_ops: int, rng: random.Random) -> int:
    """Operator count in 1..max_ops with probability proportional to the count (Feng et al.)."""
    counts = range(1, max_ops + 1)
    return rng.choices(counts, weights=counts)[0]


def encode(example: ArithmeticExample, bos_segment: bool = False) -> EncodedExample:
    """Token ids with boundaries at `=`/`<eos>` (and `<bos>` with `bos_segment`) and targets
    after the first `=`."""
    ids = tuple(TOKEN_ID[t] for t in example.tokens())
    first_eq = ids.index(EQ_ID)
    return EncodedExample(
        ids=ids,
        boundary=tuple(i in SEPARATOR_IDS or (t == 0 and bos_segment)
                       for t, i in enumerate(ids)),
        scored=tuple(t > first_eq for t in range(len(ids))),
        extras={
            "prompt_len": first_eq + 1,  # inputs [0, prompt_len) are the decoding prompt
            "answer_id": NUMBER_OFFSET + example.answer,
            "operators": example.operators,
        },
    )


def question_length_bound(n_ops: int) -> int:
    """Most tokens a question with `n_ops` operators can have (n_ops - 1 bracket pairs)."""
    return max(1, 4 * n_ops - 1)


def input_length_bound(n_ops: int, direct: bool = False) -> int:
    """Most input tokens (sequence minus its last token) of an example with `n_ops` operators."""
    if direct:  # <bos> Q = A
        return question_length_bound(n_ops) + 3
    # <bos>, then each expression of k = n..1 operators with its "=", then the answer.
    return 2 + sum(question_length_bound(k) + 1 for k in range(1, n_ops + 1))


def segment_length_bound(n_ops: int) -> int:
    """Most tokens in one segment: the first, `<bos> question =`."""
    return question_length_bound(n_ops) + 2


def segments_of(encoded: EncodedExample) -> list[tuple[int, ...]]:
    """The token ids of each segment, in order (the closing token included)."""
    out, current = [], []
    for token, flag in zip(encoded.ids, encoded.boundary, strict=True):
        current.append(token)
        if flag:
            out.append(tuple(current))
            current = []
    return out + ([tuple(current)] if current else [])


@dataclass
class PositionStats:
    """How chains sit in BiPE's intra-segment table (`--stats`).

    `intra_counts[i]`: input tokens at intra offset i (which table rows the data reaches, how
    often). `aligned[k]`: of the tokens of chain segment k (k = 1: the first step), the share
    whose same-offset token in segment k - 1 is the same token: the copying a step does reads
    straight across when this is high.
    """

    intra_counts: list[int]
    aligned: dict[int, float]


def position_stats(examples: Sequence[ArithmeticExample], bos_segment: bool = False
                   ) -> PositionStats:
    """`PositionStats` of `examples` encoded with or without `<bos>` as its own segment."""
    counts: list[int] = []
    same: dict[int, list[int]] = {}
    for example in examples:
        encoded = encode(example, bos_segment)
        segments = segments_of(encoded)
        for seg in segments:
            for i in range(len(seg)):
                counts += [0] * (i + 1 - len(counts))
                counts[i] += 1
        chain = segments[1:] if bos_segment else segments  # drop the lone <bos>
        for k in range(1, len(chain) - 1):  # steps, not the final `answer <eos>`
            prev, cur = chain[k - 1], chain[k]
            hits = sum(a == b for a, b in zip(prev[:-1], cur[:-1], strict=False))
            total = same.setdefault(k, [0, 0])
            total[0] += hits
            total[1] += len(cur) - 1
    return PositionStats(counts, {k: h / n for k, (h, n) in sorted(same.items()) if n})


@torch.no_grad()
def arithmetic_accuracy(model: nn.Module, batch: dict[str, Tensor], *,
                        separator_ids: Iterable[int] = SEPARATOR_IDS, eos_id: int = EOS_ID,
                        max_new_tokens: int | None = None) -> dict[str, float]:
    """Final-answer accuracy of greedy KV-cached decoding from each prompt (`... =`).

    Batch: `input_ids`, `boundary` `[B, T]`, `targets` `[B, T]`, `prompt_len`, `answer_id`,
    `length` `[B]`. The predicted answer is the token before the first `<eos>` (the last token if
    none came within `max_new_tokens`, default twice the longest true continuation plus 8). All
    rows decode together, each from its own prompt (`generate(prompt_lengths=...)`), so no prompt
    is padded. `exact` is the share whose generated chain equals the reference token for token
    (chains are not always unique).
    """
    separator_ids = tuple(separator_ids)
    ids, boundary, targets = batch["input_ids"], batch["boundary"], batch["targets"]
    prompt_len, answer, length = batch["prompt_len"], batch["answer_id"], batch["length"]
    B = ids.shape[0]
    # Reference continuation of row r: inputs after the prompt, then the last target (<eos>).
    todo = length + 1 - prompt_len  # [B]
    budget = max_new_tokens or 2 * int(todo.max()) + 8
    was_training = model.training
    model.eval()
    try:
        out = generate(model, ids, boundary, max_new_tokens=budget, separator_ids=separator_ids,
                       eos_id=eos_id, prompt_lengths=prompt_len)  # [B, L]
    finally:
        model.train(was_training)
    L = out.shape[1]
    col = torch.arange(L, device=out.device)[None, :]
    generated = (col >= prompt_len[:, None]) & (col < prompt_len[:, None] + budget)  # [B, L]
    is_eos = (out == eos_id) & generated
    has_eos = is_eos.any(dim=1)
    first_eos = is_eos.long().argmax(dim=1)  # 0 when none; masked below
    last = (prompt_len + budget).clamp(max=L) - 1
    at = torch.where(has_eos, first_eos - 1, last)
    predicted = out.gather(1, at[:, None]).squeeze(1)
    correct = int((predicted == answer).sum())
    exact = 0
    for r in range(B):
        p, n = int(prompt_len[r]), int(todo[r])
        ref = torch.cat([ids[r, p : length[r]], targets[r, length[r] - 1 : length[r]]])
        exact += int(p + n <= L and torch.equal(out[r, p : p + n], ref))
    return {"accuracy": correct / max(B, 1), "exact": exact / max(B, 1),
            "correct": float(correct), "exact_count": float(exact), "count": float(B)}



@dataclass
class ArithmeticConfig(GeneratedTaskConfig):
    """`task.*` of `task=arithmetic` (conf/task/arithmetic.yaml says what each key does)."""

    name: str = "arithmetic"
    operators: int = 4  # N: training mixes 1..N operators (share proportional to the count)
    direct: bool = False  # True: `expression = answer`, no chain of thought
    test_offsets: list[int] = field(default_factory=lambda: [1, 2, 3])
    bos_segment: bool = False  # True: <bos> is a segment of its own

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("task.operators", self.operators, 1, MAX_OPERATORS)
        for key in ("direct", "bos_segment"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"task.{key}={getattr(self, key)!r} must be true or false")
        self.test_offsets = check_int_list("task.test_offsets", self.test_offsets, 1)
        top = self.operators + max(self.test_offsets)
        if top > MAX_OPERATORS:
            raise ConfigError(f"task.operators + max(task.test_offsets) = {top} operators; at "
                              f"most {MAX_OPERATORS} (a chain grows with the square of the count)")


@register
class ArithmeticTask(GeneratedTask):
    """Chain-of-thought (or direct) arithmetic mod 11 (module docstring), final-answer accuracy
    by greedy KV-cached decoding."""

    name = "arithmetic"
    config = ArithmeticConfig
    main_metric = "accuracy"
    vocab = VOCAB
    pad_id, bos_id, eod_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.operators: int = self.cfg.operators
        self.direct: bool = self.cfg.direct
        self.bos_segment: bool = self.cfg.bos_segment
        self.eval_operators = [self.operators] + [self.operators + o
                                                  for o in self.cfg.test_offsets]

    def _draw(self, n_ops: int, rng: random.Random) -> EncodedExample:
        return encode(make_example(n_ops, rng, self.direct), self.bos_segment)

    def train_example(self, rng: random.Random) -> EncodedExample:
        """One training example: 1..N operators, share proportional to the count."""
        return self._draw(sample_operator_count(self.operators, rng), rng)

    def eval_settings(self) -> list[EvalSetting]:
        """In-distribution N, then N + each test offset."""
        return [EvalSetting(f"ops_{n}", lambda rng, n=n: self._draw(n, rng))
                for n in self.eval_operators]

    def key(self, example: EncodedExample) -> tuple[int, ...]:
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
            "max_input_length": input_length_bound(n, self.direct),
            "max_segment_length": segment_length_bound(n),
            "eval_max_input_length": input_length_bound(top, self.direct),
            "eval_max_segment_length": segment_length_bound(top),
        }

    def score(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        return arithmetic_accuracy(model, batch)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.arithmetic",
        description="Print chain-of-thought arithmetic examples (mod 11), one a line.",
    )
    parser.add_argument("--operators", type=int, required=True, help="operators per question")
    parser.add_argument("--count", type=int, default=10, help="number of examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--direct", action="store_true", help="answer only, no chain of thought")
    parser.add_argument("--mix", action="store_true",
                        help="draw 1..N operators with share proportional to the count")
    parser.add_argument("--stats", action="store_true",
                        help="instead of examples: which intra-segment offsets the chains use "
                             "and how well consecutive steps line up, with <bos> in the "
                             "question and as a segment of its own")
    args = parser.parse_args(argv)
    if not 1 <= args.operators <= MAX_OPERATORS or args.count < 0:
        parser.error(f"--operators must be in 1..{MAX_OPERATORS} (a chain grows with the square "
                     "of the count) and --count >= 0")
    rng = random.Random(args.seed)
    if args.stats:
        drawn = [make_example(sample_operator_count(args.operators, rng) if args.mix
                              else args.operators, rng, args.direct) for _ in range(args.count)]
        for bos_segment in (False, True):
            st = position_stats(drawn, bos_segment)
            total = sum(st.intra_counts)
            print(f"bos_segment={bos_segment}: tokens by intra offset (share %): "
                  + " ".join(f"{i}:{100 * c / total:.1f}" for i, c in enumerate(st.intra_counts)))
            print("  same token at the same offset as in the segment before, by step: "
                  + " ".join(f"step {k}: {100 * a:.0f}%" for k, a in st.aligned.items()))
        return
    for _ in range(args.count):
        n = sample_operator_count(args.operators, rng) if args.mix else args.operators
        print(make_example(n, rng, args.direct).text())


if __name__ == "__main__":
    _main()
