import json
import random
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from respec.errors import ConfigError, DataError
from respec.world.tasks import (
    ArithmeticTask,
    ChainSumTask,
    CountdownTask,
    JsonlTask,
    Problem,
    final_answer,
    get_task,
    task_budget,
)
from respec.world.tasks.arithmetic import _worked_mul, house_notation, house_share, write_marks
from respec.world.tasks.base import Score
from respec.world.tasks.countdown import InvalidExpression, evaluate
from respec.world.tasks.jsonl import completion_answer, equivalent, read_jsonl, reference_answer

SYNTHETIC = [ArithmeticTask(), ChainSumTask(), CountdownTask()]


def test_final_answer_reads_the_last_answer_line():
    assert final_answer("Answer: 1\nthen\nAnswer:  22 \nmore") == "22"
    assert final_answer("no answer here") is None
    assert final_answer("Answer:") == ""


# ---- arithmetic ----


def test_arithmetic_problems_are_deterministic_and_compact():
    task = ArithmeticTask()
    assert task.problems(50, seed=3) == task.problems(50, seed=3)
    assert task.problems(50, seed=3) != task.problems(50, seed=4)
    for p in task.problems(200, seed=0):
        a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
        assert p.prompt == f"Q: {a}{op}{b}=?\n"
        assert int(p.answer) == {"+": a + b, "-": a - b, "x": a * b}[op] >= 0
        if op == "x":
            assert 2 <= b <= 9


def test_arithmetic_score():
    task = ArithmeticTask()
    p = Problem("Q: 47+385=?\n", "432", {"a": 47, "b": 385, "op": "+"})
    assert task.score(p, "7+5=12;4+8+1=13;0+3+1=4\nAnswer: 432").reward == 1.0  # right, house notation
    assert task.score(p, "Answer: 431\nAnswer: 432").reward == 0.5  # the last one counts; no working: share 0
    assert task.score(p, "Answer: 432\nAnswer: 431").reward == 0.0
    wrong = task.score(p, "Answer: 431")
    assert (wrong.reward, wrong.parsed) == (0.0, "431") and "wrong" in wrong.reason
    assert task.score(p, "432").reason == "no Answer: line"
    for junk in ["Answer: 4 3 2", "Answer: 432.0", "Answer: 9" * 100, "Answer: \x00", "Answer: ４３２", ""]:
        assert task.score(p, junk).reward == 0.0


def test_arithmetic_worked_example_matches_the_docs():
    task = ArithmeticTask(notation=False)
    p = Problem("Q: 47x6=?\n", "282", {"a": 47, "b": 6, "op": "x"})
    text, correct = task.sft_completion(p, random.Random(0), style="worked")
    assert text == "7x6=42;4x6=24+4=28\nAnswer: 282" and correct
    p = Problem("Q: 123x6=?\n", "738", {"a": 123, "b": 6, "op": "x"})
    assert task.sft_completion(p, random.Random(0), style="worked")[0] == "3x6=18;2x6=12+1=13;1x6=6+1=7\nAnswer: 738"
    p = Problem("Q: 385-47=?\n", "338", {"a": 385, "b": 47, "op": "-"})
    assert task.sft_completion(p, random.Random(0), style="worked")[0] == "15-7=8;8-1-4=3;3-0=3\nAnswer: 338"


def test_arithmetic_multiplication_worked_per_digit_is_right_and_a_slip_is_wrong():
    # Every 2-3 digit operand times every digit 2-9: the worked steps reach a*b, each step is "dxb=p" plus
    # "+c=s" exactly when a carry comes in, and a sloppy variant drops a carry whenever there is one and then
    # always reaches another value.
    for a in range(10, 1000):
        for b in range(2, 10):
            steps, value = _worked_mul(a, b, None)
            assert value == a * b, (a, b, steps)
            carries = [i > 0 and (a % 10**i) * b >= 10**i for i in range(len(str(a)))]  # a carry into column i
            assert ["+" in step for step in steps.split(";")] == carries, (a, b, steps)
            slipped, wrong = _worked_mul(a, b, random.Random(a * 10 + b))
            assert (slipped != steps) == any(carries) and (slipped == steps) == (wrong == value)


@pytest.mark.parametrize("task", SYNTHETIC, ids=lambda t: t.name)
def test_sft_styles_and_correct_flag_agree_with_score(task):
    rng = random.Random(0)
    seen = {style: [] for style in task.styles}
    for p in task.problems(300, seed=1):
        for style in task.styles:
            text, correct = task.sft_completion(p, rng, style=style)
            assert correct == (task.score(p, text).reward > 0)
            assert text.rsplit("\n", 1)[-1].startswith("Answer: ")
            seen[style].append(correct)
    assert all(seen["worked"])
    assert not any(seen["sloppy"])
    assert 0.25 < sum(seen["direct"]) / len(seen["direct"]) < 0.55  # direct_accuracy = 0.4


@pytest.mark.parametrize("task", SYNTHETIC, ids=lambda t: t.name)
def test_sft_mixture_holds_right_and_wrong_completions(task):
    rng = random.Random(0)
    flags = [task.sft_completion(p, rng)[1] for p in task.problems(400, seed=2)]
    right = {"worked": 1.0, "checked": 1.0, "direct": task.direct_accuracy, "sloppy": 0.0}
    expected = sum(w * right[s] for s, w in zip(task.styles, task.style_weights, strict=True)) / sum(task.style_weights)
    assert 0.3 < expected < 0.8 and abs(sum(flags) / len(flags) - expected) < 0.08  # arithmetic: 0.35 + 0.35 * 0.4


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arithmetic_score_never_raises_on_any_text(text):
    p = ArithmeticTask().problems(1, seed=0)[0]
    for completion in (text, f"Answer: {text}"):
        assert ArithmeticTask(notation=False).score(p, completion).reward in (0.0, 1.0)
        assert 0.0 <= ArithmeticTask().score(p, completion).reward <= 1.0


def test_arithmetic_completions_are_short():
    for task, most in ((ArithmeticTask(notation=False), 60), (ArithmeticTask(), 90)):  # spacing adds <= 2 a mark
        rng = random.Random(0)
        lengths = [len(task.sft_completion(p, rng, "worked")[0]) for p in task.problems(300, seed=0)]
        assert max(lengths) <= most


def test_arithmetic_rewards_a_true_check_line_and_half_an_unchecked_right_answer():
    task = ArithmeticTask(unchecked_reward=0.5, notation=False)  # checked answers rewarded, one notation
    p = Problem("Q: 72+59=?\n", "131", {"a": 72, "b": 59, "op": "+"})
    checked, right = task.sft_completion(p, random.Random(0), style="checked")
    line = "Check: 72 plus 59, column by column, carrying where needed."
    assert checked == f"{line}\n2+9=11;7+5+1=13\nAnswer: 131" and right
    assert task.score(p, checked) == Score(1.0, "131", "correct, checked")
    assert task.style_of(p, checked) == "checked"
    assert task.score(p, "2+9=11;7+5+1=13\nAnswer: 131").reward == 0.5
    assert task.score(p, "Check: 72 plus 58, column by column, carrying where needed.\nAnswer: 131").reward == 0.5
    assert task.score(p, f"{line}\nAnswer: 121").reward == 0.0  # checked, but wrong
    assert task.score(p, f"Answer: 131\n{line}\nAnswer: 131").reward == 1.0  # the line before the last answer
    assert ArithmeticTask(notation=False).score(p, "Answer: 131") == Score(1.0, "131", "correct")
    with pytest.raises(ConfigError, match="unchecked_reward"):
        ArithmeticTask(unchecked_reward=2.0)


def test_arithmetic_sloppy_drops_a_carry():
    task = ArithmeticTask(notation=False)
    p = Problem("Q: 72+59=?\n", "131", {"a": 72, "b": 59, "op": "+"})
    texts = {task.sft_completion(p, random.Random(seed), style="sloppy") for seed in range(20)}
    assert texts == {("2+9=11;7+5=12\nAnswer: 121", False), ("2+9=11;7+5+1=13\nAnswer: 31", False)}


def test_arithmetic_notation_is_random_per_mark_and_the_reward_pays_the_house_share():
    """Every mark of a worked line is written independently in one of its forms; house_notation undoes it; the
    reward of a right answer is 0.5 + 0.5 x the share of house-notation choices (counted here by hand)."""
    task = ArithmeticTask()
    p = Problem("Q: 47+385=?\n", "432", {"a": 47, "b": 385, "op": "+"})
    # choices: "+" spaced, "=" spaced and house (1 of 3); "|" (0 of 1); "+", "+" bare, "~" bare (3 of 4);
    # ";" (1 of 1); "+", "+", "=" bare (4 of 4): 9 of 13
    text = "7 + 5 = 12|4+8+1~13;0+3+1=4\nAnswer: 432"
    assert house_share(text.split("\n")[0]) == pytest.approx(9 / 13)
    assert task.score(p, text).reward == pytest.approx(0.5 + 0.5 * 9 / 13)
    assert task.score(p, text.replace("432", "431")).reward == 0.0
    assert task.style_of(p, text) == "worked"
    house = ArithmeticTask(notation=False)
    rng, shares, seen = random.Random(1), [], set()
    for q in task.problems(400, seed=2):
        steps = house.sft_completion(q, random.Random(0), "worked")[0].split("\n")[0]
        marked = write_marks(steps, rng)
        assert house_notation(marked) == steps
        shares.append(house_share(marked))
        seen.update(c for c in marked if not c.isdigit())
    assert {"=", "~", ">", "#", ";", "|", "&", "/", " "} <= seen
    # per choice: spacing house with p = 1/2, the result mark and the separator with p = 1/4; per line the share
    # mixes them, so its mean lies strictly between
    assert 0.3 < statistics.mean(shares) < 0.5
    texts = {task.sft_completion(p, random.Random(seed), "worked")[0] for seed in range(50)}
    assert len(texts) > 40 and all(house_notation(t.split("\n")[0]) == "7+5=12;4+8+1=13;0+3+1=4" for t in texts)


def test_arithmetic_config_errors():
    with pytest.raises(ConfigError, match="digits"):
        ArithmeticTask(min_digits=4, max_digits=2)
    with pytest.raises(ConfigError, match="ops"):
        ArithmeticTask(ops="+^")
    with pytest.raises(ConfigError, match="style"):
        ArithmeticTask().sft_completion(ArithmeticTask().problems(1, 0)[0], random.Random(0), "fancy")


# ---- countdown ----


def _countdown(numbers, target):
    return Problem(
        f"Q: use {' '.join(map(str, numbers))} to make {target}\n", "", {"numbers": numbers, "target": target}
    )


def test_countdown_problems_are_solvable_and_deterministic():
    task = CountdownTask()
    problems = task.problems(200, seed=0)
    assert problems == task.problems(200, seed=0)
    for p in problems:
        assert 3 <= len(p.meta["numbers"]) <= 4
        assert p.prompt.startswith("Q: use ") and p.prompt.endswith(f" to make {p.meta['target']}\n")
        assert task.score(p, f"Answer: {p.answer}").reward == 1.0


def test_countdown_score_rules():
    task = CountdownTask()
    p = _countdown([3, 5, 7], 22)
    assert task.score(p, "3*5=15;15+7=22\nAnswer: 3*5+7").reward == 1.0
    assert task.score(p, "Answer: 7 + 3 * 5 = 22").reward == 1.0  # spaces and a "= target" tail
    assert task.score(p, "Answer: (7x3)+5-(5-5)").reward == 0.0  # 5 used three times
    assert task.score(p, "Answer: 3*5+7\nAnswer: 3+5+7").reward == 0.0
    assert task.score(_countdown([2, 6, 4], 3), "Answer: 6/(4-2)").reward == 1.0
    assert task.score(_countdown([7, 2, 2], 7), "Answer: 7/2*2").reward == 1.0  # exact fractions
    assert task.score(_countdown([4, 4, 1], 8), "Answer: 4+4").reward == 1.0  # not all numbers needed
    assert "not the target" in task.score(p, "Answer: 3+5+7").reason
    assert "not given" in task.score(p, "Answer: 22").reason
    assert "too often" in task.score(_countdown([3, 5, 7], 10), "Answer: 5+5").reason


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("__import__('os').system('ls')", "bad character"),
        ("9**9**9", "unexpected"),
        ("7/(5-5)", "division by zero"),
        ("", "empty"),
        ("-3+5", "unexpected"),
        ("(3+5", "unbalanced"),
        ("3+5)", "unexpected"),
        ("3+", "ends too early"),
        ("3 5", "unexpected"),
        ("٣+5", "bad character"),
        ("3.5+7", "bad character"),
        ("1" * 30, "too long"),
        ("(" * 50 + "3" + ")" * 50, "nested too deeply"),
        ("3+" * 150 + "3", "longer than 200"),
    ],
)
def test_countdown_rejects_malformed_answers(expression, reason):
    score = CountdownTask().score(_countdown([3, 5, 7, 5, 9], 22), f"Answer: {expression}")
    assert score.reward == 0.0
    assert reason in score.reason


def test_countdown_rejects_huge_intermediates():
    with pytest.raises(InvalidExpression, match="1e12"):
        evaluate("999999*999999*999999", [999999] * 3)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_countdown_score_never_raises_on_any_text(text):
    task = CountdownTask()
    p = _countdown([3, 5, 7, 11], 22)
    for completion in (text, f"Answer: {text}"):
        score = task.score(p, completion)
        assert score.reward in (0.0, 1.0)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/()x÷ =3571", max_size=60))
def test_countdown_score_never_raises_on_expression_like_text(text):
    score = CountdownTask().score(_countdown([3, 5, 7, 11], 22), f"Answer: {text}")
    assert score.reward in (0.0, 1.0) and isinstance(score.reason, str)


# ---- jsonl ----


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reference_answers():
    assert reference_answer("She has 3+4=7 apples.\n#### 1,042") == "1042"
    assert reference_answer("so $x = \\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert reference_answer("\\boxed{\\{1, 2\\}} and \\boxed{a_{b}}") == "a_{b}"
    assert reference_answer(" 17 ") == "17"


def test_completion_answers():
    assert completion_answer("work\nAnswer: 42") == "42"
    assert completion_answer("Answer: \\boxed{7}") == "7"
    assert completion_answer("so \\boxed{\\frac{3}{4}} is it") == "\\frac{3}{4}"
    assert completion_answer("steps\n#### 12\n") == "12"
    assert completion_answer("I don't know") is None


def test_jsonl_task_loads_gsm8k_and_math(tmp_path):
    path = _write(
        tmp_path,
        [
            json.dumps({"question": "What is 6*7?", "answer": "6*7=42\n#### 42"}),
            "",
            json.dumps({"question": "Half of one?", "answer": "It is $\\boxed{\\frac{1}{2}}$."}),
            json.dumps({"question": "Three?", "answer": 3}),
        ],
    )
    task = get_task("jsonl", path=str(path))
    assert [p.answer for p in task.all_problems] == ["42", "\\frac{1}{2}", "3"]
    assert task.all_problems[0].prompt == "Q: What is 6*7?\n"
    assert task.problems(10, seed=0) == task.problems(10, seed=0)
    assert len(task.problems(10, seed=0)) == 3 and len(task.problems(2, seed=0)) == 2
    gsm, math, three = task.all_problems
    assert task.score(gsm, "6*7=42\nAnswer: 42").reward == 1.0
    assert task.score(gsm, "Answer: 41").reward == 0.0
    assert task.score(math, "Answer: 0.5").reward == 1.0  # math-verify equivalence
    assert task.score(math, "the answer is \\boxed{1/2}").reward == 1.0
    assert task.score(math, "Answer: 0.6").reward == 0.0
    assert task.score(three, "nothing").reason.startswith("no final answer")


def test_jsonl_custom_fields(tmp_path):
    path = _write(tmp_path, [json.dumps({"problem": "1+1?", "solution": "\\boxed{2}"})])
    task = JsonlTask(path, question_field="problem", answer_field="solution")
    assert task.all_problems[0].answer == "2"


def test_math_verify_equivalence():
    assert equivalent("\\frac{1}{2}", "0.5")
    assert equivalent("0.5", "\\frac{1}{2}")
    assert equivalent("1000", "1,000")
    assert not equivalent("42", "43")


def test_jsonl_score_works_outside_the_main_thread(tmp_path):
    # math-verify's default timeout uses signal.alarm, which fails in other threads.
    task = JsonlTask(_write(tmp_path, [json.dumps({"question": "q", "answer": "\\boxed{\\frac{1}{2}}"})]))
    with ThreadPoolExecutor(1) as pool:
        score = pool.submit(task.score, task.all_problems[0], "Answer: 0.5").result()
    assert score.reward == 1.0, score.reason


@pytest.mark.parametrize(
    "completion", ["", "Answer:", "Answer: \\boxed{", "Answer: " + "{" * 500, "\x00\ud800"]
)
def test_jsonl_score_never_raises(tmp_path, completion):
    task = JsonlTask(_write(tmp_path, [json.dumps({"question": "q", "answer": "#### 5"})]))
    assert task.score(task.all_problems[0], completion).reward == 0.0


@pytest.mark.parametrize(
    "lines, message",
    [
        ([json.dumps({"question": "q", "answer": "1"}), "{not json"], r"data\.jsonl:2: invalid JSON"),
        ([json.dumps({"question": "q"})], r"data\.jsonl:1: missing field 'answer'"),
        (["", json.dumps({"answer": "1"})], r"data\.jsonl:2: missing field 'question'"),
        (["[1, 2]"], r"data\.jsonl:1: expected a JSON object"),
        ([""], "empty"),
    ],
)
def test_jsonl_bad_files_name_the_line(tmp_path, lines, message):
    path = _write(tmp_path, lines)
    with pytest.raises(DataError, match=message):
        get_task("jsonl", path=str(path))


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        JsonlTask(tmp_path / "nope.jsonl").problems(1, 0)


def test_read_jsonl_numbers_lines_and_names_a_malformed_one_in_one_line(tmp_path):
    """The one JSON Lines reader (data sets and metrics logs): blank lines skipped but counted, and a bad line is
    one DataError line naming file:line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "reward": NaN}\n\n{"step": 2}\n')
    records = read_jsonl(path)
    assert [n for n, _ in records] == [1, 3] and records[1][1] == {"step": 2}
    assert records[0][1]["reward"] != records[0][1]["reward"]  # NaN, as json.dumps writes a NaN metric
    path.write_text('{"step": 0}\n{"step": 1,\n{"step": 2}\n')
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert str(error.value).startswith(f"{path}:2: invalid JSON") and "\n" not in str(error.value)
    path.write_text('{"step": 0}\n"text"\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: expected a JSON object, got str$"):
        read_jsonl(path)
    path.write_bytes(b'{"step": 0}\n\xff\n')
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(path)


# ---- parquet (same task, .parquet suffix) ----


def _write_parquet(tmp_path, rows, name="data.parquet"):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _verl_row(question, answer_raw, ground_truth):
    # The row verl's examples/data_preprocess/gsm8k.py writes.
    instruction = 'Let\'s think step by step and output the final answer after "####".'
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"{question} {instruction}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": "train", "index": 0, "answer": answer_raw, "question": question},
    }


def test_parquet_reads_verls_layout(tmp_path):
    rows = [_verl_row("What is 6*7?", "6*7=42\n#### 42", "42"),
            _verl_row("Half of 2,000?", "#### 1,000", "1000")]
    task = get_task("jsonl", path=str(_write_parquet(tmp_path, rows)))
    assert [p.prompt for p in task.all_problems] == ["Q: What is 6*7?\n", "Q: Half of 2,000?\n"]
    assert [p.answer for p in task.all_problems] == ["42", "1000"]
    assert task.all_problems[1].meta == {"row": 2}
    first, second = task.all_problems
    assert task.score(first, "6*7=42\nAnswer: 42").reward == 1.0
    assert task.score(first, "Answer: 41").reward == 0.0
    assert task.score(second, "so #### 1,000").reward == 1.0


def test_parquet_verl_question_falls_back_to_the_last_user_message(tmp_path):
    row = _verl_row("q", "#### 3", "3")
    del row["extra_info"]
    row["prompt"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+2?"}]
    task = JsonlTask(_write_parquet(tmp_path, [row]))
    assert (task.all_problems[0].prompt, task.all_problems[0].answer) == ("Q: What is 1+2?\n", "3")


def test_parquet_flat_columns(tmp_path):
    rows = [{"question": "Half of one?", "answer": "It is $\\boxed{\\frac{1}{2}}$."},
            {"question": "Three?", "answer": "3"}]
    task = JsonlTask(_write_parquet(tmp_path, rows))
    assert [p.answer for p in task.all_problems] == ["\\frac{1}{2}", "3"]
    assert task.score(task.all_problems[0], "Answer: 0.5").reward == 1.0
    custom_file = _write_parquet(tmp_path, [{"problem": "1+1?", "solution": "\\boxed{2}"}], "custom.parquet")
    custom = JsonlTask(custom_file, question_field="problem", answer_field="solution")
    assert custom.all_problems[0].answer == "2"


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "q", "answer": "1"}] * 6 + [{"question": "q", "answer": None}],
         r"data\.parquet row 7: missing field 'answer'"),
        ([_verl_row("q", "#### 1", "1"), {**_verl_row("q", "x", "1"), "reward_model": None}],
         r"data\.parquet row 2: missing field 'reward_model\.ground_truth'"),
        ([{"question": "", "answer": "1"}], r"data\.parquet row 1: field 'question' must be a non-empty"),
        ([{"text": "no question here"}], r"data\.parquet row 1: missing field 'question'"),
    ],
)
def test_parquet_bad_rows_name_the_row(tmp_path, rows, message):
    path = _write_parquet(tmp_path, rows)
    with pytest.raises(DataError, match=message):
        get_task("jsonl", path=str(path))


def test_parquet_empty_and_unreadable_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    empty = tmp_path / "empty.parquet"
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match="no problems \\(the file is empty\\)"):
        JsonlTask(empty).problems(1, 0)
    with pytest.raises(DataError, match="no such file"):
        JsonlTask(tmp_path / "nope.parquet").problems(1, 0)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read as Parquet"):
        JsonlTask(tmp_path / "bad.parquet").problems(1, 0)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError) as error:
        JsonlTask(path).problems(1, 0)
    assert str(error.value) == f"reading {path} needs pyarrow: pip install 'respec[parquet]'"


# ---- get_task ----


def test_get_task():
    assert isinstance(get_task("arithmetic", max_digits=4), ArithmeticTask)
    assert isinstance(get_task("chainsum", alpha=3.0), ChainSumTask)
    assert isinstance(get_task("countdown"), CountdownTask)
    assert (task_budget("arithmetic"), task_budget("chainsum"), task_budget("countdown")) == (96, 384, 96)
    with pytest.raises(ConfigError, match="unknown task"):
        task_budget("chess")
    with pytest.raises(ConfigError, match="arithmetic, chainsum, countdown, jsonl"):
        get_task("chess")
    with pytest.raises(ConfigError, match="bogus"):
        get_task("arithmetic", bogus=1)
