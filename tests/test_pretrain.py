import json
import random
from collections import Counter

import pytest
import torch

import respec.world.pretrain as pretrain_mod
from respec.engine.generate import GenerationResult, SequenceOutput
from respec.errors import ConfigError
from respec.world.artifacts import MARKER, is_complete
from respec.world.pretrain import PretrainConfig, evaluate_policy, pretrain
from respec.world.prompts import encode_prompt
from respec.world.tasks import get_task
from respec.world.tokenizer import load_tokenizer

# Seconds-long: 2 layers of width 32, 40 steps, a small eval.
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, steps=40, warmup=4,
            batch_size=16, lr=3e-3, num_train_problems=400, eval_problems=8, eval_max_new_tokens=24,
            max_seq_len=128)


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
        assert sum(evaluation[mode]["finish_reasons"].values()) == TINY["eval_problems"]


def hf_greedy_evaluation(policy_dir, cfg: PretrainConfig) -> dict:
    """Returns accuracy, mean tokens, styles and finish reasons of greedy decoding on the pretraining held-out set,
    recomputed with transformers' generate and the task's scorer (no respec engine involved)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    task = cfg.make_task()
    problems = task.problems(cfg.eval_problems, seed=cfg.seed + pretrain_mod.EVAL_SEED_OFFSET)
    rewards, lengths, styles, finish = [], [], Counter(), Counter()
    for p in problems:
        ids = torch.tensor([encode_prompt(tokenizer, p.prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=cfg.eval_max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        stop = tokenizer.eos_token_id in new
        new = new[: new.index(tokenizer.eos_token_id) + 1] if stop else new
        text = tokenizer.decode(new, skip_special_tokens=True)
        rewards.append(task.score(p, text).reward)
        lengths.append(len(new))
        styles[task.style_of(p, text)] += 1
        finish["stop" if stop else "length"] += 1
    n = len(problems)
    return {"accuracy": sum(rewards) / n, "mean_tokens": sum(lengths) / n,
            "styles": {k: v / n for k, v in sorted(styles.items())}, "finish_reasons": dict(finish)}


def test_greedy_evaluation_equals_an_independent_recomputation(tiny_policy):
    """eval.json's greedy numbers are what transformers' greedy decoding scores on the same held-out problems."""
    greedy = json.loads((tiny_policy / "eval.json").read_text())["greedy"]
    ref = hf_greedy_evaluation(tiny_policy, PretrainConfig(**TINY))
    assert greedy["accuracy"] == pytest.approx(ref["accuracy"])
    assert greedy["mean_tokens"] == pytest.approx(ref["mean_tokens"])
    assert greedy["styles"] == pytest.approx(ref["styles"]) and greedy["finish_reasons"] == ref["finish_reasons"]


def scripted_engine(tokenizer, completion_of):
    """Returns an Engine stand-in that answers each prompt with completion_of(prompt text) + eos."""
    class Scripted:
        def __init__(self, policy):
            pass

        def generate(self, prompts, params, spec, env=None):
            sequences = []
            for ids in prompts:
                text = completion_of(tokenizer.decode(ids, skip_special_tokens=True))
                tokens = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
                sequences.append(SequenceOutput(tokens, [0.0] * len(tokens), "stop"))
            return GenerationResult(sequences)

    return Scripted


@pytest.mark.parametrize("policy,accuracy", [("right", 1.0), ("wrong", 0.0), ("alternating", 0.5)])
def test_evaluate_policy_scores_known_right_and_wrong_policies(tiny_policy, monkeypatch, policy, accuracy):
    """A policy that always writes the checked (correct and verified) solution scores 1, one that always writes
    the sloppy (wrong) solution scores 0, and one that alternates scores 0.5; styles follow."""
    task = get_task("arithmetic", notation=False)  # house notation: a right checked answer earns 1.0
    problems = task.problems(12, seed=5)
    index = {p.prompt: i for i, p in enumerate(problems)}
    rng = random.Random(0)

    def completion_of(prompt):
        i = index[prompt]
        style = {"right": "checked", "wrong": "sloppy", "alternating": ("checked", "sloppy")[i % 2]}[policy]
        return task.sft_completion(problems[i], rng, style=style)[0]

    monkeypatch.setattr(pretrain_mod, "Engine", scripted_engine(load_tokenizer(tiny_policy), completion_of))
    result = evaluate_policy(tiny_policy, None, task, problems, temperature=0.0, max_new_tokens=64)
    assert result["n"] == 12 and result["accuracy"] == accuracy
    assert result["finish_reasons"] == {"stop": 12} and result["stop_rate"] == 1.0
    expected_styles = {"right": {"checked": 1.0}, "wrong": {"sloppy": 1.0},
                       "alternating": {"sloppy": 0.5, "checked": 0.5}}[policy]
    assert result["styles"] == expected_styles


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
    assert a.cache_key() == b.cache_key() == PretrainConfig(num_threads=None).cache_key()  # None: every core
    assert a.cache_key() != PretrainConfig(lr=1e-3).cache_key()


def test_prompt_ids_start_with_bos(tiny_policy):
    tokenizer = load_tokenizer(tiny_policy)
    ids = encode_prompt(tokenizer, "Q: 1+2=?\n")
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids


@pytest.mark.parametrize("field,value", [
    ("num_layers", 0), ("hidden_size", 30), ("num_kv_heads", 3), ("steps", -1), ("lr", 0.0),
    ("lr", float("nan")), ("warmup", 10_000), ("vocab_size", 10), ("task", "nope"), ("style_weights", (1.0, -1.0, 1.0)),
    ("style_weights", (1.0, 1.0)), ("batch_size", 2.5), ("num_threads", 0),
])
def test_invalid_config_raises(field, value):
    with pytest.raises(ConfigError):
        PretrainConfig(**{field: value})


def test_style_of_classifies_sft_styles():
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


def test_each_synthetic_task_has_a_default_config_that_builds_its_task():
    from respec.world.tasks.countdown import CountdownTask

    assert PretrainConfig.for_task("arithmetic") == PretrainConfig()  # the embedded default's cache key is kept
    countdown = PretrainConfig.for_task("countdown", seed=3)
    assert countdown.style_weights is None and countdown.seed == 3
    assert countdown.make_task().style_weights == CountdownTask().style_weights
    with pytest.raises(ConfigError, match="style"):
        PretrainConfig(task="countdown")  # the four-style arithmetic mixture does not fit countdown's three


def test_a_long_task_gets_its_budget_a_long_context_and_length_grouped_batches():
    from respec.world.distill import DistillConfig
    from respec.world.tasks.chainsum import ChainSumTask

    chainsum = PretrainConfig.for_task("chainsum")
    assert chainsum.make_task().style_weights == ChainSumTask().style_weights
    assert (chainsum.eval_max_new_tokens, chainsum.max_seq_len) == (ChainSumTask.max_new_tokens, 1024)
    assert chainsum.length_grouping > 0 and "length_grouping" in chainsum.cache_key()
    assert chainsum.init_from == "arithmetic" and chainsum.cache_key()["init_from"] == "arithmetic"
    key = PretrainConfig().cache_key()  # the arithmetic policy keeps its cache entry
    assert "length_grouping" not in key and "init_from" not in key and "task_options" not in key
    ones = PretrainConfig.for_task("chainsum", task_options={"min_operands": 1})  # the task's parameters
    assert ones.make_task().min_operands == 1 and ones.cache_key()["task_options"] == {"min_operands": 1}
    with pytest.raises(ConfigError, match="bad options"):
        PretrainConfig.for_task("chainsum", task_options={"operands": 1})
    for bad in ("chainsum", "jsonl", "chess"):
        with pytest.raises(ConfigError, match="init_from"):
            PretrainConfig.for_task("chainsum", init_from=bad)
    assert DistillConfig.for_task("arithmetic") == DistillConfig()
    assert DistillConfig.for_task("chainsum").length_grouping > 0
    with pytest.raises(ConfigError, match="length_grouping"):
        DistillConfig(length_grouping=-1)
    assert DistillConfig.for_task("chainsum").max_new_tokens == DistillConfig.for_task("chainsum").eval_max_new_tokens \
        == ChainSumTask.max_new_tokens
    with pytest.raises(ConfigError, match="length_grouping"):
        PretrainConfig(length_grouping=-1)


def test_length_grouping_batches_similar_lengths_and_covers_each_epoch_once():
    import torch

    from respec.world.pretrain import epoch_batches

    lengths = [1 + (i * 37) % 200 for i in range(640)]
    plain = epoch_batches(lengths, 32, 0, torch.Generator().manual_seed(0))
    grouped = epoch_batches(lengths, 32, 5, torch.Generator().manual_seed(0))
    for batches in (plain, grouped):
        epoch = [next(batches) for _ in range(20)]
        assert sorted(i for b in epoch for i in b) == list(range(640)) and all(len(b) == 32 for b in epoch)

    def padded(batches):  # attention positions of one epoch
        return sum(32 * max(lengths[i] for i in b) for b in (next(batches) for _ in range(20)))

    assert padded(grouped) < 0.75 * padded(plain)


def test_held_out_prompts_are_not_trained_on_unless_the_environment_sets_the_rows():
    cfg = PretrainConfig(num_train_problems=2000)
    held, train = pretrain_mod.split_problems(cfg.make_task(), cfg)
    assert not {p.prompt for p in held} & {p.prompt for p in train} and len(train) > 1500
    # probe has one prompt per bar, nearly every one among the held-out problems: every prompt is trained on
    # (held-out rows get the evaluation's own environment draws)
    cfg = PretrainConfig.for_task("probe", num_train_problems=2000)
    held, train = pretrain_mod.split_problems(cfg.make_task(), cfg)
    assert len(train) == 2000 and {p.prompt for p in held} <= {p.prompt for p in train}
    assert cfg.cache_key()["train_prompts"] == "all" and "train_prompts" not in PretrainConfig().cache_key()
    # probe's texts changed after its first policies were built: its key names the text format, others' do not
    assert cfg.cache_key()["text_format"] == 3 and "text_format" not in PretrainConfig().cache_key()
