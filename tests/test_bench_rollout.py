"""`respec bench rollout`: every chooser on one draining GRPO-shaped rollout, the oracle, JSON, plot and CLI."""

import json
import random
import shlex
import sys

import pytest
from typer.testing import CliRunner

import respec.engine.tuner
from respec.bench.rollout import (
    BATCH_RANGES,
    RolloutBenchConfig,
    bench_rollout,
    oracle,
    step_cost_at,
    step_costs,
    table_from_rollouts,
    worked_lengths,
)
from respec.cli import app
from respec.engine.generate import GenerationResult, StepStats
from respec.errors import ConfigError
from respec.world.tasks import ArithmeticTask, ChainSumTask, RedrawTask
from respec.world.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def models(tiny_world):
    return tiny_world


def run(steps: list[tuple[int, int, list[int], float]], prefill: float = 0.0) -> GenerationResult:
    """Returns a synthetic rollout from (batch, k, accepted per row, seconds) per step."""
    return GenerationResult([], [StepStats(b, k, acc, b + sum(acc), s) for b, k, acc, s in steps], prefill)


def test_step_costs_are_medians_per_batch_bucket_and_the_table_takes_the_fastest_k_per_range():
    plain = run([(b, 0, [0] * b, 0.001 + 0.0001 * b) for b in (1, 4, 16, 64)])
    spec = run([(b, 2, [2] * b, 0.002 + 0.0004 * b) for b in (1, 4, 16, 64)])
    preempted = run([(16, 2, [2] * 16, 1.0), (15, 2, [2] * 15, 0.0084), (14, 2, [2] * 14, 0.0084)])
    costs = step_costs({0: [plain], 2: [spec, preempted]})
    assert costs[0] == pytest.approx({1: 0.0011, 4: 0.0014, 16: 0.0026, 64: 0.0074})
    # batches 14, 15, 16 share bucket 16; the preempted step is outvoted by the median
    assert costs[2] == pytest.approx({1: 0.0024, 4: 0.0036, 16: 0.0084, 64: 0.0276})
    # between measured buckets the cost is interpolated in the bucket, beyond them the nearest is taken
    assert step_cost_at(costs, 0, 40) == pytest.approx(0.0026 + (0.0074 - 0.0026) * (40 - 16) / (64 - 16))
    assert step_cost_at(costs, 0, 2) == pytest.approx(0.0011 + 0.0003 / 3)
    # tokens/s: plain b / (0.001 + 1e-4 b); k=2 emits 3b per (0.002 + 4e-4 b): faster below b = 10, slower above
    assert table_from_rollouts({0: [plain], 2: [spec]}) == {1: 2, 4: 2, 16: 0, 64: 0}


def line_costs(lines: dict[int, tuple[float, float]], batches) -> dict[int, dict[int, float]]:
    """Costs a + b * bucket at every bucket of `batches`, per k."""
    return {k: {n: a + b * n for n in batches} for k, (a, b) in lines.items()}


def test_oracle_takes_the_best_k_per_step_within_what_the_reference_reveals():
    costs = line_costs({0: (0.0, 0.001), 1: (0.0, 0.0015), 2: (0.0, 0.002)}, (1, 2))  # per row: 1, 1.5, 2 ms
    reference = run([(2, 2, [2, 0], 0.004), (1, 2, [1], 0.002)], prefill=0.5)
    seconds, ks = oracle(reference, costs)
    # step 1: k=0 2 tokens / 2 ms, k=1 3 / 3 ms, k=2 4 / 4 ms -> all 1 token/ms: ties go to the smaller k
    # step 2: k=0 1 / 1 ms, k=1 2 / 1.5 ms, k=2 2 / 2 ms -> k=1
    assert ks == [0, 1]
    assert seconds == pytest.approx(0.5 + 4 / 1000 + 2 / (2 / 0.0015))


def test_the_oracle_is_never_slower_than_its_reference_under_the_same_costs():
    """At every step the oracle may keep the reference's own k, so under the measured costs it is at most the
    reference's time: prefill + the sum of the reference's step costs."""
    rng = random.Random(0)
    lines = {0: (0.001, 0.0002), 1: (0.0015, 0.0003), 2: (0.002, 0.0005), 3: (0.0024, 0.0008)}
    costs = line_costs(lines, (1, 2, 4, 8, 16))
    for _ in range(20):
        k_ref, batch, steps = rng.randint(1, 3), rng.randint(1, 12), []
        while batch:
            steps.append((batch, k_ref, [rng.randint(0, k_ref) for _ in range(batch)], 0.0))
            batch -= rng.randint(0, batch)
        reference = run(steps, prefill=0.01)
        seconds, ks = oracle(reference, costs)
        own = 0.01 + sum(step_cost_at(costs, k_ref, s.batch) for s in reference.stats)
        assert seconds <= own + 1e-12 and len(ks) == len(steps) and all(0 <= k <= k_ref for k in ks)


def test_bench_rollout_json_plot_and_cli(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    policy, drafter = models
    cfg = RolloutBenchConfig(policy=str(policy), drafter=str(drafter), prompts=2, samples=3, max_new_tokens=8,
                             ks=(1, 2), repeats=1)
    progress = []
    data = bench_rollout(cfg, tmp_path / "rollout.json", log=lambda m, f=None: progress.append((m, f)))
    assert capsys.readouterr() == ("", "")  # library code reports through `log`, it never prints
    assert [f for _, f in progress if f is not None][-1] == 1.0
    saved = json.loads((tmp_path / "rollout.json").read_text())
    assert saved == json.loads(json.dumps(data)) and (tmp_path / "rollout.png").stat().st_size > 0
    assert saved["command"] == "python API: bench_rollout(...)" and saved["machine"]["torch_threads"] == 1
    for key in ("plain_s", "table_s", "bandit_s", "adaptive_s", "oracle_s"):
        assert saved[key] > 0
    static = saved["static_s"]
    assert set(static) == set(saved["oracle_by_reference_s"]) == {"1", "2"}
    # the oracle is the best of its evaluations, one per static rollout
    assert saved["oracle_s"] == min(saved["oracle_by_reference_s"].values())
    assert saved["best_static_k"] == min((1, 2), key=lambda k: static[str(k)])
    # every ratio is computed from the JSON's own fields
    wall, cpu = saved["ratios"], saved["cpu_ratios"]
    assert wall["adaptive_vs_plain"] == pytest.approx(saved["plain_s"] / saved["adaptive_s"])
    assert wall["adaptive_vs_best_static"] == pytest.approx(min(static.values()) / saved["adaptive_s"])
    for name in ("table", "bandit", "oracle"):
        assert wall[f"adaptive_vs_{name}"] == pytest.approx(saved[f"{name}_s"] / saved["adaptive_s"])
    c = saved["cpu_s"]
    assert set(c) == {"plain", "static_1", "static_2", "table", "bandit", "adaptive"}
    assert cpu["adaptive_vs_plain"] == pytest.approx(c["plain"] / c["adaptive"])
    assert cpu["adaptive_vs_best_static"] == pytest.approx(min(c["static_1"], c["static_2"]) / c["adaptive"])
    assert cpu["adaptive_vs_table"] == pytest.approx(c["table"] / c["adaptive"])
    # vLLM's table: ranges from batch 1 among this module's bounds, each with plain or one of the ks
    table = {int(b): k for b, k in saved["table"].items()}
    assert min(table) == 1 and set(table) <= set(BATCH_RANGES) and set(table.values()) <= {0, 1, 2}
    assert all(0 <= saved["mean_k"][name] <= 2 for name in ("table", "bandit", "adaptive"))
    assert 0 < saved["tokens"] <= cfg.prompts * cfg.samples * cfg.max_new_tokens
    trace = saved["trace"]
    assert len(trace["batch"]) == len(trace["k"]) == len(trace["oracle_k"]) == len(trace["seconds"]) > 0
    assert 1 <= trace["batch"][0] <= 6 and all(0 <= k <= 2 for k in trace["k"] + trace["oracle_k"])
    assert trace["batch"] == sorted(trace["batch"], reverse=True)  # no row joins: the batch only drains
    shape = saved["shape"]  # the plain rollouts': at most 6 rows, all in the smallest ranges
    assert 1 <= shape["length"]["median"] <= shape["length"]["max"] <= cfg.max_new_tokens
    assert shape["batch_share"]["1-8"] == pytest.approx(1.0) and shape["small_batch_share"] == pytest.approx(1.0)
    assert set(saved["step_cost"]) == {"0", "1", "2"}
    assert all(cells and all(s > 0 for s in cells.values()) for cells in saved["step_cost"].values())
    worked = saved["worked_shape"]  # the task's worked solutions in rollouts of the same shape, clipped
    assert worked["rollouts"] > 1 and 1 <= worked["length"]["median"] <= worked["length"]["max"] <= cfg.max_new_tokens
    assert worked["small_batch_share"] == pytest.approx(1.0)  # at most 6 rows

    args = ["bench", "rollout", "--policy", str(policy), "--drafter", str(drafter), "--prompts", "1", "--samples",
            "2", "--max-new-tokens", "4", "--ks", "1", "--repeats", "1", "--compile", "auto",
            "--json", str(tmp_path / "cli.json")]
    monkeypatch.setattr(sys, "argv", ["respec", *args])  # what the console script sees
    monkeypatch.setenv("RESPEC_COMPILE_BACKEND", "eager")  # the compiled path: dynamo only
    monkeypatch.setattr(respec.engine.tuner, "profile_grid", lambda engine, config: [1, 2])  # a short profile
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "oracle (bound)" in out.output and "adaptive: " in out.output  # the CLI prints the table
    assert "the eager engine's adaptive rollout" in out.output  # compiled steps beside the eager engine
    assert "Rollout shape" in out.output  # and the plain rollout's lengths and time per live batch
    assert (tmp_path / "cli.png").exists()
    saved = json.loads((tmp_path / "cli.json").read_text())
    assert saved["command"] == shlex.join(["respec", *args]) and saved["config"]["compile"] == "auto"
    assert saved["ratios"]["adaptive_vs_adaptive_eager"] == pytest.approx(saved["adaptive_eager_s"] /
                                                                         saved["adaptive_s"])


@pytest.mark.parametrize("kwargs", [{"ks": ()}, {"ks": (0,)}, {"ks": (17,)}, {"samples": 0}, {"repeats": 0},
                                    {"temperature": -1.0}])
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        RolloutBenchConfig(**kwargs)


def test_worked_lengths_sample_every_row_on_its_own():
    rng = random.Random(0)
    arithmetic = ArithmeticTask()
    tok = build_tokenizer([p.prompt + arithmetic.sft_completion(p, rng)[0] for p in arithmetic.problems(200, 0)],
                          vocab_size=128)
    redraw = RedrawTask()
    batches = worked_lengths(redraw, tok, redraw.problems(6, 0), 3, 8, 40, random.Random(1))
    assert [len(b) for b in batches] == [24, 24]  # rollouts of 3 prompts x 8 rows
    assert all(8 <= n <= 40 for b in batches for n in b) and max(n for b in batches for n in b) == 40  # clipped
    groups = [b[i:i + 8] for b in batches for i in range(0, 24, 8)]
    assert sum(len(set(g)) > 1 for g in groups) >= 4  # a row's own path sets its length
    chainsum = ChainSumTask(notation=False)  # the problem sets the length: a group's rows are equally long
    assert all(len(set(b[i:i + 8])) == 1 for b in worked_lengths(chainsum, tok, chainsum.problems(4, 0), 2, 8, 999,
                                                                  random.Random(1)) for i in (0, 8))
