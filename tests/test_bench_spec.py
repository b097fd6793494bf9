"""`respec bench spec`: the SD vs plain grid on a tiny policy + drafter, its JSON, plot and CLI."""

import json

import pytest
from typer.testing import CliRunner

from respec.bench.policies import TablePolicy, table_from_cells
from respec.bench.spec import SpecBenchConfig, bench_spec, best_cells
from respec.cli import app
from respec.errors import ConfigError


@pytest.fixture(scope="module")
def models(tiny_world):
    return tiny_world


def test_bench_spec_grid_json_and_plot(models, tmp_path, monkeypatch):
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))  # the tuner's cost profile
    policy, drafter = models
    cfg = SpecBenchConfig(policy=str(policy), drafter=str(drafter), batch_sizes=(1, 3), temperatures=(0.0, 1.0),
                          ks=(1, 2), max_new_tokens=6, repeats=2, min_prompts=2)
    data = bench_spec(cfg, tmp_path / "spec.json")
    saved = json.loads((tmp_path / "spec.json").read_text())
    assert (tmp_path / "spec.png").stat().st_size > 0
    assert len(saved["cells"]) == 2 * 2 * (1 + 2 + 2 + 3) and "machine" in saved  # + plain/best static again
    for c in saved["cells"]:
        assert {"batch", "temperature", "mode", "k", "tokens_per_s", "tokens_per_s_median", "speedup_vs_plain",
                "mean_emitted_per_step"} <= set(c)
        assert 0 < c["tokens_per_s_median"] <= c["tokens_per_s"]  # the fastest of the repeats is kept
        assert c["speedup_vs_plain"] > 0
        if c["mode"] in ("plain", "static", "plain_again", "best_static_again"):
            assert (c["mode"] in ("plain", "plain_again")) == (c["k"] == 0)
        else:  # the mean chosen k over the cell's decode steps
            assert c["mode"] in ("adaptive", "table", "bandit") and 0 <= c["k"] <= 2
        if c["mode"] in ("plain", "plain_again"):
            assert c["speedup_vs_plain"] == 1.0 and c["mean_emitted_per_step"] == 1.0
        else:  # per row per verify step: at most the step's drafts + 1 (k_max = 2 for the choosers)
            assert 1.0 <= c["mean_emitted_per_step"] <= (c["k"] if c["mode"] == "static" else 2) + 1
    assert [c["mode"] for c in saved["cells"][:8]] == ["plain", "static", "static", "plain_again",
                                                       "best_static_again", "adaptive", "table", "bandit"]
    assert len(best_cells(data)) == 4
    for c in saved["cells"]:  # the table is this run's grid of the same temperature, in vLLM's format
        if c["mode"] == "table":
            grid = [g for g in saved["cells"] if g["temperature"] == c["temperature"]]
            table = TablePolicy(table_from_cells(grid))
            assert c["table"] == [list(r) for r in table.vllm_schedule()] and c["table"][0][0] == 1
            assert [r[0] for r in c["table"]] == [1, 3]
        if c["mode"] == "bandit":
            assert c["sd_batch_threshold"] is None or 0 <= c["sd_batch_threshold"] <= 2


def test_bench_spec_table_and_bandit_choose_k_from_their_own_rules(models, tmp_path):
    """A forced grid: the table mode must follow the table exactly (k per live batch), and the bandit's gate
    keeps SD off when the grid never beat plain."""
    policy, drafter = models
    cfg = SpecBenchConfig(policy=str(policy), drafter=str(drafter), batch_sizes=(2,), temperatures=(0.0,),
                          ks=(1, 2), modes=("plain", "static", "table", "bandit"), max_new_tokens=5, repeats=1,
                          min_prompts=2)
    data = bench_spec(cfg)
    cells = {c["mode"] if c["mode"] != "static" else c["k"]: c for c in data["cells"]}
    assert set(cells) == {"plain", 1, 2, "plain_again", "best_static_again", "table", "bandit"}
    fastest = max(("plain", 1, 2), key=lambda m: (cells[m]["tokens_per_s"], m == "plain", m == 1))
    want_k = 0 if fastest == "plain" else fastest
    assert cells["table"]["table"] == [[1, 1, want_k]]
    assert cells["table"]["k"] == want_k  # every step at the one range's k
    threshold = cells["bandit"]["sd_batch_threshold"]
    assert threshold == (0 if want_k == 0 else None)
    if threshold == 0:  # SD never on: the bandit ran plain
        assert cells["bandit"]["k"] == 0 and cells["bandit"]["mean_emitted_per_step"] == 1.0
    else:  # no gate: every step draws an arm
        assert 1 <= cells["bandit"]["k"] <= 2


def test_bench_spec_cli(models, tmp_path):
    policy, drafter = models
    result = CliRunner().invoke(app, ["bench", "spec", "--policy", str(policy), "--drafter", str(drafter),
                                      "--batch-sizes", "2", "--temperatures", "1.0", "--ks", "2",
                                      "--modes", "plain,static,table", "--max-new-tokens", "4", "--repeats", "1",
                                      "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.json").exists() and "speedup" in result.output and "best static" in result.output
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [c["mode"] for c in saved["cells"]] == ["plain", "static", "plain_again", "best_static_again", "table"]


@pytest.mark.parametrize("kwargs", [{"ks": (0,)}, {"batch_sizes": ()}, {"temperatures": (-1.0,)},
                                    {"modes": ("static",)}, {"modes": ("plain", "table")},
                                    {"modes": ("plain", "oracle")}])
def test_bench_spec_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SpecBenchConfig(**kwargs)
