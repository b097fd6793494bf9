"""Question/answer data sets in JSON Lines or Parquet (GSM8K, MATH style), scored with math-verify.

One JSON object per line with a question and an answer field. A ``.parquet`` file (read with
pyarrow, ``pip install 'respec[parquet]'``) holds the same two columns, or is in verl's layout
(``examples/data_preprocess/gsm8k.py``): the question is ``extra_info.question``, else the last
user message of ``prompt``, and the answer is ``reward_model.ground_truth``. Errors name the line
(``PATH:3``) or the row, counted from 1 (``PATH row 3``). The reference answer is read
from the answer field: GSM8K's ``... #### 42`` gives ``42``, MATH's ``\\boxed{...}`` gives the
boxed content (balanced braces), anything else is used as it is. The prompt is
``Q: <question>\\n``, as for the synthetic tasks.

A completion's final answer is the text after its last ``Answer:``, else its last
``\\boxed{...}``, else what follows its last ``####``. It is compared with the reference by
`math_verify` (so ``0.5`` equals ``\\frac{1}{2}``); reward is 1.0 or 0.0.
"""

from __future__ import annotations

import json
import os
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
    path: str | Path  # the .jsonl or .parquet file (chosen by suffix)
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
        """Return every problem of the file in file order; raises DataError naming the bad line (or row)."""
        path = Path(self.path)
        fields = (self.question_field, self.answer_field)
        problems = []
        if path.suffix == ".parquet":
            for number, row in enumerate(_parquet_rows(path, fields), start=1):
                record, question_field, answer_field = row, *fields
                # verl's layout: the answer sits in reward_model, the question in extra_info or the chat prompt.
                if "reward_model" in row or ("prompt" in row and self.question_field not in row):
                    record, question_field, answer_field = _verl_record(row)
                where = f"{path} row {number}"
                problems.append(row_problem(record, question_field, answer_field, where, {"row": number}))
        else:
            for number, record in read_jsonl(path):
                problems.append(row_problem(record, *fields, f"{path}:{number}", {"line": number}))
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


def row_problem(record: dict, question_field: str, answer_field: str, where: str, meta: dict) -> Problem:
    """Return the Problem of one record; raises DataError led by `where` (``PATH:3``, ``PATH row 3``)."""
    for field in (question_field, answer_field):
        if field not in record:
            raise DataError(f"{where}: missing field {field!r}")
    question, answer = record[question_field], record[answer_field]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field {question_field!r} must be a non-empty string")
    if not isinstance(answer, str | int | float) or isinstance(answer, bool):
        raise DataError(f"{where}: field {answer_field!r} must be a string or a number")
    gold = reference_answer(str(answer))
    if not gold:
        raise DataError(f"{where}: field {answer_field!r} holds no answer")
    return Problem(prompt=f"Q: {question.strip()}\n", answer=gold, meta=meta)


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Return (line number, parsed JSON object) for each non-blank line of a .jsonl file: the one reader of data
    sets and metrics logs alike. A missing, unreadable or malformed file is a one-line DataError naming the file
    and, for a bad line, its number (``PATH:3: invalid JSON (...)``)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def _parquet_rows(path: Path, fields: tuple[str, str]) -> list[dict]:
    """Return the rows of a .parquet file as dicts: the columns a problem can come from, nulls left out."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'respec[parquet]'") from None
    try:
        file = pq.ParquetFile(path)
        # Only these columns: verl's files may carry large ones (images, long solutions) we never use.
        wanted = {*fields, "prompt", "reward_model", "extra_info"}
        rows = file.read(columns=[c for c in file.schema_arrow.names if c in wanted]).to_pylist()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    # A parquet null is a missing value: it should read as a missing field, as in a jsonl object.
    return [{k: v for k, v in row.items() if v is not None} for row in rows]


def _verl_record(row: dict) -> tuple[dict, str, str]:
    """Return (record, question field, answer field) of a verl-layout row, fields named by their source."""
    record = {}
    extra, reward = row.get("extra_info"), row.get("reward_model")
    if isinstance(extra, dict) and extra.get("question") is not None:
        question_field = "extra_info.question"
        record[question_field] = extra["question"]
    else:
        # verl's prompt is the chat sent to the model: its last user message (which may carry an instruction).
        question_field = "prompt"
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            record[question_field] = prompt
        elif isinstance(prompt, list):
            users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
            if users and users[-1] is not None:
                record[question_field] = users[-1]
    answer_field = "reward_model.ground_truth"
    if isinstance(reward, dict) and reward.get("ground_truth") is not None:
        record[answer_field] = reward["ground_truth"]
    return record, question_field, answer_field


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
