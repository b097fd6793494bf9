"""Question/answer data sets in JSON Lines (GSM8K, MATH style), scored with math-verify.

One JSON object per line with a question and an answer field. The reference answer is read
from the answer field: GSM8K's ``... #### 42`` gives ``42``, MATH's ``\\boxed{...}`` gives the
boxed content (balanced braces), anything else is used as it is. The prompt is
``Q: <question>\\n``, as for the synthetic tasks.

A completion's final answer is the text after its last ``Answer:``, else its last
``\\boxed{...}``, else what follows its last ``####``. It is compared with the reference by
`math_verify` (so ``0.5`` equals ``\\frac{1}{2}``); reward is 1.0 or 0.0.
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from math_verify import parse, verify

from respec.errors import DataError
from respec.world.tasks.base import Problem, Score, clip, final_answer


@dataclass(frozen=True)
class JsonlTask:
    path: str | Path  # the .jsonl file
    question_field: str = "question"
    answer_field: str = "answer"

    name = "jsonl"

    def problems(self, n: int, seed: int) -> list[Problem]:
        """Return min(n, size of the file) distinct problems in an order fixed by `seed`.

        Never repeats a problem: a caller that wants more draws again with another seed.
        """
        return random.Random(seed).sample(self.all_problems, min(n, len(self.all_problems)))

    @cached_property
    def all_problems(self) -> list[Problem]:
        """Return every problem of the file in file order; raises DataError naming the bad line."""
        path = Path(self.path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        problems = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            for field in (self.question_field, self.answer_field):
                if field not in record:
                    raise DataError(f"{path}:{number}: missing field {field!r}")
            question, answer = record[self.question_field], record[self.answer_field]
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"{path}:{number}: field {self.question_field!r} must be a non-empty string")
            if not isinstance(answer, str | int | float) or isinstance(answer, bool):
                raise DataError(f"{path}:{number}: field {self.answer_field!r} must be a string or a number")
            gold = reference_answer(str(answer))
            if not gold:
                raise DataError(f"{path}:{number}: field {self.answer_field!r} holds no answer")
            problems.append(Problem(prompt=f"Q: {question.strip()}\n", answer=gold, meta={"line": number}))
        if not problems:
            raise DataError(f"{path}: no problems (the file is empty)")
        return problems

    def score(self, problem: Problem, completion: str) -> Score:
        """Return reward 1.0 when the completion's final answer equals the reference under math-verify."""
        try:
            parsed = completion_answer(completion)
            if parsed is None:
                return Score(0.0, None, "no final answer (Answer:, \\boxed{} or ####)")
            if equivalent(problem.answer, parsed):
                return Score(1.0, parsed, "correct")
            return Score(0.0, parsed, f"{clip(parsed)} is not {clip(problem.answer)}")
        except Exception as e:  # the contract is "never raises"
            return Score(0.0, None, f"scorer error: {type(e).__name__}")


def last_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def reference_answer(answer: str) -> str:
    """Return the gold answer inside a GSM8K (``#### 42``) or MATH (``\\boxed{}``) solution, else `answer`."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer.strip()


def completion_answer(completion: str) -> str | None:
    """Return a completion's final answer: last ``Answer:`` line, else last ``\\boxed{}``, else after ``####``."""
    answer = final_answer(completion)
    if answer:
        boxed = last_boxed(answer)  # "Answer: \boxed{5}" is common
        return boxed if boxed is not None else answer
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if "####" in completion:
        return completion.rsplit("####", 1)[1].split("\n", 1)[0].strip() or None
    return None


def equivalent(gold: str, answer: str) -> bool:
    """Return whether `answer` equals `gold` for math-verify (numbers, fractions, LaTeX expressions)."""
    # math-verify's parse/verify time out with signal.alarm, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if len(answer) > 1000:
        return False
    parsed_gold = _parse(gold, timeout)
    parsed_answer = _parse(answer, timeout)
    if not parsed_gold or not parsed_answer:
        return gold.strip() == answer.strip()
    return verify(parsed_gold, parsed_answer, timeout_seconds=timeout)


def _parse(text: str, timeout: int | None) -> list:
    # Wrapped in $...$ so that bare LaTeX such as \frac{1}{2} is found; plain text as a fallback.
    return parse(f"${text}$", parsing_timeout=timeout) or parse(text, parsing_timeout=timeout)
