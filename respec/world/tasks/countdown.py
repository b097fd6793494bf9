"""Countdown: combine the given numbers with + - * / and parentheses to reach a target.

Prompt and completion, e.g.::

    Q: use 3 5 7 to make 22
    3*5=15;15+7=22
    Answer: 3*5+7

Each given number may be used at most once (not all need to be used); division must be
exact arithmetic on rationals, so ``(7-3)/2`` is 2 and ``7/2*2`` is 7. Problems are generated
by combining all the numbers in a random order with random operations, keeping only
positive integer intermediates, so every problem has a solution: `Problem.answer` holds it.

The scorer reads the expression after the last ``Answer:`` (an optional ``=...`` tail is
ignored) with a small recursive-descent parser: never `eval`, no exponent, no unary minus.
It returns reward 0 with a reason for anything malformed or hostile.

Solution styles written by `sft_completion`:

- ``worked``: the generator's solution, one ``x op y=z`` step per operation, then the
  expression; always correct.
- ``direct``: just ``Answer: <expression>``; the solution with probability `direct_accuracy`,
  otherwise another expression over the numbers that misses the target.
- ``sloppy``: the steps of an expression that misses the target, with the last step
  claiming the target anyway; always wrong.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from respec.errors import ConfigError
from respec.world.tasks.base import (
    ANSWER_PREFIX,
    Problem,
    Score,
    check_style_mix,
    clip,
    final_answer,
    resolve_style,
)

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**12
MAX_PAREN_DEPTH = 16
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_OPERATORS = {"+": "+", "-": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}


@dataclass(frozen=True)
class Node:
    """An expression tree: a leaf holds `value` only; an inner node has op, left and right."""

    value: int
    op: str | None = None
    left: Node | None = None
    right: Node | None = None


@dataclass(frozen=True)
class CountdownTask:
    min_numbers: int = 3  # fewest numbers in a problem
    max_numbers: int = 4  # most numbers in a problem
    max_number: int = 15  # numbers are drawn from 1..max_number
    max_target: int = 200  # targets stay in 1..max_target
    style_weights: tuple[float, float, float] = (0.35, 0.35, 0.30)  # worked, direct, sloppy
    direct_accuracy: float = 0.4  # chance that a "direct" completion is right

    name = "countdown"
    styles = ("worked", "direct", "sloppy")

    def __post_init__(self) -> None:
        if not 2 <= self.min_numbers <= self.max_numbers <= 6:
            raise ConfigError(
                f"countdown needs 2 <= min_numbers <= max_numbers <= 6, "
                f"got {self.min_numbers} and {self.max_numbers}"
            )
        if not 2 <= self.max_number <= 1000 or self.max_target < 1:
            raise ConfigError(
                f"countdown needs 2 <= max_number <= 1000 and max_target >= 1, "
                f"got max_number={self.max_number}, max_target={self.max_target}"
            )
        check_style_mix("countdown", self.style_weights, self.direct_accuracy)

    def problems(self, n: int, seed: int) -> list[Problem]:
        """Return `n` solvable problems, the same ones for the same seed."""
        rng = random.Random(seed)
        return [self._problem(rng) for _ in range(n)]

    def _problem(self, rng: random.Random) -> Problem:
        for _ in range(10_000):
            count = rng.randint(self.min_numbers, self.max_numbers)
            numbers = [rng.randint(1, self.max_number) for _ in range(count)]
            tree = _random_tree(numbers, rng)
            if tree.value <= self.max_target:
                break
        else:
            raise ConfigError(f"no countdown problem reaches a target <= {self.max_target}; raise max_target")
        shown = " ".join(str(x) for x in numbers)
        return Problem(
            prompt=f"Q: use {shown} to make {tree.value}\n",
            answer=_infix(tree),
            meta={"numbers": numbers, "target": tree.value, "steps": _steps(tree)},
        )

    def score(self, problem: Problem, completion: str) -> Score:
        """Return reward 1.0 when the last ``Answer:`` expression reaches the target legally, else 0.0."""
        try:
            parsed = final_answer(completion)
            if parsed is None:
                return Score(0.0, None, "no Answer: line")
            expression = parsed.split("=", 1)[0]
            value = evaluate(expression, problem.meta["numbers"])
        except InvalidExpression as e:
            return Score(0.0, parsed, str(e))
        except Exception as e:  # the contract is "never raises"; a bug here must not kill a rollout
            return Score(0.0, None, f"scorer error: {type(e).__name__}")
        target = problem.meta["target"]
        if value != target:
            return Score(0.0, parsed, f"value {value} is not the target {target}")
        return Score(1.0, parsed, "correct")

    def sft_completion(
        self, problem: Problem, rng: random.Random, style: str | None = None
    ) -> tuple[str, bool]:
        """Return (completion text, whether it is correct) in `style`, drawn from `style_weights` if None."""
        style = resolve_style(self, style, rng)
        numbers, target = problem.meta["numbers"], problem.meta["target"]
        if style == "worked":
            text = f"{';'.join(problem.meta['steps'])}\n{ANSWER_PREFIX} {problem.answer}"
        elif style == "direct":
            right = rng.random() < self.direct_accuracy
            expression = problem.answer if right else _infix(_miss(numbers, target, rng))
            text = f"{ANSWER_PREFIX} {expression}"
        else:
            tree = _miss(numbers, target, rng)
            steps = _steps(tree)
            steps[-1] = steps[-1].rsplit("=", 1)[0] + f"={target}"  # claims the target anyway
            text = f"{';'.join(steps)}\n{ANSWER_PREFIX} {_infix(tree)}"
        return text, self.score(problem, text).reward == 1.0


def _combine(op: str, left: Node, right: Node) -> Node | None:
    """Return the node `left op right`, or None when the result is not a positive integer."""
    a, b = left.value, right.value
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    else:
        value = a // b if b > 1 and a % b == 0 else 0  # dividing by 1 is legal but teaches nothing
    return Node(value, op, left, right) if value > 0 else None


def _random_tree(numbers: list[int], rng: random.Random) -> Node:
    """Return a random tree over all `numbers` with positive integer intermediates."""
    items = [Node(x) for x in numbers]
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        ops = ["+", "-", "*", "/"]
        rng.shuffle(ops)
        # "+" always gives a positive integer, so some operation fits.
        node = next(n for op in ops if (n := _combine(op, items[i], items[j])) is not None)
        items = [x for k, x in enumerate(items) if k not in (i, j)] + [node]
    return items[0]


def _miss(numbers: list[int], target: int, rng: random.Random) -> Node:
    """Return a tree over some of `numbers` whose value is not `target`."""
    for _ in range(50):
        tree = _random_tree(numbers, rng)
        if tree.value != target:
            return tree
    # Every random combination hit the target: some operation on the first two numbers misses it
    # (a+b and a*b both hit only for 2 and 2 with target 4, and then 2/2 misses).
    a, b = Node(numbers[0]), Node(numbers[1])
    nodes = (_combine(op, a, b) for op in "+*/-")
    return next(n for n in nodes if n is not None and n.value != target)


def _infix(node: Node) -> str:
    """Return the expression of `node` with only the parentheses that precedence needs."""
    if node.op is None:
        return str(node.value)
    p = _PRECEDENCE[node.op]
    left, right = _infix(node.left), _infix(node.right)
    if node.left.op is not None and _PRECEDENCE[node.left.op] < p:
        left = f"({left})"
    if node.right.op is not None and (
        _PRECEDENCE[node.right.op] < p or (_PRECEDENCE[node.right.op] == p and node.op in "-/")
    ):
        right = f"({right})"
    return f"{left}{node.op}{right}"


def _steps(node: Node) -> list[str]:
    """Return the ``x op y=z`` steps that evaluate `node`, innermost first."""
    if node.op is None:
        return []
    return (
        _steps(node.left)
        + _steps(node.right)
        + [f"{node.left.value}{node.op}{node.right.value}={node.value}"]
    )


class InvalidExpression(ValueError):
    """An answer expression that cannot be scored; the message is the reason."""


def evaluate(expression: str, numbers: list[int]) -> Fraction:
    """Return the exact value of `expression` using each of `numbers` at most once.

    Raises InvalidExpression (with a short reason) for anything else: unknown characters,
    numbers not given or used too often, division by zero, values beyond 1e12, too long.
    """
    return _Parser(expression, numbers).parse()


class _Parser:
    """Recursive descent over  expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := NUMBER | '(' expr ')'."""

    def __init__(self, text: str, numbers: list[int]) -> None:
        if len(text) > MAX_EXPRESSION_CHARS:
            raise InvalidExpression(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
        self.tokens = _tokenize(text)
        self.pos = 0
        self.depth = 0
        self.left = Counter(numbers)  # how many times each number may still be used

    def parse(self) -> Fraction:
        if not self.tokens:
            raise InvalidExpression("empty expression")
        value = self._expr()
        if self.pos != len(self.tokens):
            raise InvalidExpression(f"unexpected {self.tokens[self.pos]!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._term()
            value = _checked(value + rhs if op == "+" else value - rhs)
        return value

    def _term(self) -> Fraction:
        value = self._factor()
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._factor()
            if op == "/" and rhs == 0:
                raise InvalidExpression("division by zero")
            value = _checked(value * rhs if op == "*" else value / rhs)
        return value

    def _factor(self) -> Fraction:
        token = self._peek()
        if token is None:
            raise InvalidExpression("expression ends too early")
        self.pos += 1
        if token == "(":
            self.depth += 1
            if self.depth > MAX_PAREN_DEPTH:
                raise InvalidExpression("parentheses nested too deeply")
            value = self._expr()
            if self._peek() != ")":
                raise InvalidExpression("unbalanced parentheses")
            self.pos += 1
            self.depth -= 1
            return value
        if not token.isdecimal():
            raise InvalidExpression(f"unexpected {token!r}")
        number = int(token)
        if self.left[number] <= 0:
            given = number in self.left
            raise InvalidExpression(
                f"number {number} used too often" if given else f"number {number} not given"
            )
        self.left[number] -= 1
        return Fraction(number)


def _tokenize(text: str) -> list[str]:
    """Return the tokens of `text`: ASCII numbers, operators (x, × and ÷ accepted) and parentheses."""
    tokens: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in " \t":
            i += 1
        elif "0" <= ch <= "9":
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j - i > 12:
                raise InvalidExpression("number too long")
            tokens.append(text[i:j])
            i = j
        elif ch in _OPERATORS:
            tokens.append(_OPERATORS[ch])
            i += 1
        elif ch in "()":
            tokens.append(ch)
            i += 1
        else:
            raise InvalidExpression(f"bad character {clip(ch)} at position {i}")
    return tokens


def _checked(value: Fraction) -> Fraction:
    if abs(value) > MAX_MAGNITUDE:
        raise InvalidExpression("intermediate value beyond 1e12")
    return value
