"""Chain sums: add a list of 2-3 digit numbers pair by pair, each pair worked column by column as the arithmetic
task's addition, with a heavy-tailed number of operands so that a few worked solutions are many times longer
than most.

Prompt and completion, e.g.::

    Q: 47+385+12+906=?
    47+385: 7+5=12;4+8+1=13;0+3+1=4
    432+12: 2+2=4;3+1=4;4+0=4
    444+906: 4+6=10;4+0+1=5;4+9=13
    Answer: 1350

Each line restates one pair: the running sum (the value the previous line's steps reach, read off as the
arithmetic task's answer is) and the next operand, copied from the prompt (an induction copy: find the previous
operand there, take the number after it). The steps are the arithmetic task's worked addition (`worked_add`).

Why the tail: in an RL step the rollout's time goes to its longest responses (a few rows decode long after the
rest have finished, at a live batch of a few rows), which is where speculative decoding pays most. The operand
count n is drawn with P(n) proportional to n^-`alpha` on `min_operands`..`max_operands`, so most problems are one
or two pairs and a few percent are eight or more, each pair adding one line of about the same length.

Styles (the arithmetic task's four, so that RL moves a mixture): ``worked`` (always right), ``direct`` (only
``Answer: <value>``, right with probability `direct_accuracy`), ``sloppy`` (one pair drops a carry and every later
line follows the slip, so the answer is wrong), ``checked`` (a line restating the problem in words, then
``worked``). Every mark of the working is written in a random notation per mark (`write_marks`), and the reward of
a right answer is 0.5 + 0.5 x the house-notation share of its marks, exactly as in the arithmetic task: the
notation collapse under RL is what makes a frozen drafter go stale (docs/world.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from respec.errors import ConfigError
from respec.world.tasks.arithmetic import (
    house_notation,
    house_share,
    integer_answer,
    styled_completion,
    worked_add,
)
from respec.world.tasks.base import (
    ANSWER_PREFIX,
    Problem,
    Score,
    check_style_mix,
    resolve_style,
)


@dataclass(frozen=True)
class ChainSumTask:
    min_operands: int = 2  # fewest numbers to add (1: some problems are one number, answered without working)
    max_operands: int = 10  # most numbers to add (the tail's end)
    alpha: float = 2.5  # P(n operands) proportional to n^-alpha: larger = a thinner tail
    min_digits: int = 2  # fewest digits of an operand
    max_digits: int = 3  # most digits of an operand
    style_weights: tuple[float, ...] = (0.5, 0.25, 0.15, 0.1)  # worked, direct, sloppy, checked
    direct_accuracy: float = 0.4  # chance that a "direct" completion is right
    notation: bool = True  # marks in random notation (pretraining data) and the house-notation share in the reward
    # A right answer to a sum of two or more numbers with nothing before its Answer line earns 0, as a wrong one:
    # the working is needed, so RL cannot shorten a long problem's answer by guessing its value.
    work_needed: bool = False

    name = "chainsum"
    styles = ("worked", "direct", "sloppy", "checked")
    max_new_tokens = 384  # completion budget of rollouts and evaluation: holds the longest worked solution (9 pairs)

    def __post_init__(self) -> None:
        if not 1 <= self.min_operands <= self.max_operands <= 64:
            raise ConfigError(f"chainsum operands must satisfy 1 <= min_operands <= max_operands <= 64, got "
                              f"min_operands={self.min_operands}, max_operands={self.max_operands}")
        if not 1 <= self.min_digits <= self.max_digits <= 18:
            raise ConfigError(f"chainsum digits must satisfy 1 <= min_digits <= max_digits <= 18, got "
                              f"min_digits={self.min_digits}, max_digits={self.max_digits}")
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 20:
            raise ConfigError(f"chainsum alpha must be a number in [0, 20], got {self.alpha!r}")
        check_style_mix("chainsum", self.style_weights, self.direct_accuracy, self.styles)

    def operand_weights(self) -> dict[int, float]:
        """Return {operand count: probability} of the problems this task draws."""
        counts = range(self.min_operands, self.max_operands + 1)
        weights = [n ** -self.alpha for n in counts]
        return {n: w / sum(weights) for n, w in zip(counts, weights, strict=True)}

    def problems(self, n: int, seed: int) -> list[Problem]:
        """Return `n` problems, the same ones for the same seed."""
        rng = random.Random(seed)
        dist = self.operand_weights()
        counts, weights = list(dist), list(dist.values())
        out = []
        for _ in range(n):
            operands = [self._operand(rng) for _ in range(rng.choices(counts, weights=weights, k=1)[0])]
            out.append(Problem(prompt=f"Q: {'+'.join(map(str, operands))}=?\n", answer=str(sum(operands)),
                               meta={"operands": operands}))
        return out

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)

    def score(self, problem: Problem, completion: str) -> Score:
        """Return the reward of `completion`: 0.0 unless the last ``Answer:`` is the right integer; then 0.5 + 0.5 x
        the house-notation share of the marks before it (1.0 without `notation`, and for a one-number problem,
        which has nothing to work); with `work_needed`, 0.0 for a right answer to a longer sum without working."""
        parsed, wrong = integer_answer(problem, completion)
        if wrong is not None:
            return wrong
        body = completion[: completion.rfind(ANSWER_PREFIX)]
        if self.work_needed and len(problem.meta["operands"]) > 1 and not body.strip():
            return Score(0.0, parsed, "right value without working")
        if not self.notation or len(problem.meta["operands"]) == 1:  # one number: nothing to work, no marks due
            return Score(1.0, parsed, "correct")
        share = house_share(body)
        return Score(0.5 + 0.5 * share, parsed, f"correct, notation {share:.0%}")

    def sft_completion(
        self, problem: Problem, rng: random.Random, style: str | None = None
    ) -> tuple[str, bool]:
        """Return (completion text, whether its answer is right) in `style`, drawn from `style_weights` if None."""
        operands = problem.meta["operands"]
        return styled_completion(self, problem, resolve_style(self, style, rng), rng,
                                 lambda slip: worked_chain(operands, slip), lambda: check_line(operands))

    def style_of(self, problem: Problem, completion: str) -> str:
        """Return the style a completion follows: "direct" (no steps), "checked" (the check line, the correct
        lines and the right answer), "worked" (the correct lines and answer), else "sloppy"."""
        at = completion.rfind(ANSWER_PREFIX)
        steps = house_notation((completion[:at] if at >= 0 else completion).strip())
        if not steps:
            return "direct"
        if self.score(problem, completion).reward == 0:
            return "sloppy"
        operands = problem.meta["operands"]
        correct, _ = worked_chain(operands, None)
        if steps == f"{check_line(operands)}\n{correct}":
            return "checked"
        return "worked" if steps == correct else "sloppy"


def worked_chain(operands: list[int], slip: random.Random | None) -> tuple[str, int]:
    """Return (one line per pair in house notation, the value the last line reaches); with `slip`, one pair that
    carries (chosen with it) drops one carry, and every later line adds to the wrong running sum."""
    slip_at = None
    if slip is not None:
        running, carrying = operands[0], []
        for i, b in enumerate(operands[1:]):
            if worked_add(running, b, random.Random(0))[1] != running + b:  # a carry to drop
                carrying.append(i)
            running += b
        slip_at = slip.choice(carrying) if carrying else None
    lines, running = [], operands[0]
    for i, b in enumerate(operands[1:]):
        steps, total = worked_add(running, b, slip if i == slip_at else None)
        lines.append(f"{running}+{b}: {steps}")
        running = total
    return "\n".join(lines), running


def check_line(operands: list[int]) -> str:
    """Return the line that opens a "checked" solution: the problem in words and the method."""
    return f"Check: {' plus '.join(map(str, operands))}, pair by pair, carrying where needed."
