"""bench_engine on a tiny model: runs in seconds and writes the documented JSON keys and a PNG."""

import json

import pytest

from respec.bench.engine import EngineBenchConfig, bench_engine, engine_tables
from respec.engine.model import ModelConfig
from respec.errors import ConfigError

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


# Keys whose values are timings or machine load: everything else must be the same in a rerun.
MEASURED = {"ours_tokens_per_s", "hf_tokens_per_s", "ratio", "ours_seconds", "hf_seconds", "seconds", "ratio_to_n1",
            "load_average", "load_average_end"}


def unmeasured(data):
    """Returns `data` without its measured values (dicts and lists walked)."""
    if isinstance(data, dict):
        return {k: unmeasured(v) for k, v in data.items() if k not in MEASURED}
    if isinstance(data, list):
        return [unmeasured(v) for v in data]
    return data


def test_bench_engine_writes_json_and_png(tmp_path, capsys):
    cfg = EngineBenchConfig(batch_sizes=(1, 3), max_new_tokens=4, prompt_len=(2, 6), verify_batches=(1, 2),
                            verify_max_n=3, verify_prefill=8, verify_repeats=1, gen_repeats=1,
                            model_config=TINY, threads=1)
    path = tmp_path / "out" / "engine.json"
    progress = []
    # One thread: tiny ops gain nothing from two, and on a busy shared machine an OpenMP barrier waiting for a
    # descheduled thread costs milliseconds per op.
    data = bench_engine(cfg, path, log=lambda message, fraction=None: progress.append((message, fraction)))
    assert capsys.readouterr() == ("", "")  # library code reports through `log`, it never prints
    fractions = [f for _, f in progress]
    assert all(m.startswith("engine: ") for m, _ in progress) and fractions == sorted(fractions)
    assert fractions[0] == 0 and fractions[-1] == 1.0
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))
    assert set(data) == {"command", "engine_vs_hf", "verify_cost", "machine", "config"}
    assert data["command"] == "python API: bench_engine(...)"
    assert [r["batch"] for r in data["engine_vs_hf"]] == [1, 3]
    for r in data["engine_vs_hf"]:
        assert {"batch", "ours_tokens_per_s", "hf_tokens_per_s", "ratio"} <= set(r)
        assert r["ours_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_tokens_per_s"] / r["hf_tokens_per_s"])
        assert r["tokens"] == r["batch"] * 4  # eos ignored: every row generates max_new_tokens
    assert [(c["batch"], c["n"]) for c in data["verify_cost"]] == [(b, n) for b in (1, 2) for n in (1, 2, 3)]
    for c in data["verify_cost"]:
        assert {"batch", "n", "seconds", "ratio_to_n1"} <= set(c) and c["seconds"] > 0
        assert c["ratio_to_n1"] == 1.0 if c["n"] == 1 else c["ratio_to_n1"] > 0
    assert {"platform", "cpu_count", "torch", "device_name"} <= set(data["machine"])
    assert data["machine"]["torch_threads"] == 1
    assert data["config"]["model_config"]["hidden_size"] == 32
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["engine.json", "engine.png"]  # no temp files left

    grid, curve = engine_tables(data)
    assert list(grid.columns[0].cells) == ["1", "3"] and list(curve.columns[0].cells) == ["1", "2"]
    assert list(grid.columns[3].cells) == [f"{r['ratio']:.2f}x" for r in data["engine_vs_hf"]]

    # A rerun of the same config differs only in its measurements; the command is the caller's.
    again = bench_engine(cfg, tmp_path / "again.json", command="respec bench engine --json again.json")
    assert json.loads((tmp_path / "again.json").read_text())["command"] == "respec bench engine --json again.json"
    assert unmeasured({**again, "command": None}) == unmeasured({**data, "command": None})


@pytest.mark.parametrize("kwargs", [{"batch_sizes": (0,)}, {"prompt_len": (5, 2)}, {"verify_max_n": 0},
                                    {"device": "tpu"}, {"dtype": "fp8"},
                                    {"threads": 0}])
def test_bench_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        EngineBenchConfig(**kwargs)
