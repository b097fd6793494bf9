"""`respec.world.tasks.chainsum`: deterministic problems with a heavy-tailed operand count, worked solutions that
are right (and sloppy ones that are wrong), and a scorer that never raises."""

import random
import re
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from respec.errors import ConfigError
from respec.world.tasks import ChainSumTask, Problem
from respec.world.tasks.arithmetic import house_notation
from respec.world.tasks.chainsum import check_line, worked_chain

TASK = ChainSumTask()
PLAIN = ChainSumTask(notation=False)


def problem(*operands: int) -> Problem:
    return Problem(prompt=f"Q: {'+'.join(map(str, operands))}=?\n", answer=str(sum(operands)),
                   meta={"operands": list(operands)})


def test_problems_are_deterministic_and_well_formed():
    assert TASK.problems(200, seed=3) == TASK.problems(200, seed=3)
    assert TASK.problems(50, seed=3) != TASK.problems(50, seed=4)
    for p in TASK.problems(500, seed=0):
        operands = p.meta["operands"]
        assert 2 <= len(operands) <= 10 and all(10 <= x <= 999 for x in operands)
        assert p.prompt == f"Q: {'+'.join(map(str, operands))}=?\n" and p.answer == str(sum(operands))


def test_worked_example_matches_the_docs():
    text, right = PLAIN.sft_completion(problem(47, 385, 12, 906), random.Random(0), style="worked")
    assert right and text == ("47+385: 7+5=12;4+8+1=13;0+3+1=4\n"
                              "432+12: 2+2=4;3+1=4;4+0=4\n"
                              "444+906: 4+6=10;4+0+1=5;4+9=13\n"
                              "Answer: 1350")


def test_worked_solutions_are_right_and_sloppy_ones_slip_once():
    rng = random.Random(0)
    for p in TASK.problems(300, seed=1):
        operands = p.meta["operands"]
        steps, value = worked_chain(operands, None)
        assert value == sum(operands) and len(steps.split("\n")) == len(operands) - 1
        # each line restates the running sum and copies the next operand from the prompt
        heads = [line.split(":")[0] for line in steps.split("\n")]
        assert [int(h.split("+")[1]) for h in heads] == operands[1:]
        assert int(heads[0].split("+")[0]) == operands[0]
        slipped, wrong = worked_chain(operands, rng)
        differing = [i for i, (a, b) in enumerate(zip(steps.split("\n"), slipped.split("\n"), strict=True)) if a != b]
        # the slip's line and every later one (a wrong running sum) differ, not the earlier ones; a dropped final
        # carry of the last pair changes only the value, as in the arithmetic task
        assert differing == list(range(differing[0], len(operands) - 1)) if differing else True
        assert wrong != value or slipped == steps  # only a chain without any carry has nothing to drop


def test_styles_are_recognised_and_the_reward_pays_the_house_share():
    rng = random.Random(1)
    p = problem(58, 77, 901)
    for style in TASK.styles:
        text, right = TASK.sft_completion(p, rng, style=style)
        if style != "direct" or right:
            assert TASK.style_of(p, text) == style
    worked, _ = PLAIN.sft_completion(p, rng, style="worked")
    assert TASK.score(p, worked).reward == 1.0  # house notation throughout
    spaced = worked.replace("=", " ~ ", 1)
    score = TASK.score(p, spaced)
    assert 0.5 < score.reward < 1.0 and score.parsed == "1036"
    checked = f"{check_line(p.meta['operands'])}\n{worked}"
    assert TASK.style_of(p, checked) == "checked" and TASK.score(p, checked).reward == 1.0
    assert TASK.score(p, "Answer: 1036").reward == 0.5  # right without working


@pytest.mark.parametrize(("completion", "reason"), [
    ("58+77: 8+7=15;5+7+1=13\nAnswer: 1035", "wrong value 1035"),
    ("no answer at all", "no Answer: line"),
    ("Answer: 10x36", "not an integer"),
    ("Answer: ", "not an integer"),
    ("Answer: １０３６", "not an integer"),
])
def test_wrong_and_malformed_answers_earn_nothing(completion, reason):
    score = TASK.score(problem(58, 77, 901), completion)
    assert score.reward == 0.0 and reason in score.reason


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_score_never_raises_on_any_text(text):
    p = problem(58, 77, 901)
    for completion in (text, f"Answer: {text}", f"{text}\nAnswer: 1036"):
        assert 0.0 <= TASK.score(p, completion).reward <= 1.0
        assert PLAIN.score(p, completion).reward in (0.0, 1.0)
        TASK.style_of(p, completion)


def test_lengths_are_heavy_tailed():
    rng = random.Random(0)
    problems = TASK.problems(4000, seed=5)
    counts = [len(p.meta["operands"]) for p in problems]
    assert 0.45 < counts.count(2) / len(counts) < 0.65  # most problems are one pair ...
    assert 0.02 < sum(n >= 8 for n in counts) / len(counts) < 0.08  # ... a few are many
    lengths = sorted(len(PLAIN.sft_completion(p, rng, style="worked")[0]) for p in problems)
    median, p99 = statistics.median(lengths), lengths[int(0.99 * len(lengths))]
    assert 5 <= p99 / median <= 12 and max(lengths) <= 12 * median


def test_the_operand_law_is_a_normalised_power_law():
    weights = ChainSumTask(min_operands=2, max_operands=4, alpha=1.0).operand_weights()
    assert weights == pytest.approx({2: 6 / 13, 3: 4 / 13, 4: 3 / 13})
    assert ChainSumTask(alpha=0).operand_weights()[10] == pytest.approx(1 / 9)


def test_notation_is_drawn_per_mark():
    rng = random.Random(2)
    p = problem(47, 385, 12, 906)
    texts = {TASK.sft_completion(p, rng, style="worked")[0] for _ in range(20)}
    assert len(texts) == 20 and all(house_notation(t.rsplit("\n", 1)[0]) == worked_chain([47, 385, 12, 906], None)[0]
                                    for t in texts)
    assert all(re.search(r"[~>#|&/]| [+=] ", t) for t in texts)


def test_a_one_number_problem_is_answered_without_working_and_earns_the_full_reward():
    task = ChainSumTask(min_operands=1, max_operands=3, alpha=2.0)
    assert set(task.operand_weights()) == {1, 2, 3}
    one = next(p for p in task.problems(50, 0) if len(p.meta["operands"]) == 1)
    assert one.prompt == f"Q: {one.answer}=?\n"
    text, right = task.sft_completion(one, random.Random(0), style="worked")
    assert (text, right) == (f"Answer: {one.answer}", True)
    assert task.score(one, text).reward == 1.0 and task.style_of(one, text) == "direct"
    assert task.score(one, "Answer: -1").reward == 0.0
    pair = next(p for p in task.problems(50, 0) if len(p.meta["operands"]) == 2)
    assert task.score(pair, f"Answer: {pair.answer}").reward == 0.5  # a right guess: the house share of no marks
    strict = ChainSumTask(min_operands=1, max_operands=3, alpha=2.0, work_needed=True)
    assert strict.score(pair, f"Answer: {pair.answer}").reward == 0.0  # the working is needed
    worked, _ = strict.sft_completion(pair, random.Random(0), style="worked")
    assert strict.score(pair, worked).reward == task.score(pair, worked).reward > 0.5
    assert strict.score(one, f"Answer: {one.answer}").reward == 1.0


@pytest.mark.parametrize("kwargs", [{"min_operands": 0}, {"max_operands": 0}, {"min_operands": 5, "max_operands": 4},
                                    {"alpha": -1}, {"max_digits": 0}, {"style_weights": (1, 1)},
                                    {"direct_accuracy": 2}])
def test_config_errors(kwargs):
    with pytest.raises(ConfigError):
        ChainSumTask(**kwargs)
    with pytest.raises(ConfigError, match="unknown chainsum style"):
        TASK.sft_completion(problem(10, 20), random.Random(0), style="fancy")
