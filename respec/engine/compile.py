"""Compiled decode steps: `torch.compile` of a target's whole layer stack (`run_stack`), and of the drafter's one
layer (`run_layer`).

What is compiled is the pure part of a cached forward: per layer, norms, q/k/v with RoPE, attention over the
cache (read only) and the new tokens, the output projection and the MLP. The cache writes stay outside, in eager
code after the stack, because an in-place write into a graph input makes inductor copy the whole cache on every
call; a layer reads only its own cache entries, so writing every layer's new entries after the last layer gives
the same result. One graph per stack rather than one per layer: at small batch a decode step is mostly the fixed
cost of each call into a compiled graph (guards, wrappers), paid once per step instead of once per layer.

Sizes are compiled symbolically (`dynamic=True`), so batch buckets, draft widths and attention spans share a
graph; torch still specialises sizes 1, the cache's strides and which layers feed the drafter, so a model gets a
few graphs (one token or several, one row or several, the cache read through views or gathered, with or without
the drafter's features), each compiled once.
`RESPEC_COMPILE_BACKEND` names another `torch.compile` backend (default inductor; "aot_eager" traces without
generating code, for debugging).

Compiled artifacts are cached on disk by inductor; respec points its cache at $RESPEC_CACHE/inductor (unless
TORCHINDUCTOR_CACHE_DIR is set), so a later run on the same machine loads instead of compiling.
Whether compiling pays is a property of the machine and the batch: the engine's `compile="auto"` measures it
per batch bucket and draft width at start-up (`tuner.profile_steps`, cached by `tuner.load_or_profile`) and
keeps the faster path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import torch

from respec.errors import ConfigError

COMPILE_MODES = ("auto", "off", "on")

_compiled: dict[tuple[str, str], Callable] = {}  # (backend, function) -> its compiled form


def _call(layer, args):
    return layer(*args)


def _stack(layers, x, cos, sin, cached, taps):
    aux, keys, values = [], [], []
    for i, layer in enumerate(layers):
        if taps[i]:
            aux.append(x)
        x, k, v = layer(x, cos, sin, cached[i])
        keys.append(k)
        values.append(v)
    if taps[len(layers)]:
        aux.append(x)
    return x, aux, torch.stack(keys), torch.stack(values)


def run_layer(layer: torch.nn.Module, args: tuple, compiled: bool):
    """Returns layer(*args), through the shared compiled graph when `compiled`."""
    return _compiled_fn(_call)(layer, args) if compiled else layer(*args)


def run_stack(layers, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cached: list, aux_layers: tuple[int, ...],
              compiled: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Returns (x after every layer, the aux features: x entering each layer of `aux_layers`, every layer's new
    keys [L, B, Hkv, T, D], its new values) of a cached forward whose layers read `cached[i]` and leave the cache
    alone; one compiled graph for the whole stack when `compiled` (one call per step instead of one per layer)."""
    # Bools, not the layer numbers: dynamo would trace integers as symbols and one graph would serve every tap set.
    taps = tuple(i in aux_layers for i in range(len(layers) + 1))
    return (_compiled_fn(_stack) if compiled else _stack)(layers, x, cos, sin, cached, taps)


def _compiled_fn(fn: Callable) -> Callable:
    backend = os.environ.get("RESPEC_COMPILE_BACKEND", "inductor")
    compiled = _compiled.get((backend, fn.__name__))
    if compiled is None:
        use_disk_cache()
        # Every layer kind and shape class goes through this one function: the default recompile limit (8)
        # would fall back to eager after a few classes.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 512)
        # Duck shaping gives equal sizes one symbol: a draft width of 2 would share the (static) KV-head count's
        # and be specialised, recompiling for every other width.
        torch.fx.experimental._config.use_duck_shape = False
        compiled = _compiled[(backend, fn.__name__)] = torch.compile(fn, dynamic=True, backend=backend)
    return compiled


def use_disk_cache() -> None:
    """Points inductor's on-disk cache at $RESPEC_CACHE/inductor unless the user chose a directory. Torch writes
    its default directory into TORCHINDUCTOR_CACHE_DIR the first time it looks the directory up, so that value
    counts as not chosen."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        from respec.engine.checkpoint import cache_root

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")


def compile_unavailable(device: torch.device) -> str | None:
    """Returns why `torch.compile` cannot run on `device` here, or None if it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if device.type == "cpu":
        if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
            return "inductor's CPU backend needs a C++ compiler (g++ or c++ on PATH)"
        return None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor's CUDA backend needs triton"
        return None
    return f"compiled steps support cpu and cuda devices, not {device.type}"


def check_compile_mode(mode: str, device: torch.device) -> None:
    """Raises ConfigError for an unknown mode, or for "on" where this machine cannot compile."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "on":
        why = compile_unavailable(device)
        if why is not None:
            raise ConfigError(f"compile='on' cannot work here: {why}; use compile='auto' or 'off'")
