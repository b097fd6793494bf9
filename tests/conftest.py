"""Shared test fixtures."""

import pytest
import torch

from respec.engine.model import ModelConfig, init_model


def _sharp_target(vocab: int, seed: int = 0, max_positions: int = 256):
    """Returns a tiny random Qwen2-shaped target (4 layers, hidden 32) whose weight matrices are scaled by 15,
    so its next-token distributions are far from uniform (peaky enough for acceptance and chi-square tests)."""
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    model = init_model(cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(15)
    return model.eval()


@pytest.fixture(scope="session")
def sharp_target():
    """The factory `sharp_target(vocab, seed=0, max_positions=256)` of tiny peaky random targets."""
    return _sharp_target
