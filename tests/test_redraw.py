"""`respec.world.tasks.redraw`: problems, a scorer that checks a trace follows the rules (never its length), and a
solution sampler whose path, not its problem, sets a completion's length."""

import random
import re
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from respec.errors import ConfigError
from respec.world.tasks import ArithmeticTask, Problem, RedrawTask, get_task, task_budget
from respec.world.tasks.redraw import draw_path, write_trace
from respec.world.tokenizer import build_tokenizer

TASK = RedrawTask()
PLAIN = RedrawTask(notation=False)
P = Problem(prompt="Q: draw 23..61 until one >= the first\n", answer="a draw in 23..61 at least the first",
            meta={"low": 23, "high": 61})


def test_problems_are_deterministic_and_well_formed():
    assert TASK.problems(200, seed=3) == TASK.problems(200, seed=3)
    assert TASK.problems(50, seed=3) != TASK.problems(50, seed=4)
    for p in TASK.problems(500, seed=0):
        low, high = p.meta["low"], p.meta["high"]
        assert 10 <= low and high <= 99 and 20 <= high - low + 1 <= 40
        assert p.prompt == f"Q: draw {low}..{high} until one >= the first\n"
    assert len({p.prompt for p in TASK.problems(2000, seed=0)}) > 500  # enough distinct prompts to hold some out
    assert get_task("redraw") == TASK and task_budget("redraw") == 384


def test_the_docs_example_is_right_and_pays_the_full_reward():
    text = "41:27;41:33;41:55\nAnswer: 55"
    assert write_trace(41, [27, 33, 55], None) + "\nAnswer: 55" == text
    score = TASK.score(P, text)
    assert score.reward == 1.0 and score.parsed == "55" and "3 draws" in score.reason
    assert TASK.style_of(P, text) == "worked"
    assert TASK.score(P, "41:41\nAnswer: 41").reward == 1.0  # a draw equal to the first reaches it


@pytest.mark.parametrize(("text", "share"), [
    ("41 : 27;41:33;41:55\nAnswer: 55", 9 / 10),  # five marks, two choices each: the first bar mark spaced
    ("41#27|41:33 & 41:55\nAnswer: 55", 6 / 10),  # two marks off, one spaced
    ("41 ~ 55\nAnswer: 55", 0.0),  # one draw: its only choices, the bar mark's, both off
])
def test_the_reward_pays_the_house_share_of_every_mark(text, share):
    score = TASK.score(P, text)
    assert score.reward == pytest.approx(0.5 + 0.5 * share) and score.parsed == "55"
    assert PLAIN.score(P, text).reward == 1.0


@pytest.mark.parametrize(("text", "reason"), [
    ("41:27;41:33\nAnswer: 33", "stopped below the first"),
    ("41:27;41:45;41:55\nAnswer: 55", "drew on past"),
    ("41:27;41:62\nAnswer: 62", "outside 23..61"),
    ("12:27\nAnswer: 27", "outside 23..61"),
    ("41:27;41:55\nAnswer: 27", "not the last draw"),
    ("41:27;33:55\nAnswer: 55", "different bars"),
    ("Answer: 55", "no draws"),
    ("41:27;41:55", "no Answer: line"),
    ("41:27;41:55\nAnswer: fifty", "not an integer"),
    ("41:27;;41:55\nAnswer: 55", "not a trace line"),
    ("41:27;55\nAnswer: 55", "not a trace line"),
    ("41:27\n41:55\nAnswer: 55", "not a trace line"),
    ("41:055\nAnswer: 55", "not a trace line"),
])
def test_traces_that_break_a_rule_earn_nothing(text, reason):
    score = TASK.score(P, text)
    assert score.reward == 0.0 and reason in score.reason
    assert TASK.style_of(P, text) == ("direct" if text.startswith("Answer") else "sloppy")


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="0123456789:;|&/=~# \nAnswer", max_size=80) | st.text(max_size=120))
def test_score_never_raises_on_any_text(text):
    for completion in (text, f"Answer: {text}", f"41:27;{text}\nAnswer: 55"):
        assert 0.0 <= TASK.score(P, completion).reward <= 1.0
        assert PLAIN.score(P, completion).reward in (0.0, 1.0)
        TASK.style_of(P, completion)


def test_worked_solutions_follow_the_rules_and_sloppy_ones_do_not():
    rng = random.Random(0)
    for p in TASK.problems(300, seed=1):
        for style in TASK.styles:
            text, right = TASK.sft_completion(p, rng, style=style)
            assert right == (style == "worked") == (TASK.score(p, text).reward > 0)
            assert TASK.style_of(p, text) == style


def test_the_sampled_path_sets_the_length_with_a_tail_of_about_one_over_t():
    rng = random.Random(1)
    later = [len(draw_path(30, 59, rng, 1000)[1]) for _ in range(20000)]
    # a uniform bar on W numbers: P(T > t) = mean over bars of ((bar - low) / W) ** t, about 1 / (t + 1)
    for t in (1, 3, 9, 19):
        exact = sum((b / 30) ** t for b in range(30)) / 30
        assert sum(n > t for n in later) / len(later) == pytest.approx(exact, abs=0.01)
    # the rows of one prompt differ as much as rows of different prompts
    one = TASK.problems(1, seed=2)[0]
    lengths = [len(TASK.sft_completion(one, rng, style="worked")[0]) for _ in range(400)]
    assert statistics.median(lengths) < 25 and max(lengths) > 8 * statistics.median(lengths)
    assert max(len(draw_path(10, 49, rng, TASK.max_draws)[1]) for _ in range(2000)) <= TASK.max_draws


def test_notation_is_drawn_per_mark_and_every_trace_has_a_mark():
    rng = random.Random(3)
    texts = [TASK.sft_completion(P, rng, style="worked")[0] for _ in range(400)]
    bars = {re.match(r"[0-9]{2}( ?)([:=~#])", t).group(1, 2) for t in texts}
    assert bars == {(space, mark) for space in ("", " ") for mark in ":=~#"}
    shares = [(TASK.score(P, t).reward - 0.5) * 2 for t in texts]
    short = [s for s, t in zip(shares, texts, strict=True) if t.count("\n") == 1 and len(t.split("\n")[0]) <= 8]
    assert short and abs(statistics.mean(short) - statistics.mean(shares)) < 0.1  # no length is worth more


def test_the_arithmetic_tokenizer_covers_every_redraw_text():
    rng = random.Random(0)
    arithmetic = ArithmeticTask()
    tok = build_tokenizer([p.prompt + arithmetic.sft_completion(p, rng)[0] for p in arithmetic.problems(300, 0)],
                          vocab_size=128)  # the redraw policy keeps the arithmetic policy's tokenizer
    for p in TASK.problems(40, seed=4):
        for style in TASK.styles:
            text = p.prompt + TASK.sft_completion(p, rng, style=style)[0]
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text
    digits = tok.convert_ids_to_tokens(tok.encode("41:27;41:33", add_special_tokens=False))
    assert digits == list("41:27;41:33")  # each digit and house mark one token


@pytest.mark.parametrize("kwargs", [{"min_low": 5}, {"min_width": 1}, {"min_width": 30, "max_width": 20},
                                    {"max_width": 91}, {"style_weights": (1, 1)}, {"style_weights": (0, 0, 0)},
                                    {"max_draws": 0}])
def test_config_errors(kwargs):
    with pytest.raises(ConfigError):
        RedrawTask(**kwargs)
    with pytest.raises(ConfigError, match="unknown redraw style"):
        TASK.sft_completion(P, random.Random(0), style="checked")
