"""`respec bench spec`: the SD vs plain grid on a tiny policy + drafter, its JSON, plot and CLI."""

import json
import shlex
import sys

import pytest
from typer.testing import CliRunner

from respec.bench.spec import SpecBenchConfig, bench_spec, best_cells
from respec.cli import app
from respec.errors import ConfigError


@pytest.fixture(scope="module")
def models(tiny_world):
    return tiny_world


def test_bench_spec_grid_json_and_plot(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))  # the tuner's cost profile
    policy, drafter = models
    cfg = SpecBenchConfig(policy=str(policy), drafter=str(drafter), batch_sizes=(1, 3), temperatures=(0.0, 1.0),
                          ks=(1, 2), max_new_tokens=6, repeats=2, min_prompts=2)
    data = bench_spec(cfg, tmp_path / "spec.json")
    assert capsys.readouterr() == ("", "")  # library code reports through `log`, it never prints
    saved = json.loads((tmp_path / "spec.json").read_text())
    assert saved == json.loads(json.dumps(data))
    assert (tmp_path / "spec.png").stat().st_size > 0
    assert saved["command"] == "python API: bench_spec(...)" and saved["machine"]["torch_threads"] == 1
    assert len(saved["cells"]) == 2 * 2 * (1 + 2 + 2 + 3)  # + plain/best static again
    points: dict[tuple, list[dict]] = {}
    for c in saved["cells"]:
        points.setdefault((c["batch"], c["temperature"]), []).append(c)
    assert list(points) == [(1, 0.0), (1, 1.0), (3, 0.0), (3, 1.0)]
    best = {(c["batch"], c["temperature"]): c for c in best_cells(data)}
    for (batch, temperature), cells in points.items():
        assert [c["mode"] for c in cells] == ["plain", "static", "static", "plain_again", "best_static_again",
                                              "adaptive", "table", "bandit"]
        plain, k1, k2, plain_again, best_again, adaptive, table, bandit = cells
        assert [c["k"] for c in (plain, k1, k2, plain_again)] == [0, 1, 2, 0]
        assert plain["tokens"] == plain_again["tokens"]  # same prompts and seed: plain decoding repeats itself
        for c in cells:
            assert c["prompts"] == max(1, cfg.min_prompts // batch) * batch
            assert c["tokens_per_s"] == pytest.approx(c["tokens"] / c["seconds"])
            assert 0 < c["tokens_per_s_median"] <= c["tokens_per_s"]  # the fastest of the repeats is kept
        # Each speedup is against the plain run measured last before it: the grid's, then the one again.
        for c in (plain, k1, k2):
            assert c["speedup_vs_plain"] == pytest.approx(c["tokens_per_s"] / plain["tokens_per_s"])
        for c in (plain_again, best_again, adaptive, table, bandit):
            assert c["speedup_vs_plain"] == pytest.approx(c["tokens_per_s"] / plain_again["tokens_per_s"])
        assert plain["mean_emitted_per_step"] == plain_again["mean_emitted_per_step"] == 1.0
        # per row per verify step: at least the bonus token, at most the step's drafts + 1 (k_max = 2)
        for c in (k1, k2, best_again):
            assert 1.0 <= c["mean_emitted_per_step"] <= c["k"] + 1
        for c in (adaptive, table, bandit):  # the mean chosen k over the cell's decode steps
            assert 0 <= c["k"] <= 2 and 1.0 <= c["mean_emitted_per_step"] <= 3
        # the best static k is the grid's fastest, measured again beside the choosers
        fastest = max((k1, k2), key=lambda c: c["tokens_per_s"])
        assert best_again["k"] == fastest["k"] and best[(batch, temperature)] == fastest

    for temperature in cfg.temperatures:
        # vLLM's table, in its format: per measured batch (ranges 1-2 and 3+) the fastest of plain and each
        # static k of this temperature's grid, ties to the smaller k.
        ks = [max((c for c in points[(batch, temperature)][:3]), key=lambda c: (c["tokens_per_s"], -c["k"]))["k"]
              for batch in (1, 3)]
        for batch in (1, 3):
            table, bandit = points[(batch, temperature)][-2:]
            assert table["table"] == [[1, 2, ks[0]], [3, 3, ks[1]]]
            # FastRL's gate from the same table: off above the last range that speculates
            assert bandit["sd_batch_threshold"] == (None if ks[1] else 2 if ks[0] else 0)
            if bandit["sd_batch_threshold"] == 0:
                assert bandit["k"] == 0
        assert points[(1, temperature)][-2]["k"] == ks[0]  # at batch 1 every step looks up the first range


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


def test_bench_spec_cli(models, tmp_path, monkeypatch):
    policy, drafter = models
    args = ["bench", "spec", "--policy", str(policy), "--drafter", str(drafter), "--batch-sizes", "2",
            "--temperatures", "1.0", "--ks", "2", "--modes", "plain,static,table", "--max-new-tokens", "4",
            "--repeats", "1", "--json", str(tmp_path / "s.json")]
    monkeypatch.setattr(sys, "argv", ["respec", *args])  # what the console script sees
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "speedup" in result.output and "best static" in result.output  # the CLI prints the tables
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [c["mode"] for c in saved["cells"]] == ["plain", "static", "plain_again", "best_static_again", "table"]
    assert saved["command"] == shlex.join(["respec", *args]) and "machine" in saved


@pytest.mark.parametrize("kwargs", [{"ks": (0,)}, {"batch_sizes": ()}, {"temperatures": (-1.0,)},
                                    {"modes": ("static",)}, {"modes": ("plain", "table")},
                                    {"modes": ("plain", "oracle")}])
def test_bench_spec_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SpecBenchConfig(**kwargs)


def test_a_multi_turn_task_plays_its_environment_and_counts_the_policys_tokens(sharp_target):
    from respec.bench.spec import _timed
    from respec.engine.generate import Engine, SpecConfig
    from respec.engine.sampling import SamplingParams

    class Env:  # answers each row's first stop with three observation tokens
        def __init__(self):
            self.rows = []

        def __call__(self, row, tokens):
            self.rows.append(row)
            return [5, 6, 7] if self.rows.count(row) == 1 else None

    engine = Engine(sharp_target(8, max_positions=128))
    params = SamplingParams(temperature=1.0, max_new_tokens=30, stop_token_ids=(3,), seed=1)
    prompts = [[1, 2], [4], [2, 5, 6]]
    env = Env()
    timed = _timed(engine, [(prompts, env)], params, SpecConfig(mode="off"), repeats=1)
    again = engine.generate(prompts, params, SpecConfig(mode="off"), env=Env())
    assert env.rows and timed["tokens"] == again.num_generated
    assert again.num_generated == again.num_tokens - 3 * sum(not all(s.generated) for s in again.sequences) > 0
