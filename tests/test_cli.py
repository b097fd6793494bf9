"""CLI: user errors are one `error:` line with a non-zero exit, never a traceback; plot writes a PNG."""

import json
import shlex
import sys

import pytest

from respec.cli import main
from respec.engine.checkpoint import save_model
from respec.engine.model import ModelConfig, init_model

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Returns (exit code, stdout, stderr) of `respec *args` run in-process through main()."""
    monkeypatch.setattr(sys, "argv", ["respec", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model(init_model(TINY, seed=0), tmp_path_factory.mktemp("ckpt") / "tiny")


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_missing_checkpoint_is_one_error_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", str(tmp_path / "nonexistent"),
                           "--prompt-ids", "1,2")
    assert code == 2
    assert_one_error_line(code, err, "does not exist")


def test_negative_temperature_is_one_error_line(monkeypatch, capsys, checkpoint):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", str(checkpoint), "--prompt-ids", "1,2",
                           "--temperature", "-1")
    assert_one_error_line(code, err, "temperature")


@pytest.mark.parametrize("ids, needle", [("1,x", "--prompt-ids"), ("1,2;", "empty"), ("1,999", "vocabulary")])
def test_bad_prompt_ids_are_one_error_line(monkeypatch, capsys, checkpoint, ids, needle):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", str(checkpoint), "--prompt-ids", ids)
    assert_one_error_line(code, err, needle)


def test_negative_threads_is_one_error_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--out", str(tmp_path / "p"), "--threads", "-1")
    assert_one_error_line(code, err, "--threads")
    assert not (tmp_path / "p").exists()


def test_static_mode_without_drafter_is_one_error_line(monkeypatch, capsys, checkpoint):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", str(checkpoint), "--prompt-ids", "1,2",
                           "--mode", "static")
    assert_one_error_line(code, err, "drafter")


def test_generate_prints_tokens(monkeypatch, capsys, checkpoint):
    code, out, _ = run_cli(monkeypatch, capsys, "generate", "--model", str(checkpoint), "--prompt-ids", "1,2,3;4",
                           "--max-new-tokens", "5", "--temperature", "0")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        head, rest = line.split(": ", 1)
        assert head == str(i)
        tokens = rest.split(" ")[0].split(",")
        assert 1 <= len(tokens) <= 5 and all(0 <= int(t) < TINY.vocab_size for t in tokens)


def test_bench_rejects_bad_batch_sizes(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "bench", "engine", "--batch-sizes", "1,zero",
                           "--json", str(tmp_path / "e.json"))
    assert_one_error_line(code, err, "--batch-sizes")


def test_bench_engine_prints_its_tables_and_records_its_command_line(monkeypatch, capsys, tmp_path, checkpoint):
    path = tmp_path / "e.json"
    args = ["bench", "engine", "--model", str(checkpoint), "--batch-sizes", "1", "--max-new-tokens", "2",
            "--repeats", "1", "--verify-batches", "1", "--verify-max-n", "2", "--verify-repeats", "1",
            "--threads", "1", "--json", str(path)]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    saved = json.loads(path.read_text())
    assert saved["command"] == shlex.join(["respec", *args]) and saved["machine"]["torch_threads"] == 1
    assert "Plain decoding" in out and "Verification cost" in out  # tables on stdout
    assert "engine:" in err and "engine:" not in out  # progress on stderr, where scripts capturing stdout miss it


def test_plot_writes_png(monkeypatch, capsys, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "reward": s / 10, "loss": 1 / (s + 1), "tag": "a"}) + "\n"
                               for s in range(5)))
    out = tmp_path / "plots" / "m.png"
    code, stdout, _ = run_cli(monkeypatch, capsys, "plot", str(metrics), "--out", str(out))
    assert code == 0 and str(out) in stdout.replace("\n", "")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_bad_jsonl_is_one_error_line(monkeypatch, capsys, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "reward": 1}\nnot json\n')
    code, _, err = run_cli(monkeypatch, capsys, "plot", str(metrics))
    assert_one_error_line(code, err, ":2:")


def test_generate_text_in_text_out(monkeypatch, capsys, tmp_path):
    from respec.world.tokenizer import build_tokenizer, save_tokenizer

    tok = build_tokenizer(["Q: 12+34=?\nAnswer: 46", "Q: 7*8=?\nAnswer: 56"] * 20, vocab_size=64)
    save_tokenizer(tok, tmp_path / "tok")
    files = {f.name: f.read_text() for f in (tmp_path / "tok").iterdir()}
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id)
    model = save_model(init_model(cfg, seed=0), tmp_path / "m", extra_files=files)
    (tmp_path / "prompts.txt").write_text("Q: 1+2=?\\n\n\nQ: 3*4=?\\n\n")
    code, out, err = run_cli(monkeypatch, capsys, "generate", "--model", str(model), "--prompt", "Q: 5+6=?\\n",
                             "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "6",
                             "--temperature", "0")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{i}: '") for i, line in enumerate(lines))
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", str(model))
    assert code == 2 and "either --prompt-ids or --prompt" in err and "Traceback" not in err


def test_demo_benchmarks_then_trains_no_sd_against_respec(monkeypatch, capsys, tmp_path, tiny_world):
    """`respec demo` (what `make demo` runs) on the tiny world: the SD table, then the short GRPO run twice."""
    from functools import partial

    import respec.bench.spec
    import respec.rl.config
    import respec.world.defaults as defaults

    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(defaults, "resolve_models", lambda policy, drafter, task, log=None, threads=1: tiny_world)
    # The demo's grid and RL step at a smaller size: shorter answers, 32-row rollouts, 16 held-out problems (of the
    # default task, whose environment answers the tiny policy's calls).
    monkeypatch.setattr(respec.bench.spec, "SpecBenchConfig",
                        partial(respec.bench.spec.SpecBenchConfig, max_new_tokens=16, min_prompts=8))
    data = respec.rl.config.DataConfig(prompts_per_step=4, eval_problems=16)
    monkeypatch.setattr(respec.rl.config, "TrainConfig", partial(respec.rl.config.TrainConfig, data=data))
    monkeypatch.setattr(respec.rl.config, "RolloutConfig", partial(respec.rl.config.RolloutConfig, max_new_tokens=24))
    code, out, err = run_cli(monkeypatch, capsys, "demo", "--json", str(tmp_path / "demo" / "spec.json"),
                             "--train-steps", "2")
    assert code == 0, err
    report = json.loads((tmp_path / "demo" / "train" / "experiment.json").read_text())
    assert set(report["runs"]) == {"no_sd", "respec"} and report["runs"]["respec"]["steps"] == 2
    assert (tmp_path / "demo" / "train" / "experiment.png").stat().st_size > 0
    assert (tmp_path / "demo" / "spec.png").stat().st_size > 0
    flat = out.replace("\n", "")  # rich wraps long paths at the console width
    assert "respec" in flat and "experiment.json" in flat and "speedup" in flat


def test_serve_without_drafter_in_static_mode_is_one_error_line(monkeypatch, capsys, checkpoint):
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--model", str(checkpoint), "--spec", "static")
    assert_one_error_line(code, err, "--drafter")


def test_serve_builds_the_engine_and_runs_the_server(monkeypatch, capsys, checkpoint):
    import respec.serve.server

    seen = {}
    monkeypatch.setattr(respec.serve.server, "run_server",
                        lambda engine, config, encode, decode: seen.update(engine=engine, config=config))
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--model", str(checkpoint), "--port", "0",
                           "--max-running", "4", "--max-model-len", "64", "--api-key", "k")
    assert code == 0, err
    assert seen["engine"].max_running == 4 and seen["engine"].max_model_len == 64
    assert seen["config"].host == "127.0.0.1" and seen["config"].api_key == "k"
