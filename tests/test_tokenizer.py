import json
import random

import pytest
from transformers import AutoTokenizer

from respec.errors import CheckpointError
from respec.world.tasks import ArithmeticTask, CountdownTask
from respec.world.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer


def _task_texts(n=300):
    rng = random.Random(0)
    texts = []
    for task in (ArithmeticTask(), CountdownTask()):
        for p in task.problems(n, seed=0):
            texts.append(p.prompt + task.sft_completion(p, rng)[0])
    return texts


@pytest.fixture(scope="module")
def texts():
    return _task_texts()


@pytest.fixture(scope="module")
def tokenizer(texts):
    return build_tokenizer(texts, vocab_size=256)


def test_special_token_ids(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert len(tokenizer) <= 256


def test_round_trip_is_exact(tokenizer, texts):
    held_out = _task_texts(50)  # other completions of the same tasks
    for text in texts + held_out + ["  two  spaces\n\n\ttab . , ! ~ `{}` \\boxed{x}\r\n", "Q: 1+2=?\n"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert 0 not in ids  # encode adds no special tokens


def test_digits_are_single_tokens(tokenizer):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("Q: 1234567890+42=?\n"))
    digit_pieces = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert digit_pieces == list("1234567890") + ["4", "2"]


def test_bpe_compresses_task_text(tokenizer, texts):
    n_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    assert n_tokens < 0.8 * sum(len(t) for t in texts)


def test_saved_tokenizer_loads_with_identical_ids(tokenizer, texts, tmp_path):
    tokenizer.save_pretrained(tmp_path / "plain")
    save_tokenizer(tokenizer, tmp_path / "portable")
    config = json.loads((tmp_path / "portable" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    for loaded in (
        AutoTokenizer.from_pretrained(tmp_path / "plain"),
        AutoTokenizer.from_pretrained(tmp_path / "portable"),
        load_tokenizer(tmp_path / "portable"),
    ):
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
        for text in texts[:100]:
            assert loaded.encode(text) == tokenizer.encode(text)
            assert loaded.decode(loaded.encode(text)) == text


def test_tokenizer_in_a_policy_directory_keeps_its_own_pre_tokenizer(tokenizer, texts, tmp_path):
    """Beside a Qwen2 config.json, transformers 5's AutoTokenizer builds a Qwen2Tokenizer with Qwen2's regex
    pre-tokenizer instead of ours (digits split differently, one more token): load_tokenizer must not."""
    from respec.engine.checkpoint import save_model
    from respec.engine.model import ModelConfig, init_model

    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    save_tokenizer(tokenizer, tmp_path / "tok")
    files = {f.name: f.read_text() for f in (tmp_path / "tok").iterdir()}
    policy = save_model(init_model(cfg), tmp_path / "policy", extra_files=files)
    loaded = load_tokenizer(policy)
    assert len(loaded) == len(tokenizer)
    for text in ["Q: 623-141=?\n", *texts[:100]]:
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load tokenizer") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
