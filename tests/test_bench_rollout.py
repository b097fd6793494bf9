"""`respec bench rollout`: every chooser on one draining GRPO-shaped rollout, the oracle, JSON, plot and CLI."""

import json

import pytest
from typer.testing import CliRunner

from respec.bench.rollout import RolloutBenchConfig, bench_rollout, oracle, step_costs, table_from_rollouts
from respec.cli import app
from respec.engine.generate import GenerationResult, StepStats
from respec.errors import ConfigError


@pytest.fixture(scope="module")
def models(tiny_world):
    return tiny_world


def run(steps: list[tuple[int, int, list[int], float]], prefill: float = 0.0) -> GenerationResult:
    """Returns a synthetic rollout from (batch, k, accepted per row, seconds) per step."""
    return GenerationResult([], [StepStats(b, k, acc, b + sum(acc), s) for b, k, acc, s in steps], prefill)


def test_step_costs_fit_a_line_per_k_and_the_table_takes_the_fastest_k_per_range():
    plain = run([(b, 0, [0] * b, 0.001 + 0.0001 * b) for b in (1, 4, 16, 64)])
    spec = run([(b, 2, [2] * b, 0.002 + 0.0004 * b) for b in (1, 4, 16, 64)])
    fits = step_costs({0: [plain], 2: [spec]})
    assert fits[0] == pytest.approx((0.001, 0.0001)) and fits[2] == pytest.approx((0.002, 0.0004))
    # tokens/s: plain b / (0.001 + 1e-4 b); k=2 emits 3b per (0.002 + 4e-4 b): faster below b = 10, slower above
    assert table_from_rollouts({0: [plain], 2: [spec]}) == {1: 2, 4: 2, 16: 0, 64: 0}


def test_oracle_takes_the_best_k_per_step_within_what_the_reference_reveals():
    fits = {0: (0.0, 0.001), 1: (0.0, 0.0015), 2: (0.0, 0.002)}  # seconds per row: 1, 1.5, 2 ms
    reference = run([(2, 2, [2, 0], 0.004), (1, 2, [1], 0.002)], prefill=0.5)
    seconds, ks = oracle(reference, fits)
    # step 1: k=0 2 tokens / 2 ms, k=1 3 / 3 ms, k=2 4 / 4 ms -> all 1 token/ms: ties go to the smaller k
    # step 2: k=0 1 / 1 ms, k=1 2 / 1.5 ms, k=2 2 / 2 ms -> k=1
    assert ks == [0, 1]
    assert seconds == pytest.approx(0.5 + 4 / 1000 + 2 / (2 / 0.0015))


def test_bench_rollout_json_plot_and_cli(models, tmp_path, monkeypatch):
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    policy, drafter = models
    cfg = RolloutBenchConfig(policy=str(policy), drafter=str(drafter), prompts=2, samples=3, max_new_tokens=8,
                             ks=(1, 2), repeats=1)
    data = bench_rollout(cfg, tmp_path / "rollout.json")
    saved = json.loads((tmp_path / "rollout.json").read_text())
    assert (tmp_path / "rollout.png").stat().st_size > 0
    for key in ("plain_s", "table_s", "bandit_s", "adaptive_s", "oracle_s"):
        assert saved[key] > 0
    assert set(saved["static_s"]) == {"1", "2"} and saved["ratios"] == data["ratios"]
    trace = saved["trace"]
    assert len(trace["batch"]) == len(trace["k"]) == len(trace["oracle_k"]) > 0
    assert 1 <= trace["batch"][0] <= 6 and all(0 <= k <= 2 for k in trace["k"])  # rows may end at prefill
    out = CliRunner().invoke(app, ["bench", "rollout", "--policy", str(policy), "--drafter", str(drafter),
                                   "--prompts", "1", "--samples", "2", "--max-new-tokens", "4", "--ks", "1",
                                   "--repeats", "1", "--json", str(tmp_path / "cli.json")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "cli.json").exists() and (tmp_path / "cli.png").exists()


@pytest.mark.parametrize("kwargs", [{"ks": ()}, {"ks": (0,)}, {"ks": (17,)}, {"samples": 0}, {"repeats": 0},
                                    {"temperature": -1.0}])
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        RolloutBenchConfig(**kwargs)
