"""The arithmetic generator against an independent parser (docs/methods.md section 2)."""

import random

import pytest

from tasks import arithmetic as ar
from tasks.arithmetic import Node

P = 1_000_003  # a large prime: random points tell different rational functions apart


class Parser:
    """Recursive descent with the documented rule: * / above + -, equal precedence left first."""

    def __init__(self, tokens, modulus, leaf=None):
        self.tokens, self.i, self.modulus = list(tokens), 0, modulus
        self.leaf = leaf or (lambda k, text: int(text))  # value of the k-th number token
        self.leaves = 0

    def parse(self):
        value = self.expr()
        assert self.i == len(self.tokens), f"trailing tokens in {self.tokens}"
        return value

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self):
        self.i += 1
        return self.tokens[self.i - 1]

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            op, rhs = self.take(), self.term()
            value = (value + rhs if op == "+" else value - rhs) % self.modulus
        return value

    def term(self):
        value = self.factor()
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor()
            if op == "/":
                if rhs % self.modulus == 0:
                    raise ZeroDivisionError
                rhs = pow(rhs, -1, self.modulus)
            value = value * rhs % self.modulus
        return value

    def factor(self):
        tok = self.take()
        if tok == "(":
            value = self.expr()
            assert self.take() == ")"
            return value
        assert tok.isdigit(), tok
        self.leaves += 1
        return self.leaf(self.leaves - 1, tok) % self.modulus


def value_mod11(tokens):
    return Parser(tokens, 11).parse()


def as_function(tokens, points):
    """Values of the expression with its numbers replaced by variables, at each point (or None
    where it divides by zero)."""
    out = []
    for point in points:
        try:
            out.append(Parser(tokens, P, lambda k, _, pt=point: pt[k]).parse())
        except ZeroDivisionError:
            out.append(None)
    return out


def tree_function(node, points):
    def ev(n, point, counter):
        if n.op is None:
            counter[0] += 1
            return point[counter[0] - 1]
        a, b = ev(n.left, point, counter), ev(n.right, point, counter)
        if n.op == "/":
            if b == 0:
                raise ZeroDivisionError
            return a * pow(b, -1, P) % P
        return {"+": a + b, "-": a - b, "*": a * b}[n.op] % P

    out = []
    for point in points:
        try:
            out.append(ev(node, point, [0]))
        except ZeroDivisionError:
            out.append(None)
    return out


def examples(n_max=8, per_n=25, seed=0, direct=False):
    rng = random.Random(seed)
    return [ar.make_example(n, rng, direct) for n in range(1, n_max + 1) for _ in range(per_n)]


def random_points(k, count=4, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, P) for _ in range(k)] for _ in range(count)]


def n_operators(tokens):
    return sum(t in ar.OPERATORS for t in tokens)


def test_every_step_has_the_value_of_the_question_and_the_last_is_the_answer():
    for ex in examples():
        assert value_mod11(ex.question) == ex.answer
        for step in ex.steps:  # ZeroDivisionError here would mean a division by zero
            assert value_mod11(step) == ex.answer
        assert ex.steps[-1] == (str(ex.answer),)
        assert ex.text().endswith(f"= {ex.answer}")


def test_operator_count_is_as_asked_and_each_step_evaluates_one_operator():
    for ex in examples():
        assert n_operators(ex.question) == ex.operators
        assert len(ex.steps) == ex.operators
        chain = [ex.question, *ex.steps]
        for k, (before, after) in enumerate(zip(chain, chain[1:], strict=False)):
            assert n_operators(after) == ex.operators - k - 1
            assert one_operator_evaluated(list(before), list(after)), (before, after)


def one_operator_evaluated(before, after):
    """`after` is `before` with one `a op b` (or `( a op b )`) replaced by its value mod 11."""
    for i in range(len(before) - 2):
        a, op, b = before[i : i + 3]
        if not (a.isdigit() and op in ar.OPERATORS and b.isdigit()):
            continue
        if op == "/" and int(b) == 0:
            continue
        v = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
             "/": int(a) * pow(int(b), -1, 11) if int(b) else None}[op] % 11
        for lo, hi in ((i, i + 3), (i - 1, i + 4)):
            if lo >= 0 and before[lo:hi] in (before[i : i + 3], ["(", a, op, b, ")"]) and (
                    before[:lo] + [str(v)] + before[hi:] == after):
                return True
    return False


@pytest.mark.parametrize(("tree", "text"), [
    (Node(0, "-", Node(1), Node(0, "-", Node(2), Node(3))), "1 - ( 2 - 3 )"),
    (Node(0, "-", Node(0, "-", Node(1), Node(2)), Node(3)), "1 - 2 - 3"),
    (Node(0, "/", Node(1), Node(0, "*", Node(2), Node(3))), "1 / ( 2 * 3 )"),
    (Node(0, "/", Node(1), Node(0, "/", Node(2), Node(3))), "1 / ( 2 / 3 )"),
    (Node(0, "*", Node(1), Node(0, "/", Node(2), Node(3))), "1 * 2 / 3"),
    (Node(0, "+", Node(1), Node(0, "-", Node(2), Node(3))), "1 + 2 - 3"),
    (Node(0, "-", Node(1), Node(0, "*", Node(2), Node(3))), "1 - 2 * 3"),
    (Node(0, "*", Node(0, "+", Node(1), Node(2)), Node(3)), "( 1 + 2 ) * 3"),
    (Node(0, "/", Node(0, "/", Node(1), Node(2)), Node(3)), "1 / 2 / 3"),
])
def test_bracket_rule_on_small_trees(tree, text):
    assert " ".join(ar.render(tree)) == text


def bracket_pairs(tokens):
    stack, pairs = [], []
    for i, t in enumerate(tokens):
        if t == "(":
            stack.append(i)
        elif t == ")":
            pairs.append((stack.pop(), i))
    assert not stack
    return pairs


def test_every_bracket_pair_is_needed_and_no_needed_one_is_missing():
    """Removing any printed pair changes the expression as a function of its numbers, and the
    printed expression is the same function as the construction tree."""
    seen_brackets = 0
    for ex in examples(n_max=7, per_n=15, seed=1):
        q = list(ex.question)
        points = random_points(ex.operators + 1, seed=ex.operators)
        reference = as_function(q, points)
        assert reference == tree_function(ex.tree, points)
        for lo, hi in bracket_pairs(q):
            seen_brackets += 1
            removed = q[:lo] + q[lo + 1 : hi] + q[hi + 1 :]
            assert as_function(removed, points) != reference, (" ".join(q), lo)
    assert seen_brackets > 50  # the check ran on many pairs


def test_division_never_by_zero_in_any_step():
    for ex in examples(n_max=6, per_n=40, seed=2):
        for part in (ex.question, *ex.steps):
            value_mod11(part)  # raises ZeroDivisionError on a zero divisor


def test_all_operators_and_values_occur():
    exs = examples(n_max=5, per_n=40, seed=3)
    ops = {t for ex in exs for t in ex.question if t in ar.OPERATORS}
    answers = {ex.answer for ex in exs}
    assert ops == set(ar.OPERATORS) and answers == set(range(11))


def test_loss_mask_covers_exactly_the_tokens_after_the_first_equals():
    for ex in examples(n_max=5, per_n=5, seed=4):
        enc = ar.encode(ex)
        tokens = ex.tokens()
        assert [ar.VOCAB[i] for i in enc.ids] == tokens
        first_eq = tokens.index("=")
        assert enc.scored == tuple(t > first_eq for t in range(len(tokens)))
        assert enc.extras["prompt_len"] == first_eq + 1
        assert enc.extras["answer_id"] == ar.TOKEN_ID[str(ex.answer)]
        assert tokens[-1] == "<eos>" and enc.scored[-1]


def test_boundaries_close_each_step():
    for ex in examples(n_max=5, per_n=5, seed=5):
        enc = ar.encode(ex)
        tokens = ex.tokens()
        segments, current = [], []
        for tok, flag in zip(tokens, enc.boundary, strict=True):
            current.append(tok)
            if flag:
                segments.append(current)
                current = []
        assert current == []  # <eos> closes the last segment
        assert segments[0] == ["<bos>", *ex.question, "="]
        assert segments[1:-1] == [[*s, "="] for s in ex.steps[:-1]]
        assert segments[-1] == [str(ex.answer), "<eos>"]
        assert enc.segments() == ex.operators + 1  # among the inputs (<eos> is only a target)


def test_direct_variant_has_one_step():
    for ex in examples(n_max=6, per_n=5, seed=6, direct=True):
        assert ex.steps == ((str(ex.answer),),)
        assert ex.tokens() == ["<bos>", *ex.question, "=", str(ex.answer), "<eos>"]
        assert value_mod11(ex.question) == ex.answer


def test_same_seed_same_examples_other_seed_other_examples():
    assert examples(seed=7) == examples(seed=7)
    assert examples(seed=7) != examples(seed=8)


def test_operator_mix_is_proportional_to_the_count():
    rng = random.Random(0)
    draws = [ar.sample_operator_count(4, rng) for _ in range(20_000)]
    for n in range(1, 5):
        assert abs(draws.count(n) / len(draws) - n / 10) < 0.015


def test_length_bounds_hold():
    for ex in examples(n_max=8, per_n=20, seed=9):
        enc = ar.encode(ex)
        assert len(ex.question) <= ar.question_length_bound(ex.operators)
        assert enc.input_length <= ar.input_length_bound(ex.operators)
        assert enc.max_segment_length() <= ar.segment_length_bound(ex.operators)
    for ex in examples(n_max=8, per_n=5, seed=9, direct=True):
        assert ar.encode(ex).input_length <= ar.input_length_bound(ex.operators, direct=True)


def test_cli_prints_readable_chains(capsys):
    ar._main(["--operators", "3", "--count", "5", "--seed", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    for line in lines:
        parts = [p.split() for p in line.split(" = ")]
        assert len(parts) == 4 and n_operators(parts[0]) == 3
        assert {value_mod11(p) for p in parts} == {int(parts[-1][0])}
    ar._main(["--operators", "3", "--count", "5", "--seed", "1"])
    assert capsys.readouterr().out.splitlines() == lines
    ar._main(["--operators", "3", "--count", "2", "--seed", "1", "--direct"])
    assert all(len(line.split(" = ")) == 2 for line in capsys.readouterr().out.splitlines())


def test_bos_segment_puts_the_question_at_offset_zero_like_every_step():
    """Consecutive chain segments line up offset by offset (what BiPE's intra table sees): with
    `<bos>` inside the question its tokens sit one offset late, so the question and the first
    step almost never agree position by position; as its own segment they agree like later
    steps do."""
    rng = random.Random(7)
    drawn = [ar.make_example(4, rng) for _ in range(400)]
    inside, alone = ar.position_stats(drawn, False), ar.position_stats(drawn, True)
    assert inside.aligned[1] < 0.05 < 0.3 < inside.aligned[2]
    assert alone.aligned[1] > 0.3 and alone.aligned[2] == pytest.approx(inside.aligned[2])
    for ex in drawn[:20]:
        enc = ar.encode(ex, bos_segment=True)
        assert enc.boundary[0] and enc.segments() == ex.operators + 2
        assert ar.segments_of(enc)[1] == tuple(ar.TOKEN_ID[t] for t in (*ex.question, "="))
    # Offsets reached: every input token is counted once, at its offset in its segment.
    assert sum(alone.intra_counts) == sum(len(ar.encode(e).ids) for e in drawn)
    assert len(alone.intra_counts) == len(inside.intra_counts) - 1  # the longest loses <bos>
