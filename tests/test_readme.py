"""The README's Python example runs as written (with a real, tiny checkpoint in place of the path)."""

import re
from pathlib import Path

from respec.engine.checkpoint import save_model
from respec.engine.model import ModelConfig, init_model


def test_readme_api_example_runs(tmp_path, capsys):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ckpt = save_model(init_model(cfg), tmp_path / "ckpt")
    exec(compile(code.replace("path/to/hf_checkpoint", str(ckpt)), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "tokens/s" in out[-1]
