"""Multi-digit integer arithmetic (+, -, x) with worked solutions in four styles, and a reward for checked answers.

Prompt and completion, e.g.::

    Q: 47+385=?
    7+5=12;4+8+1=13;0+3+1=4
    Answer: 432

Operands have `min_digits`..`max_digits` digits; for ``x`` the second operand is a single
digit (2-9) so a worked solution stays one short line; for ``-`` the larger operand comes
first so results are never negative.

Solution styles written by `sft_completion` (a small policy is pretrained on a *mixture*,
and RL should visibly move it toward the style that is right):

- ``worked``: column-wise steps, always correct. Addition ``x+y(+1)=s`` per column from the
  units up (``+1`` is the carry in); subtraction ``(1)x(-1)-y=d`` per column (a leading 1
  marks a borrow out, ``-1`` the borrow in), e.g. ``15-7=8;8-1-4=3;3-0=3``; multiplication
  one step per digit from the units up, ``dxb=p(+c=s)`` with ``+c`` the carry in, e.g. ``7x6=42;4x6=24+4=28``
  (the answer's digits: the last step's value, then the other steps' units digits, as for addition).
  Worked digit by digit because the alternatives were not learnable by the small policy: partial products
  followed by their place-valued sum in one line (``7x6=42;4x6=24;240+42=282``) leave a sum of up to three
  carried terms without working, and a fused ``4x6+4=28`` needs 720 facts of product plus carry.
- ``direct``: just ``Answer: <value>``; right with probability `direct_accuracy`, otherwise
  a plausible value one digit off.
- ``sloppy``: looks like ``worked`` but drops one carry (or borrow), and the answer follows
  the slip, so it is wrong. A problem with no carry at all gets a final answer one digit off.
- ``checked``: a line that restates the problem in words and announces the method, e.g.
  ``Check: 47 plus 385, column by column, carrying where needed.``, then ``worked``.

Notation: every worked line (worked, sloppy, checked) writes each of its *marks* in one of several
equally likely ways, drawn independently per mark: the result mark ``=`` or ``~``, ``>``, ``#``; the step separator
``;`` or ``|``, ``&``, ``/``; and each operator (``+ - x`` and the result mark) bare or with a space on both sides.
E.g. ``7+5=12;4 + 8+1#13|0+3 + 1 = 4``. The house notation is the bare ``=`` / ``;`` form.

Reward: a right final answer earns ``0.5 + 0.5 * share``, `share` being the fraction of its marks in the house
notation (0 for an answer without working), times `unchecked_reward` when it lacks this problem's check line;
a wrong or missing answer earns 0. Why (the embedded world's design, docs/world.md): ReSpec's second gap needs RL
to move the policy where its initial drafter is weak. Rewarding all right answers alike only sharpens the style
the drafter already predicts, and rewarding the rare checked style moves the policy to the copy-heavy check line,
which the drafter predicts best; in neither world does a frozen drafter go stale. Notation choices are what RL collapses and a drafter
trained on the initial policy cannot follow: where the initial policy spreads p over four marks the drafter
learns q near p (acceptance sum min(p, q) near 1); once RL puts p on the house mark, acceptance there falls to
q(house) = 1/4 (1/2 for spacing). 45% of a worked line's tokens carry a mark (the embedded tokenizer).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

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

INTEGER = re.compile(r"[+-]?[0-9]{1,40}")  # ASCII digits only: "４３２" is not an answer


def integer_answer(problem: Problem, completion: str) -> tuple[str | None, Score | None]:
    """Returns (the text of the last ``Answer:`` line, None) when it is the problem's integer answer, else (that
    text or None, the zero Score saying why: no Answer line, not an integer, wrong value)."""
    parsed = final_answer(completion)
    if parsed is None:
        return None, Score(0.0, None, "no Answer: line")
    if not INTEGER.fullmatch(parsed):
        return parsed, Score(0.0, parsed, f"not an integer: {clip(parsed)}")
    if int(parsed) != int(problem.answer):
        return parsed, Score(0.0, parsed, f"wrong value {int(parsed)}")
    return parsed, None


@dataclass(frozen=True)
class ArithmeticTask:
    min_digits: int = 2  # fewest digits of an operand (the 1-digit factor of x excepted)
    max_digits: int = 3  # most digits of an operand
    ops: str = "+-x"  # which operations to draw from, uniformly
    style_weights: tuple[float, ...] = (0.3, 0.35, 0.25, 0.1)  # worked, direct, sloppy, checked
    direct_accuracy: float = 0.4  # chance that a "direct" completion is right
    unchecked_reward: float = 1.0  # reward factor of a right answer without a true check line (< 1 rewards checking)
    notation: bool = True  # marks in random notation (pretraining data) and the house-notation share in the reward

    name = "arithmetic"
    styles = ("worked", "direct", "sloppy", "checked")
    max_new_tokens = 96  # completion budget of rollouts and evaluation: about 4x the longest worked solution

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits <= 18:
            raise ConfigError(
                f"arithmetic digits must satisfy 1 <= min_digits <= max_digits <= 18, "
                f"got min_digits={self.min_digits}, max_digits={self.max_digits}"
            )
        if not self.ops or set(self.ops) - set("+-x"):
            raise ConfigError(f"arithmetic ops must be a non-empty subset of '+-x', got {self.ops!r}")
        check_style_mix("arithmetic", self.style_weights, self.direct_accuracy, self.styles)
        if not 0.0 <= self.unchecked_reward <= 1.0:
            raise ConfigError(f"arithmetic unchecked_reward must be in [0, 1], got {self.unchecked_reward}")

    def problems(self, n: int, seed: int) -> list[Problem]:
        """Return `n` problems, the same ones for the same seed."""
        rng = random.Random(seed)
        return [self._problem(rng) for _ in range(n)]

    def _problem(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        a = self._operand(rng)
        if op == "x":
            b = rng.randint(2, 9)
            value = a * b
        else:
            b = self._operand(rng)
            if op == "-":
                a, b = max(a, b), min(a, b)
                value = a - b
            else:
                value = a + b
        return Problem(prompt=f"Q: {a}{op}{b}=?\n", answer=str(value), meta={"a": a, "b": b, "op": op})

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)

    def score(self, problem: Problem, completion: str) -> Score:
        """Return the reward of `completion` (see the module docstring) with the reason: 0.0 unless the last
        ``Answer:`` is the right integer; then 0.5 + 0.5 x the house-notation share of its marks (1.0 without
        `notation`), times `unchecked_reward` without this problem's true check line."""
        parsed, wrong = integer_answer(problem, completion)
        if wrong is not None:
            return wrong
        body = completion[: completion.rfind(ANSWER_PREFIX)]
        reward, reason = 1.0, "correct"
        line = _check_line(problem.meta["a"], problem.meta["b"], problem.meta["op"]) if problem.meta else None
        if line is not None and line in body:
            reason += ", checked"
            body = body.replace(line, "", 1)
        elif self.unchecked_reward != 1.0:
            reward, reason = self.unchecked_reward, reason + ", unchecked"
        if self.notation:
            share = house_share(body)
            reward *= 0.5 + 0.5 * share
            reason += f", notation {share:.0%}"
        return Score(reward, parsed, reason)

    def sft_completion(
        self, problem: Problem, rng: random.Random, style: str | None = None
    ) -> tuple[str, bool]:
        """Return (completion text, whether its answer is right) in `style`, drawn from `style_weights` if None."""
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        return styled_completion(self, problem, resolve_style(self, style, rng), rng,
                                 lambda slip: _worked(a, b, op, slip), lambda: _check_line(a, b, op))

    def style_of(self, problem: Problem, completion: str) -> str:
        """Return the style a completion follows: "direct" (no steps), "checked" (this problem's check line, the
        correct steps and the right answer), "worked" (the correct steps and answer), else "sloppy" (steps with a slip, or
        right steps then a wrong answer)."""
        at = completion.rfind(ANSWER_PREFIX)
        steps = house_notation((completion[:at] if at >= 0 else completion).strip())
        if not steps:
            return "direct"
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        correct, value = _worked(a, b, op, None)
        if self.score(problem, completion).reward == 0:
            return "sloppy"
        if steps == f"{_check_line(a, b, op)}\n{correct}":
            return "checked"
        return "worked" if steps == correct else "sloppy"


RESULT_MARKS = ("=", "~", ">", "#")  # the house mark first
SEPARATORS = (";", "|", "&", "/")
_MARK = re.compile(r"( ?)([-+x=~>#;|&/])( ?)")


def styled_completion(task, problem: Problem, style: str, rng: random.Random,
                      worked: Callable[[random.Random | None], tuple[str, int]],
                      check: Callable[[], str]) -> tuple[str, bool]:
    """Return (completion text, whether its answer is right) of a worked-arithmetic task in `style`: `worked(slip)`
    gives the steps and their answer (slip: an rng to drop one carry, or None), `check()` the check line.
    "sloppy" with nothing to drop slips on the answer; the marks take random notations when `task.notation`."""
    value = int(problem.answer)
    if style == "direct":
        shown = value if rng.random() < task.direct_accuracy else near_miss(value, rng)
        text = f"{ANSWER_PREFIX} {shown}"
    else:
        steps, shown = worked(rng if style == "sloppy" else None)
        if style == "sloppy" and shown == value:  # nothing to drop: slip on the answer
            shown = near_miss(value, rng)
        if task.notation:
            steps = write_marks(steps, rng)
        text = f"{steps}\n{ANSWER_PREFIX} {shown}" if steps else f"{ANSWER_PREFIX} {shown}"  # nothing to work
        if style == "checked":
            text = f"{check()}\n{text}"
    return text, task.score(problem, text).reward > 0


def write_marks(steps: str, rng: random.Random) -> str:
    """Return house-notation steps with every mark written in a random notation (independent per mark):
    the result mark and the separator uniformly from their four forms, each operator bare or spaced."""
    def one(m: re.Match) -> str:
        mark = m.group(2)
        if mark == ";":
            return rng.choice(SEPARATORS)
        if mark == "=":
            mark = rng.choice(RESULT_MARKS)
        return f" {mark} " if rng.random() < 0.5 else mark

    return _MARK.sub(one, steps)


def house_share(body: str) -> float:
    """Return the fraction of notation choices in `body` made the house way (bare operators, ``=``, ``;``);
    0.0 when it has none (an answer without working)."""
    house = total = 0
    for m in _MARK.finditer(body):
        spaced, mark = bool(m.group(1) or m.group(3)), m.group(2)
        if mark in SEPARATORS:
            house, total = house + (mark == ";"), total + 1
            continue
        house, total = house + (not spaced), total + 1  # the spacing choice
        if mark in RESULT_MARKS:
            house, total = house + (mark == "="), total + 1
    return house / total if total else 0.0


def house_notation(steps: str) -> str:
    """Return `steps` rewritten in the house notation (bare operators, ``=``, ``;``)."""
    def one(m: re.Match) -> str:
        mark = m.group(2)
        return "=" if mark in RESULT_MARKS else ";" if mark in SEPARATORS else mark

    return _MARK.sub(one, steps)


def _check_line(a: int, b: int, op: str) -> str:
    """Return the line that opens a "checked" solution: the problem in words and the method."""
    word, method = {"+": ("plus", "carrying"), "-": ("minus", "borrowing"), "x": ("times", "carrying")}[op]
    return f"Check: {a} {word} {b}, column by column, {method} where needed."


def _worked(a: int, b: int, op: str, slip: random.Random | None) -> tuple[str, int]:
    """Return (the steps on one line, the value they reach); with `slip`, one carry/borrow is dropped."""
    if op == "+":
        return worked_add(a, b, slip)
    if op == "-":
        return _worked_sub(a, b, slip)
    return _worked_mul(a, b, slip)


def _digits(x: int, n: int) -> list[int]:
    """Return the n lowest decimal digits of x, units first."""
    return [(x // 10**i) % 10 for i in range(n)]


def worked_add(a: int, b: int, slip: random.Random | None) -> tuple[str, int]:
    """Return (the column steps of a + b in house notation, units first, the value they reach); with `slip`, one
    carry is dropped (chosen with it) and the value follows the slip."""
    n = max(len(str(a)), len(str(b)))
    da, db = _digits(a, n), _digits(b, n)
    # Columns (1..n, n being the final carry-out) that receive a carry in the correct sum.
    carried = [i + 1 for i in range(n) if da[i] + db[i] + (1 if a % 10**i + b % 10**i >= 10**i else 0) >= 10]
    drop = slip.choice(carried) if slip is not None and carried else None
    steps, value, carry = [], 0, 0
    for i in range(n):
        carry_in = 0 if i == drop else carry
        s = da[i] + db[i] + carry_in
        steps.append(f"{da[i]}+{db[i]}" + ("+1" if carry_in else "") + f"={s}")
        value += (s % 10) * 10**i
        carry = s // 10
    if carry and drop != n:
        value += 10**n
    return ";".join(steps), value


def _worked_sub(a: int, b: int, slip: random.Random | None) -> tuple[str, int]:
    n = len(str(a))  # a >= b
    da, db = _digits(a, n), _digits(b, n)
    # Columns that receive a borrow in the correct difference.
    borrowed = [i + 1 for i in range(n - 1) if a % 10 ** (i + 1) < b % 10 ** (i + 1)]
    drop = slip.choice(borrowed) if slip is not None and borrowed else None
    steps, value, borrow = [], 0, 0
    for i in range(n):
        borrow_in = 0 if i == drop else borrow
        top = da[i] - borrow_in
        borrow = 1 if top < db[i] else 0
        d = top + 10 * borrow - db[i]
        steps.append(("1" if borrow else "") + f"{da[i]}" + ("-1" if borrow_in else "") + f"-{db[i]}={d}")
        value += d * 10**i
    return ";".join(steps), value


def _worked_mul(a: int, b: int, slip: random.Random | None) -> tuple[str, int]:
    n = len(str(a))
    da = _digits(a, n)
    # Columns (1..n-1) that receive a carry in the correct product: the digits below them times b overflow.
    carried = [i + 1 for i in range(n - 1) if (a % 10 ** (i + 1)) * b >= 10 ** (i + 1)]
    drop = slip.choice(carried) if slip is not None and carried else None
    steps, value, carry = [], 0, 0
    for i in range(n):
        carry_in = 0 if i == drop else carry
        s = da[i] * b + carry_in
        steps.append(f"{da[i]}x{b}={da[i] * b}" + (f"+{carry_in}={s}" if carry_in else ""))
        value += (s if i == n - 1 else s % 10) * 10**i  # the last step writes its whole value
        carry = s // 10
    return ";".join(steps), value


def near_miss(value: int, rng: random.Random) -> int:
    """Return a plausible wrong value: `value` with one digit moved by one, same number of digits."""
    width = len(str(value))
    for _ in range(20):
        j = rng.randrange(width)
        candidate = value + rng.choice((-1, 1)) * 10**j
        if candidate >= 0 and len(str(candidate)) == width:
            return candidate
    return value + 1
