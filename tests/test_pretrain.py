import json

import pytest
import torch

import respec.world.pretrain as pretrain_mod
from respec.errors import ConfigError
from respec.world.artifacts import MARKER, is_complete
from respec.world.pretrain import PretrainConfig, evaluate_policy, pretrain
from respec.world.prompts import encode_prompt
from respec.world.tasks import get_task
from respec.world.tokenizer import load_tokenizer

# Seconds-long: 2 layers of width 32, 40 steps, a small eval.
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, steps=40, warmup=4,
            batch_size=16, lr=3e-3, num_train_problems=400, eval_problems=8, eval_max_new_tokens=24,
            max_seq_len=96)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A tiny policy built once for the module, in an explicit directory."""
    out = tmp_path_factory.mktemp("policy") / "tiny"
    return pretrain(PretrainConfig(**TINY), out=out, log=None)


def test_training_lowers_loss_and_writes_metrics(tiny_policy):
    rows = [json.loads(line) for line in (tiny_policy / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, TINY["steps"] + 1))
    assert {"step", "loss", "lr", "tokens_per_s", "elapsed"} <= set(rows[0])
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first
    evaluation = json.loads((tiny_policy / "eval.json").read_text())
    for mode in ("temperature_1", "greedy"):
        assert evaluation[mode]["n"] == TINY["eval_problems"]
        assert 0.0 <= evaluation[mode]["accuracy"] <= 1.0
        assert sum(evaluation[mode]["finish_reasons"].values()) == TINY["eval_problems"]


def test_saved_directory_loads_and_generates_with_transformers(tiny_policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == TINY["num_layers"]
    ids = torch.tensor([encode_prompt(tokenizer, "Q: 12+34=?\n")])
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "Q: 12+34=?\n"


def test_evaluate_policy_from_directory(tiny_policy):
    result = evaluate_policy(tiny_policy, None, "arithmetic", 4, temperature=1.0, seed=0, max_new_tokens=16)
    assert result["n"] == 4 and set(result) >= {"accuracy", "mean_tokens", "styles", "finish_reasons", "stop_rate"}
    assert abs(sum(result["styles"].values()) - 1.0) < 1e-9


def test_cache_is_reused_and_incomplete_entry_rebuilt(cache, monkeypatch):
    cfg = PretrainConfig(**{**TINY, "steps": 3, "warmup": 1})
    path = pretrain(cfg, log=None)
    assert path.parent == cache and is_complete(path)
    assert load_tokenizer(path).bos_token_id == 0

    calls = []
    real_train = pretrain_mod.train
    monkeypatch.setattr(pretrain_mod, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    assert pretrain(cfg, log=None) == path
    assert calls == []  # reused, not retrained

    (path / MARKER).unlink()  # a build killed before its marker: never trusted
    (path / "model.safetensors").write_bytes(b"garbage")
    assert pretrain(cfg, log=None) == path
    assert calls == [1] and is_complete(path)
    assert (path / "model.safetensors").stat().st_size > 100


def test_cache_key_follows_config_but_not_threads():
    a, b = PretrainConfig(), PretrainConfig(num_threads=2)
    assert a.cache_key() == b.cache_key()
    assert a.cache_key() != PretrainConfig(lr=1e-3).cache_key()


def test_prompt_ids_start_with_bos(tiny_policy):
    tokenizer = load_tokenizer(tiny_policy)
    ids = encode_prompt(tokenizer, "Q: 1+2=?\n")
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids


@pytest.mark.parametrize("field,value", [
    ("num_layers", 0), ("hidden_size", 30), ("num_kv_heads", 3), ("steps", -1), ("lr", 0.0),
    ("lr", float("nan")), ("warmup", 10_000), ("vocab_size", 10), ("task", "nope"), ("style_weights", (1.0, -1.0, 1.0)),
    ("style_weights", (1.0, 1.0)), ("batch_size", 2.5),
])
def test_invalid_config_raises(field, value):
    with pytest.raises(ConfigError):
        PretrainConfig(**{field: value})


def test_style_of_classifies_sft_styles():
    import random

    task = get_task("arithmetic")
    rng = random.Random(0)
    for p in task.problems(50, seed=1):
        for style in task.styles:
            text, _ = task.sft_completion(p, rng, style=style)
            assert task.style_of(p, text) == style


def test_progress_is_reported_through_the_callback_not_printed(tmp_path, capfd):
    """Library code prints nothing: progress and the summary reach the caller's `log` (the CLI shows them)."""
    lines = []
    pretrain(PretrainConfig(**{**TINY, "steps": 2, "warmup": 1}), out=tmp_path / "p",
             log=lambda message, fraction=None: lines.append((message, fraction)))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert any(m.startswith("policy:") for m, _ in lines)
    assert [f for _, f in lines if f is not None][-1] == 1.0
