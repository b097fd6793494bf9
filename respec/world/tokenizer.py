"""A small byte-level BPE tokenizer trained here on task texts, saved in the Hugging Face format.

Digits are always single tokens (a number's tokens are its digits, which arithmetic needs);
other characters merge by BPE. The pre-tokenizer is byte-level without the GPT-2 word
regex, so spaces and newlines survive exactly and decode(encode(text)) == text.

The alphabet is printable ASCII plus tab and newline plus every character of the training
texts, not all 256 bytes: that keeps the vocabulary (and the model's embedding and head)
small. Any ASCII text round-trips; a non-ASCII character round-trips only if it appeared in
the training texts (others are dropped on encode).

Encoding adds no special tokens; callers put ``bos_token_id`` in front themselves. Ids 0, 1,
2 are ``<|bos|>``, ``<|eos|>``, ``<|pad|>``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from respec.errors import CheckpointError, ConfigError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2


def build_tokenizer(texts: Iterable[str], vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """Return a BPE tokenizer of at most `vocab_size` tokens (at least the alphabet) trained on `texts`."""
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    texts = list(texts)
    ascii_chars = string.printable  # letters, digits, punctuation, space, \t \n \r \x0b \x0c
    alphabet = sorted({ch for piece, _ in byte_level.pre_tokenize_str(ascii_chars) for ch in piece})

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,  # would turn " ." into "." on decode
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Save `tokenizer` to directory `path` so that transformers 4.x and 5.x both load it."""
    tokenizer.save_pretrained(path)
    # transformers 5 records its own class name "TokenizersBackend", unknown to 4.x (vLLM, SGLang).
    config_path = Path(path) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Return the tokenizer saved in directory `path` (ours or any Hugging Face one); raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such tokenizer directory")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json or tokenizer_config.json")
    try:
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if config.get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend") and \
                (path / "tokenizer.json").is_file():
            # Load tokenizer.json as it is. AutoTokenizer would pick a class from the model's config.json
            # (transformers 5 maps model_type qwen2 to Qwen2Tokenizer) and swap in that model's pre-tokenizer.
            special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
            return PreTrainedTokenizerFast(
                tokenizer_file=str(path / "tokenizer.json"), **special,
                clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False))
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        message = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: cannot load tokenizer ({type(e).__name__}: {message})") from None
