"""How the embedded world's policies are prompted: the one definition of a prompt's token ids."""

from __future__ import annotations

from pathlib import Path

HELD_OUT_SEED = 424_242  # task seed of benchmark prompts, drawn apart from the RL and distillation streams (a small
# task has few distinct problems, so some also occur in pretraining data: docs/world.md)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Returns the token ids a policy is prompted with: [bos] (when the tokenizer has one) + encode(text)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(text, add_special_tokens=False)


def task_prompts(policy_dir: str | Path, task: str, n: int, seed: int) -> list[list[int]]:
    """Returns the prompt ids of `n` problems of `task` drawn with `seed`, tokenised by the policy's tokenizer."""
    from respec.world.tasks import get_task
    from respec.world.tokenizer import load_tokenizer

    tok = load_tokenizer(policy_dir)
    return [encode_prompt(tok, p.prompt) for p in get_task(task).problems(n, seed)]
