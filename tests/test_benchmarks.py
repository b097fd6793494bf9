"""The benchmark scripts that run where CI cannot (a GPU): their CPU path, on tiny shapes, so they do not rot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("per_test_cache")
ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_train_runs_every_rollout_mode_on_a_tiny_shape(tiny_world, tmp_path, monkeypatch, capsys):
    gpu_train = load_script("gpu_train")
    policy, _ = tiny_world
    monkeypatch.setattr(sys, "argv", ["gpu_train.py", "--out", str(tmp_path), "--shape", "tiny", "--device", "cpu",
                                      "--tokenizer", str(policy), "--steps", "2", "--prompts", "2", "--group", "2",
                                      "--minibatch", "1", "--max-new-tokens", "6", "--specs", "off,static"])
    gpu_train.main()
    data = json.loads((tmp_path / "gpu_train.json").read_text())
    assert data["errors"] == {} and set(data["modes"]) == {"off", "static"}
    assert data["params"] > 0 and (tmp_path / "gpu_train.png").stat().st_size > 0
    off, static = data["modes"]["off"], data["modes"]["static"]
    assert off["steps"] == static["steps"] == 2 and off["emitted_per_step"] == 1.0 and static["k_mean"] == 4.0
    assert off["response_length"] == 6  # a random policy runs to the budget
    assert off["logprob_diff_max"] <= 1e-4  # fp32 on CPU
    assert not (tmp_path / "models").exists()  # the random checkpoints are removed
    out = capsys.readouterr().out
    assert "vs off" in out and "1.00x" in out


def test_update_padding_times_both_modes_on_the_tiny_world(tiny_world, tmp_path, monkeypatch, capsys):
    update_padding = load_script("update_padding")
    policy, _ = tiny_world
    out = tmp_path / "update_padding.json"
    monkeypatch.setattr(sys, "argv", ["update_padding.py", "--policy", str(policy), "--prompts", "4", "--group", "2",
                                      "--minibatch", "2", "--max-new-tokens", "8", "--rounds", "2", "--json", str(out)])
    update_padding.main()
    data = json.loads(out.read_text())
    assert set(data["median_s"]) == {"padded", "packed"} and all(len(v) == 2 for v in data["seconds"].values())
    assert 0 <= data["padding_fraction"] < 1 and data["speedup"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "packed is" in capsys.readouterr().out


def test_update_contention_times_the_update_beside_a_load(tiny_world, tmp_path, monkeypatch, capsys):
    update_contention = load_script("update_contention")
    policy, _ = tiny_world
    out = tmp_path / "update_contention.json"
    monkeypatch.setattr(sys, "argv", ["update_contention.py", "--policy", str(policy), "--rows", "4",
                                      "--minibatches", "1", "--rounds", "1", "--loads", "thread-small",
                                      "--json", str(out)])
    update_contention.main()
    data = json.loads(out.read_text())
    assert set(data["median_s"]) == {"alone", "thread-small"} and data["vs_alone"]["alone"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "x alone" in capsys.readouterr().out
