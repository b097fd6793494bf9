"""Checkpoint I/O: safetensors directories read and checked, atomic file and directory writes (the ones every
layer's writers use), dtype names, and the Hugging Face load/save of the target model (`Transformer`). The
drafter's layout lives in `drafter.py` and uses the same helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from respec.engine.model import ModelConfig, Transformer, fused_state, hf_state, rope_inv_freq
from respec.errors import CheckpointError, ConfigError


def cache_root() -> Path:
    """Returns where respec keeps built artifacts and profiles: $RESPEC_CACHE, or ~/.cache/respec."""
    return Path(os.environ.get("RESPEC_CACHE") or Path.home() / ".cache" / "respec")


def read_config(path: Path) -> dict:
    """Returns the parsed config.json of a checkpoint directory."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt config.json ({e})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Returns every tensor of a checkpoint directory (model.safetensors, a sharded index, or any *.safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: corrupt shard index ({e})") from None
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        hint = " (convert .bin weights to safetensors)" if list(path.glob("*.bin")) else ""
        raise CheckpointError(f"{path}: no safetensors weights found{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(path / name)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path / name}: corrupt safetensors file ({e})") from None
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], where: Path | str) -> None:
    """Raises CheckpointError naming the first tensor that holds NaN or Inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: tensor '{name}' holds NaN or Inf values")


def check_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: Path | str,
                  what: str) -> None:
    """Raises CheckpointError if `tensors` lacks a name of `expected` or holds one with another shape."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: {what} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, t in expected.items():
        if tensors[name].shape != t.shape:
            raise CheckpointError(
                f"{where}: tensor '{name}' has shape {tuple(tensors[name].shape)}, config implies {tuple(t.shape)}")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """Returns the torch dtype for a name like "bf16" or "float32"; None means fp32 on CPU, bf16 on GPU."""
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype '{dtype}': use one of {', '.join(names)}")
    return names[dtype]


def all_cores() -> int:
    """Returns the number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Runs the block with `threads` torch CPU threads (None = unchanged), restoring the count afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu") -> Transformer:
    """Returns the model stored in an HF checkpoint directory (config.json + safetensors), in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    hf = read_config(path)
    try:
        cfg = ModelConfig.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: invalid config ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    tensors = read_safetensors(path)
    check_finite(tensors, path)
    state = {k.removeprefix("model."): v for k, v in tensors.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = hf_state(model, model.state_dict())  # checked under HF's names, so errors name real tensors
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    check_tensors(expected, state, path, "checkpoint")
    target_dtype = resolve_dtype(dtype, device)
    state = fused_state(model, {k: state[k].to(target_dtype) for k in expected})
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    inv_freq, _ = rope_inv_freq(cfg)
    model.inv_freq = inv_freq
    return model.to(device).eval()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Returns `path` after replacing its content by `data` atomically: readers (and a run killed mid-write) see
    the old file or the new one, never a half-written one. Creates the parent directory. The bytes go to a temp
    file of a unique name beside `path` (same file system, so the rename is atomic; concurrent writers do not
    share it), which is removed if the write fails. No fsync: this guards against a killed process, not a
    power cut, like `commit_directory`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as f:  # not mkstemp: that creates mode 0600, and these files keep the umask's mode
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Returns `path` after replacing its content by `text` (UTF-8) atomically; see `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_directory(path: Path) -> Path:
    """Returns a fresh temp directory beside `path`; `commit_directory` moves it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def commit_directory(tmp: Path, path: Path) -> None:
    """Replaces `path` by `tmp` so readers see either the old or the new directory, never a half-written one."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def save_model(model: Transformer, path: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """Writes `model` as an HF checkpoint directory (config.json + model.safetensors) atomically; returns it."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = atomic_directory(path)
    try:
        state = {}
        for name, t in hf_state(model, model.state_dict()).items():
            if name == "lm_head.weight":
                if model.config.tie_word_embeddings:
                    continue
                state[name] = t
            else:
                state["model." + name] = t
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        hf = model.config.to_hf()
        hf["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        commit_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
