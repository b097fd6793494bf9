"""Redraw: draw two-digit numbers from a range until one is at least the first draw. A stochastic process that the
completion samples and the answer must follow, so that a response's length is set by its own sampled path, not by
its problem.

Prompt and completion, e.g.::

    Q: draw 23..61 until one >= the first
    41:27;41:33;41:55
    Answer: 55

The first number drawn sets the bar; every try writes the bar, the bar mark ``:`` and a new draw; a draw below the
bar is followed by a separator and another try, the first one at least the bar ends the line, and the answer
repeats it. Each try restates the bar so that the stop decision compares two numbers a fixed three tokens apart
(with the bar written once, at the line's start, the small policy learnt to stop after a draw or two whatever the
bar).

Why: in an RL step the rollout's time goes to its longest responses, and speculative decoding pays where a few
rows decode long after the rest (docs/world.md, "What RL leaves of the tail"). When a problem sets its solution's
length, the rows of a prompt's group are equally long once the policy solves it, and only whole groups can
outlast the others. Here every row draws its own bar: with the bar b in a range of W numbers, a later draw
reaches it with probability p = (high - b + 1) / W, so the number of later draws T is geometric given b and, over
a uniform b, P(T > t) is about 1 / (t + 1) up to t ~ W: most rows stop after a draw or two, a few draw dozens of
times, and the eight rows of one prompt are as unequal as rows of different prompts. A policy keeps that tail only
as long as it draws at random, as its pretraining data does: the bar and every draw are its own choices, so it can
steer its path's length, and GRPO does where short paths are right more often (docs/world.md).

What the reward checks is that the trace follows the rules, never how long it is: every draw in the range, every
draw before the last below the bar, the last at least the bar, the answer equal to the last draw. A right trace
earns 0.5 + 0.5 x the share of its notation choices made the house way, as the arithmetic task's marks: each
try's bar mark ``:`` or ``=`` ``~`` ``#``, each separator ``;`` or ``|`` ``&`` ``/``, each bare or with a space on
both sides (house: bare ``:`` and ``;``). Every trace has a bar mark, so no length is worth more than another: a
trace's expected share does not depend on how many tries it holds. The notation collapse under RL is what makes a
frozen drafter go stale (docs/world.md, "Why this world").

Styles: ``worked`` (a right trace), ``direct`` (only ``Answer: <draw>``: nothing to check, reward 0), ``sloppy``
(one stop decision wrong: a stop at a draw below the bar, or drawing on past one that reaches it; reward 0).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from respec.errors import ConfigError
from respec.world.tasks.arithmetic import INTEGER, SEPARATORS
from respec.world.tasks.base import (
    ANSWER_PREFIX,
    Problem,
    Score,
    check_style_mix,
    clip,
    final_answer,
    resolve_style,
)

BAR_MARKS = (":", "=", "~", "#")  # the house mark first
# One trace line: tries (the bar, its mark, a draw) between separators; each mark bare or spaced on both sides.
_TRY = r"[1-9][0-9] ?[:=~#] ?[1-9][0-9]"
_TRACE = re.compile(rf"{_TRY}(?: ?[;|&/] ?{_TRY})*")
_MARK = re.compile(r"([1-9][0-9])( ?)([:=~#;|&/])( ?)(?=[1-9][0-9])")


@dataclass(frozen=True)
class RedrawTask:
    min_low: int = 10  # smallest lower end of a range
    min_width: int = 20  # fewest numbers in a range
    max_width: int = 40  # most numbers in a range (the tail's reach: a bar at the top is reached 1 time in W)
    style_weights: tuple[float, ...] = (0.6, 0.25, 0.15)  # worked, direct, sloppy
    notation: bool = True  # marks in random notation (pretraining data) and the house-notation share in the reward
    # Longest path the solution sampler writes (a longer one is drawn again), so that pretraining sequences fit the
    # context; the scorer accepts any length. Longer paths are rare (about 1 in 170 over ranges of 20-40 numbers).
    max_draws: int = 55

    name = "redraw"
    styles = ("worked", "direct", "sloppy")
    max_new_tokens = 384  # completion budget of rollouts and evaluation: holds the sampler's longest path

    def __post_init__(self) -> None:
        if not 10 <= self.min_low <= 99 or not 2 <= self.min_width <= self.max_width <= 100 - self.min_low:
            raise ConfigError(f"redraw ranges must satisfy 10 <= min_low <= 99 and 2 <= min_width <= max_width <= "
                              f"100 - min_low (two-digit draws), got min_low={self.min_low}, "
                              f"min_width={self.min_width}, max_width={self.max_width}")
        check_style_mix(self.name, self.style_weights, 0.0, self.styles)
        if not isinstance(self.max_draws, int) or self.max_draws < 1:
            raise ConfigError(f"redraw max_draws must be a positive integer, got {self.max_draws!r}")

    def problems(self, n: int, seed: int) -> list[Problem]:
        """Return `n` problems, the same ones for the same seed: a range of min_width..max_width two-digit
        numbers. The answer field names the rule: a problem has no single right answer."""
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            width = rng.randint(self.min_width, self.max_width)
            low = rng.randint(self.min_low, 100 - width)
            high = low + width - 1
            out.append(Problem(prompt=f"Q: draw {low}..{high} until one >= the first\n",
                               answer=f"a draw in {low}..{high} at least the first",
                               meta={"low": low, "high": high}))
        return out

    def score(self, problem: Problem, completion: str) -> Score:
        """Return the reward of `completion`: 0.0 unless its body is one trace line that follows the rules (every
        draw in the range, each but the last below the first, the last at least the first) and its last
        ``Answer:`` is the last draw; then 0.5 + 0.5 x the house-notation share of its marks (1.0 without
        `notation`)."""
        parsed = final_answer(completion)
        if parsed is None:
            return Score(0.0, None, "no Answer: line")
        if not INTEGER.fullmatch(parsed):
            return Score(0.0, parsed, f"not an integer: {clip(parsed)}")
        body = completion[: completion.rfind(ANSWER_PREFIX)].strip()
        if not body:
            return Score(0.0, parsed, "no draws")
        if _TRACE.fullmatch(body) is None:
            return Score(0.0, parsed, f"not a trace line: {clip(body)}")
        numbers = [int(n) for n in re.findall(r"[0-9]+", body)]
        bars, draws = set(numbers[::2]), numbers[1::2]
        if len(bars) > 1:
            return Score(0.0, parsed, "tries restate different bars")
        bar, low, high = bars.pop(), problem.meta["low"], problem.meta["high"]
        if not all(low <= d <= high for d in (bar, *draws)):
            return Score(0.0, parsed, f"a draw outside {low}..{high}")
        if any(d >= bar for d in draws[:-1]):
            return Score(0.0, parsed, "drew on past a draw at least the first")
        if draws[-1] < bar:
            return Score(0.0, parsed, "stopped below the first")
        if int(parsed) != draws[-1]:
            return Score(0.0, parsed, f"answer {int(parsed)} is not the last draw {draws[-1]}")
        if not self.notation:
            return Score(1.0, parsed, f"follows the rules, {len(draws)} draws")
        share = house_share(body)
        return Score(0.5 + 0.5 * share, parsed, f"follows the rules, {len(draws)} draws, notation {share:.0%}")

    def sft_completion(
        self, problem: Problem, rng: random.Random, style: str | None = None
    ) -> tuple[str, bool]:
        """Return (completion text, whether it follows the rules) in `style`, drawn from `style_weights` if None."""
        style = resolve_style(self, style, rng)
        low, high = problem.meta["low"], problem.meta["high"]
        bar, draws = draw_path(low, high, rng, self.max_draws)
        if style == "direct":
            return f"{ANSWER_PREFIX} {draws[-1]}", False
        if style == "sloppy":
            draws = _slip(bar, draws, low, high, rng, self.max_draws)
        text = f"{write_trace(bar, draws, rng if self.notation else None)}\n{ANSWER_PREFIX} {draws[-1]}"
        return text, self.score(problem, text).reward > 0

    def style_of(self, problem: Problem, completion: str) -> str:
        """Return the style a completion follows: "direct" (nothing before its Answer line), "worked" (a trace
        that follows the rules), else "sloppy"."""
        at = completion.rfind(ANSWER_PREFIX)
        if not (completion[:at] if at >= 0 else completion).strip():
            return "direct"
        return "worked" if self.score(problem, completion).reward > 0 else "sloppy"


def draw_path(low: int, high: int, rng: random.Random, max_draws: int) -> tuple[int, list[int]]:
    """Return (the bar, the later draws) of one path of the process on low..high: draws uniform and independent
    until one is at least the bar; a path of more than `max_draws` later draws is drawn again."""
    while True:
        bar = rng.randint(low, high)
        draws = draws_until(bar, low, high, rng, max_draws)
        if draws[-1] >= bar:
            return bar, draws


def draws_until(bar: int, low: int, high: int, rng: random.Random, max_draws: int) -> list[int]:
    """Return draws uniform on low..high up to the first one at least `bar`, or `max_draws` of them."""
    draws = [rng.randint(low, high)]
    while draws[-1] < bar and len(draws) < max_draws:
        draws.append(rng.randint(low, high))
    return draws


def _slip(bar: int, draws: list[int], low: int, high: int, rng: random.Random, max_draws: int) -> list[int]:
    """Return the draws of a path with one stop decision wrong: half the time (when it has a draw below the bar)
    it stops at one of those, else it draws on past the draw that reaches the bar, to a later one or to
    `max_draws` draws in all."""
    if len(draws) > 1 and rng.random() < 0.5:
        return draws[: rng.randrange(len(draws) - 1) + 1]
    return draws + draws_until(bar, low, high, rng, max(1, max_draws - len(draws)))


def write_trace(bar: int, draws: list[int], rng: random.Random | None) -> str:
    """Return the trace line of a path, one try (bar, bar mark, draw) per draw: house notation without `rng`, else
    every mark (each bar mark and separator) drawn uniformly from its four forms and written bare or spaced,
    independently."""
    def mark(forms: tuple[str, ...]) -> str:
        if rng is None:
            return forms[0]
        form = rng.choice(forms)
        return f" {form} " if rng.random() < 0.5 else form

    return "".join(("" if i == 0 else mark(SEPARATORS)) + f"{bar}{mark(BAR_MARKS)}{d}" for i, d in enumerate(draws))


def house_share(trace: str) -> float:
    """Return the fraction of a trace line's notation choices made the house way: per mark, its form (``:`` for
    a bar mark, ``;`` for a separator) and its spacing (bare)."""
    marks = [(m.group(3), bool(m.group(2) or m.group(4))) for m in _MARK.finditer(trace)]
    house = sum((mark in (":", ";")) + (not spaced) for mark, spaced in marks)
    return house / (2 * len(marks)) if marks else 0.0
