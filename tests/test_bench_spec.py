"""`respec bench spec`: the SD vs plain grid on a tiny policy + drafter, its JSON, plot and CLI."""

import json

import pytest
from typer.testing import CliRunner

from respec.bench.spec import SpecBenchConfig, bench_spec, best_cells
from respec.cli import app
from respec.errors import ConfigError
from respec.world.distill import DistillConfig, build_drafter
from respec.world.pretrain import PretrainConfig, pretrain

TINY_POLICY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, steps=20,
                   warmup=2, batch_size=16, num_train_problems=200, eval_problems=4, eval_max_new_tokens=8,
                   max_seq_len=96)
TINY_DRAFT = DistillConfig(num_rollouts=8, max_new_tokens=8, steps=3, batch_size=4, warmup_steps=1, ttt_steps=2,
                           eval_prompts=2, eval_max_new_tokens=4, eval_ks=(1,))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    policy = pretrain(PretrainConfig(**TINY_POLICY), out=root / "policy", log=None)
    drafter = build_drafter(policy, TINY_DRAFT, out=root / "drafter", log=None)
    return policy, drafter


def test_bench_spec_grid_json_and_plot(models, tmp_path):
    policy, drafter = models
    cfg = SpecBenchConfig(policy=str(policy), drafter=str(drafter), batch_sizes=(1, 3), temperatures=(0.0, 1.0),
                          ks=(1, 2), max_new_tokens=6, repeats=1, min_prompts=2)
    data = bench_spec(cfg, tmp_path / "spec.json")
    saved = json.loads((tmp_path / "spec.json").read_text())
    assert (tmp_path / "spec.png").stat().st_size > 0
    assert len(saved["cells"]) == 2 * 2 * 3 and "machine" in saved
    for c in saved["cells"]:
        assert {"batch", "temperature", "mode", "k", "tokens_per_s", "speedup_vs_plain",
                "mean_emitted_per_step"} <= set(c)
        assert (c["mode"] == "plain") == (c["k"] == 0)
        if c["mode"] == "plain":
            assert c["speedup_vs_plain"] == 1.0 and c["mean_emitted_per_step"] == 1.0
        else:
            assert 1.0 <= c["mean_emitted_per_step"] <= c["k"] + 1
    assert len(best_cells(data)) == 4


def test_bench_spec_cli(models, tmp_path):
    policy, drafter = models
    result = CliRunner().invoke(app, ["bench", "spec", "--policy", str(policy), "--drafter", str(drafter),
                                      "--batch-sizes", "2", "--temperatures", "1.0", "--ks", "2",
                                      "--max-new-tokens", "4", "--repeats", "1", "--json",
                                      str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.json").exists() and "speedup" in result.output


@pytest.mark.parametrize("kwargs", [{"ks": (0,)}, {"batch_sizes": ()}, {"temperatures": (-1.0,)}])
def test_bench_spec_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SpecBenchConfig(**kwargs)
