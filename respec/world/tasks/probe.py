"""Probe: call a tool that draws a random two-digit number until a draw reaches a bar. A multi-turn task whose
length is set by an environment's outcomes, which the policy cannot steer.

Prompt and transcript, e.g. (policy turns end with eos; the lines ``#4821 41/73``, ``66/73`` and ``88/73`` are the environment's
observations, appended by it, never sampled)::

    Q: draw until one >= 73
    draw                      policy: a tool call
    #4821 41/73               environment: the row's nonce, the first draw and the bar it was drawn for
    41<73 draw                policy: the draw against the bar, and another call
    66/73                     environment: the next draw (and the bar)
    66<73 draw
    88/73
    88>=73                    policy: the draw reaches the bar, so it stops
    Answer: 88                the last draw

A draw reaches the bar B with probability p = (100 - B) / 90, so the number of calls is geometric given B; the
bars are drawn from `min_bar`..`max_bar`, so some prompts have a small p: the eight rows of one prompt are as
unequal as a geometric law makes them, whatever the policy does. This is the randomness that survives RL (in
`redraw` the draws were the policy's own and GRPO learnt to shorten them: docs/world.md).

Faking is detectable: the first observation is the row's nonce (`nonce(seed, row)`, reproducible from the
rollout's seed and row) and every draw is a hash of (prompt, nonce, turn), so the scorer recomputes each
observation from the text alone; a policy that writes observations instead of calling the tool scores 0 unless
it guesses the hash (1 in 90 per draw).

A transcript that follows the protocol (a call first, every comparison line restating the last draw and the bar
with the right relation, a call after each draw below the bar, a stop at the first draw that reaches it, the answer
the last draw) earns 0.5 + 0.5 x the share of its notation choices made the house way, as the arithmetic task's
marks; any other 0.0. The notation choices are the policy's own, each made independently: the word of each call
(`CALLS`: ``draw`` ``roll`` ``pick`` ``next``), the mark of each relation (`BELOW`: ``<`` ``lt`` ``below``
``under``; `REACHED`: ``>=`` ``ge`` ``hits`` ``reaches``), each relation bare or with a space on both sides, and
the separator before each call (`SEPARATORS`: `` `` ``;`` ``|`` ``&``); the house way is the first of each, bare
(``41<73 draw``; ``41 lt 73;roll`` makes one of its four choices the house way). Pretraining transcripts draw
every choice uniformly, so a drafter distilled from the pretrained policy spreads its guesses over them, and GRPO
moves the policy to the house notation: the text the frozen drafter was trained on goes out of date while the
environment still sets the lengths. With ``notation=False`` transcripts are written the house way and a right one
earns 1.0. Styles: ``worked`` (right), ``direct`` (only ``Answer: <the bar>``, no call), ``sloppy`` (one wrong stop
decision: stopping below the bar or calling again past it).
"""

from __future__ import annotations

import hashlib
import random
import re
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

CALLS = ("draw", "roll", "pick", "next")  # the tool call's words, the house one first: a policy turn that ends with
# one (then eos) asks the environment for a draw
CALL = CALLS[0]
# The first observation: nonce, draw and bar; every later one: draw and bar. The bar is echoed so that every number
# the policy writes is copied from a few tokens back (a small policy copied the prompt's bar badly).
_FIRST = re.compile(r"\n#([0-9]{4}) ([1-9][0-9])/([1-9][0-9])\n")
_LATER = re.compile(r"\n([1-9][0-9])/([1-9][0-9])\n")
OBSERVATION = re.compile(rf"{_FIRST.pattern}|{_LATER.pattern}")
SEPARATORS = (" ", ";", "|", "&")  # before a call; the house form first
BELOW = ("<", "lt", "below", "under")  # a draw below the bar; the house mark first
REACHED = (">=", "ge", "hits", "reaches")  # a draw that reaches the bar; the house mark first


def _either(words: tuple[str, ...]) -> str:
    return "(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


# A relation is written bare or with one space on both sides (the group after the mark repeats the spacing).
_BELOW = re.compile(rf"([1-9][0-9])( ?){_either(BELOW)}\2([1-9][0-9]){_either(SEPARATORS)}{_either(CALLS)}")
_REACHED = re.compile(rf"([1-9][0-9])( ?){_either(REACHED)}\2([1-9][0-9])\nAnswer: ([0-9]+)")


@dataclass(frozen=True)
class ProbeTask:
    min_bar: int = 10  # lowest bar (a draw reaches it with probability (100 - bar) / 90; 10: always)
    max_bar: int = 96  # highest bar (the tail's reach: 90 / (100 - max_bar) calls in expectation)
    style_weights: tuple[float, ...] = (0.7, 0.15, 0.15)  # worked, direct, sloppy
    notation: bool = True  # choices in random notation (pretraining data) and the house-notation share in the reward
    # Most draws the solution sampler writes (a longer path is drawn again), so that pretraining sequences fit the
    # context; the environment and the scorer accept any number.
    max_draws: int = 24

    name = "probe"
    text_format = 3  # bump when the texts change (a policy's cache key names it): 2 = spacing and separators, 3 =
    # call words and relation marks too
    styles = ("worked", "direct", "sloppy")
    max_new_tokens = 512  # a row's budget, policy and observation tokens together

    def __post_init__(self) -> None:
        if not 10 <= self.min_bar <= self.max_bar <= 99:
            raise ConfigError(f"probe bars must satisfy 10 <= min_bar <= max_bar <= 99 (two-digit draws), got "
                              f"min_bar={self.min_bar}, max_bar={self.max_bar}")
        check_style_mix(self.name, self.style_weights, 0.0, self.styles)
        if not isinstance(self.max_draws, int) or self.max_draws < 1:
            raise ConfigError(f"probe max_draws must be a positive integer, got {self.max_draws!r}")

    def problems(self, n: int, seed: int) -> list[Problem]:
        """Return `n` problems, the same ones for the same seed: a bar uniform on min_bar..max_bar. The answer
        field names the rule: the number of draws depends on the environment."""
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            bar = rng.randint(self.min_bar, self.max_bar)
            out.append(Problem(prompt=f"Q: draw until one >= {bar}\n", answer=f"the draws until one >= {bar}",
                               meta={"bar": bar}))
        return out

    # -- the environment -------------------------------------------------------------------------------------------
    @staticmethod
    def nonce(seed: int, row: int) -> int:
        """Return the four-digit nonce of rollout row `row` under `seed`: the environment's per-row randomness."""
        return _hash(f"nonce|{seed}|{row}") % 10_000

    @staticmethod
    def draw(problem: Problem, nonce: int, turn: int) -> int:
        """Return the environment's draw at `turn` (0-based) of the row with `nonce`: two digits, 10..99."""
        return 10 + _hash(f"{problem.prompt}|{nonce:04d}|{turn}") % 90

    def draws(self, problem: Problem, nonce: int, max_draws: int | None = None) -> list[int]:
        """Return the environment's draws for the row with `nonce` up to the first that reaches the bar (or
        `max_draws` of them)."""
        bar, out = problem.meta["bar"], [self.draw(problem, nonce, 0)]
        while out[-1] < bar and (max_draws is None or len(out) < max_draws):
            out.append(self.draw(problem, nonce, len(out)))
        return out

    def env_step(self, problem: Problem, transcript: str, nonce: int) -> str | None:
        """Return the observation that answers `transcript` (the completion so far, observations included), or None
        when its last policy turn is not a tool call (the row ends)."""
        if not transcript.endswith(CALLS):
            return None
        turn = len(OBSERVATION.findall(transcript))
        return observation(nonce, turn, self.draw(problem, nonce, turn), problem.meta["bar"])

    @staticmethod
    def segments(transcript: str) -> list[tuple[str, bool]]:
        """Return the transcript cut into (text, is_observation) pieces, in order; the policy's pieces between
        observations are its turns (each ended by eos when generated)."""
        out, at = [], 0
        for m in OBSERVATION.finditer(transcript):
            if m.start() > at:
                out.append((transcript[at:m.start()], False))
            out.append((m.group(0), True))
            at = m.end()
        if at < len(transcript):
            out.append((transcript[at:], False))
        return out

    # -- scoring ---------------------------------------------------------------------------------------------------
    def score(self, problem: Problem, completion: str) -> Score:
        """Return 0.5 + 0.5 x the house-notation share of its choices (1.0 without `notation`) if `completion`
        follows the protocol with every observation the environment's (recomputed from its nonce), else 0.0 with
        the first fault as the reason."""
        parsed = final_answer(completion)
        if parsed is None:
            return Score(0.0, None, "no Answer: line")
        bar = problem.meta["bar"]
        pieces = self.segments(completion)
        if not pieces or pieces[0][1] or pieces[0][0] not in CALLS:
            return Score(0.0, parsed, "no tool call first")
        turns = pieces[1:]
        if len(turns) % 2 or any(obs != (i % 2 == 0) for i, (_, obs) in enumerate(turns)):
            return Score(0.0, parsed, "turns out of order")
        first = _FIRST.fullmatch(turns[0][0])
        if first is None:
            return Score(0.0, parsed, "first observation without a nonce")
        nonce = int(first.group(1))
        draws = []
        for t, (text, _) in enumerate(turns[::2]):
            m = (_FIRST if t == 0 else _LATER).fullmatch(text)
            if m is None or (int(m.groups()[-2]), int(m.groups()[-1])) != (self.draw(problem, nonce, t), bar):
                return Score(0.0, parsed, f"observation {t + 1} is not the environment's")
            draws.append(int(m.groups()[-2]))
        lines = [text for text, _ in turns[1::2]]
        house = [pieces[0][0] == CALL]  # per notation choice: made the house way
        for d, line in zip(draws[:-1], lines[:-1], strict=True):
            m = _BELOW.fullmatch(line)
            if m is None or (int(m.group(1)), int(m.group(4))) != (d, bar) or d >= bar:
                return Score(0.0, parsed, f"wrong call line {clip(line)}")
            house += [not m.group(2), m.group(3) == BELOW[0], m.group(5) == SEPARATORS[0], m.group(6) == CALL]
        m = _REACHED.fullmatch(lines[-1])
        if m is None or (int(m.group(1)), int(m.group(4))) != (draws[-1], bar) or draws[-1] < bar:
            return Score(0.0, parsed, f"wrong stop line {clip(lines[-1])}")
        if int(m.group(5)) != draws[-1]:
            return Score(0.0, parsed, f"answer {m.group(5)} is not the last draw {draws[-1]}")
        house += [not m.group(2), m.group(3) == REACHED[0]]
        if not self.notation:
            return Score(1.0, parsed, f"follows the protocol, {len(draws)} draws")
        share = sum(house) / len(house)
        return Score(0.5 + 0.5 * share, parsed, f"follows the protocol, {len(draws)} draws, notation {share:.0%}")

    # -- training data ---------------------------------------------------------------------------------------------
    def sft_completion(self, problem: Problem, rng: random.Random, style: str | None = None) -> tuple[str, bool]:
        """Return (a whole transcript, observations included, whether it follows the protocol) in `style`, drawn
        from `style_weights` if None; its nonce is drawn from `rng`."""
        style = resolve_style(self, style, rng)
        if style == "direct":
            return f"{ANSWER_PREFIX} {problem.meta['bar']}", False
        bar = problem.meta["bar"]
        while True:
            nonce = rng.randrange(10_000)
            draws = self.draws(problem, nonce, self.max_draws)
            if draws[-1] >= bar:
                break
        stop = len(draws)  # draws before the stop line
        if style == "sloppy":
            below = [i for i, d in enumerate(draws[:-1]) if d < bar]
            if below and rng.random() < 0.5:
                stop = rng.choice(below) + 1  # stops at a draw below the bar
            else:
                stop = len(draws) + 1  # calls again past the draw that reached it
                draws.append(self.draw(problem, nonce, len(draws)))
        text = write_transcript(bar, nonce, draws[:stop], rng if self.notation else None)
        return text, self.score(problem, text).reward > 0

    def style_of(self, problem: Problem, completion: str) -> str:
        """Return "direct" (nothing before the Answer line), "worked" (a transcript that follows the protocol), else
        "sloppy"."""
        at = completion.rfind(ANSWER_PREFIX)
        if not (completion[:at] if at >= 0 else completion).strip():
            return "direct"
        return "worked" if self.score(problem, completion).reward > 0 else "sloppy"


def write_transcript(bar: int, nonce: int, draws: list[int], rng: random.Random | None = None) -> str:
    """Return the transcript of a row that drew `draws` and stopped after the last: a call after each draw but the
    last, then the stop line and the last draw (right when only the last reaches the bar). House notation without
    `rng`, else every choice (each call's word, each relation's mark and spacing, each separator) drawn uniformly,
    independently."""
    def pick(words: tuple[str, ...]) -> str:
        return words[0] if rng is None else rng.choice(words)

    def relation(marks: tuple[str, ...]) -> str:
        mark = pick(marks)
        return f" {mark} " if rng is not None and rng.random() < 0.5 else mark

    text = pick(CALLS)
    for t, d in enumerate(draws):
        text += observation(nonce, t, d, bar)
        if t + 1 < len(draws):
            text += f"{d}{relation(BELOW)}{bar}{pick(SEPARATORS)}{pick(CALLS)}"
    return text + f"{draws[-1]}{relation(REACHED)}{bar}\n{ANSWER_PREFIX} {draws[-1]}"


def observation(nonce: int, turn: int, draw: int, bar: int) -> str:
    """Return the environment's observation text at `turn`: the first names the row's nonce."""
    return f"\n#{nonce:04d} {draw}/{bar}\n" if turn == 0 else f"\n{draw}/{bar}\n"


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
