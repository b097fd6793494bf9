"""Engine benchmarks: plain decoding against `transformers.generate` on the same model, and the verification
cost curve t_verify(B, n) / t_verify(B, 1) that decides when speculative decoding pays (DESIGN.md, problem 1).

`bench_engine` returns a JSON-able dict and, given a path, writes it (atomically) with a PNG beside it; it reports
progress through `log(message, fraction)` and prints nothing (`engine_tables` renders the results for the CLI).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from respec.engine.checkpoint import atomic_write_text, load_model, resolve_dtype, save_model, torch_threads
from respec.engine.generate import Engine, SpecConfig
from respec.engine.kvcache import KVCache
from respec.engine.model import ModelConfig, Transformer, init_model
from respec.engine.sampling import SamplingParams
from respec.engine.tuner import sync_device
from respec.errors import ConfigError

# A Qwen2-shaped decoder of ~27M parameters: big enough that matmuls dominate, small enough for 2 CPU cores.
BENCH_MODEL = ModelConfig(model_type="qwen2", vocab_size=4096, hidden_size=512, intermediate_size=1408,
                          num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                          max_position_embeddings=4096, tie_word_embeddings=False)


@torch.inference_mode()
def target_seconds(model: Transformer, batch: int, n: int, context: int, repeats: int,
                   gen: torch.Generator) -> float:
    """Returns the fastest seconds of one cached target forward (with lm_head) over n new tokens per row after
    `context` cached positions: the verification cost t_target(B, n)."""
    cfg = model.config
    param = next(model.parameters())
    device = param.device
    cache = KVCache.for_model(cfg, batch, context + n, param.dtype, device)
    model(torch.randint(0, cfg.vocab_size, (batch, context), generator=gen).to(device), cache)
    lengths, extent = cache.lengths.clone(), cache.extent
    ids = torch.randint(0, cfg.vocab_size, (batch, n), generator=gen).to(device)  # [B, n]
    times = []
    for i in range(repeats + 1):  # the first forward warms up and is not counted
        sync_device(device)
        t0 = time.perf_counter()
        hidden, _ = model(ids, cache)  # [B, n, H]
        model.lm_head(hidden)  # [B, n, V]: verification scores every position
        sync_device(device)
        if i:
            times.append(time.perf_counter() - t0)
        cache.set_lengths(lengths, extent=extent)  # roll back: the next repeat sees the same prefix
    return min(times)  # the least-disturbed run: preemption by other processes only ever adds time

@dataclass(frozen=True)
class EngineBenchConfig:
    """What `bench_engine` measures; the defaults are the run of docs/results.md."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)  # generate() batch sizes, ours vs transformers
    max_new_tokens: int = 64  # generated per row, on both sides (eos ignored)
    prompt_len: tuple[int, int] = (16, 64)  # prompt lengths drawn uniformly from [lo, hi]
    gen_repeats: int = 3  # timed generate runs per batch size and side (after a warm-up); the fastest is kept
    verify_batches: tuple[int, ...] = (1, 4, 16, 64)  # batch sizes of the verification cost curve
    verify_max_n: int = 9  # tokens per row verified in one forward: 1 .. verify_max_n (k = n - 1 drafts)
    verify_prefill: int = 64  # cached positions per row before the timed forwards
    verify_repeats: int = 5  # timed forwards per (batch, n); the median is kept
    model: str | None = None  # HF checkpoint directory; None = random BENCH_MODEL-shaped model
    model_config: ModelConfig = field(default_factory=lambda: BENCH_MODEL)  # used when model is None
    dtype: str | None = None  # None = fp32 on CPU, bf16 on CUDA
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads; None = torch's default. 1 is steadier on a shared machine
    compile: str = "off"  # decode steps: "off" (eager) | "on" (torch.compile) | "auto" (the faster per profiled cell)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "verify_batches"):
            sizes = getattr(self, name)
            object.__setattr__(self, name, tuple(sizes))
            if any(not isinstance(b, int) or b < 1 for b in sizes):
                raise ConfigError(f"{name} must be integers >= 1, got {list(sizes)}")
        lo, hi = self.prompt_len
        if not 1 <= lo <= hi:
            raise ConfigError(f"prompt_len must be (lo, hi) with 1 <= lo <= hi, got {self.prompt_len}")
        for name in ("max_new_tokens", "gen_repeats", "verify_max_n", "verify_prefill", "verify_repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device '{self.device}' requested but CUDA is not available: use --device cpu")
        if not self.device.startswith(("cpu", "cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:i]', got '{self.device}'")
        resolve_dtype(self.dtype, self.device)  # raises on an unknown name
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be an integer >= 1, got {self.threads}")


def machine_info(device: str) -> dict:
    """Returns what the numbers depend on: platform, cores, threads, load, library versions, device name."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "device": device,
            "device_name": name}


def _prompts(cfg: EngineBenchConfig, vocab: int, batch: int, gen: torch.Generator) -> list[list[int]]:
    lo, hi = cfg.prompt_len
    lens = torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


def _left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (input_ids, attention_mask) [B, L], left-padded as decoder-only generate() expects."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        mask[b, L - len(p):] = 1
    return ids.to(device), mask.to(device)


def _time_ours(engine: Engine, prompts: list[list[int]], params: SamplingParams,
               device: torch.device) -> tuple[float, int, list[list[int]]]:
    sync_device(device)
    t0 = time.perf_counter()
    out = engine.generate(prompts, params, SpecConfig(mode="off"))
    sync_device(device)
    return time.perf_counter() - t0, out.num_tokens, [s.tokens for s in out.sequences]


def _time_hf(hf, prompts: list[list[int]], max_new: int, pad: int,
             device: torch.device) -> tuple[float, int, list[list[int]]]:
    ids, mask = _left_pad(prompts, pad, device)
    sync_device(device)
    t0 = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                      pad_token_id=pad)
    sync_device(device)
    seconds = time.perf_counter() - t0
    new = out[:, ids.shape[1]:]  # [B, max_new]
    return seconds, new.numel(), new.tolist()


def _load(cfg: EngineBenchConfig, tmp: Path) -> tuple[Transformer, str]:
    """Returns our model and a checkpoint directory that transformers can load (the same weights)."""
    if cfg.model is not None:
        return load_model(cfg.model, cfg.dtype, cfg.device), cfg.model
    model = init_model(cfg.model_config, seed=cfg.seed)  # fp32 on CPU, then cast: same weights on both sides
    save_model(model, tmp / "model")
    return load_model(tmp / "model", cfg.dtype, cfg.device), str(tmp / "model")


def _load_hf(path: str, dtype: torch.dtype, device: str):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # generation-config chatter, not results
    transformers.logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    # Generate exactly max_new_tokens, past eos, as our side does with ignore_eos (min_new_tokens would instead
    # forbid eos and change the greedy tokens of a trained model).
    hf.generation_config.eos_token_id = None
    hf.generation_config.bos_token_id = None
    return hf


Log = Callable[..., None]  # log(message, fraction=None): progress for the caller to show


def no_progress(message: str, fraction: float | None = None) -> None:
    """The default `log` of the benchmarks: progress goes nowhere."""


def bench_engine(cfg: EngineBenchConfig | None = None, json_path: str | os.PathLike | None = None,
                 log: Log | None = None, command: str | None = None) -> dict:
    """Returns {"command", "engine_vs_hf", "verify_cost", "machine", "config"}; writes JSON + PNG if json_path is
    given. `command` is recorded as the command line that produced the results (the CLI passes its own)."""
    from respec.bench.plot import plot_bench_engine

    cfg = cfg or EngineBenchConfig()
    with torch_threads(cfg.threads):
        data = {"command": command or "python API: bench_engine(...)", **_bench_engine(cfg, log or no_progress)}
    if json_path is not None:
        write_results(data, Path(json_path), plot_bench_engine)
    return data


def _bench_engine(cfg: EngineBenchConfig, log: Log) -> dict:
    device = torch.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    machine = machine_info(cfg.device)
    steps = 2 * len(cfg.batch_sizes) + len(cfg.verify_batches) * cfg.verify_max_n
    done = 0  # of `steps`

    def progress(message: str) -> None:
        log(f"engine: {message}", done / steps)

    with tempfile.TemporaryDirectory(prefix="respec-bench-") as tmp:
        progress("loading models")
        model, path = _load(cfg, Path(tmp))
        hf = _load_hf(path, dtype, cfg.device)
        engine = Engine(model, compile=cfg.compile)
        # With compiled steps, the eager engine runs beside them on the same prompts: the compiled path's gain.
        eager = Engine(model) if cfg.compile != "off" else None
        mcfg = model.config
        pad = mcfg.pad_token_id if mcfg.pad_token_id is not None else 0
        params = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens, ignore_eos=True, seed=cfg.seed)
        warm = SamplingParams(temperature=0.0, max_new_tokens=min(8, cfg.max_new_tokens), ignore_eos=True)

        rows = []
        for batch in cfg.batch_sizes:
            prompts = _prompts(cfg, mcfg.vocab_size, batch, gen)
            progress(f"warm-up, batch {batch}")
            engine.generate(prompts, warm, SpecConfig(mode="off"))
            if eager is not None:
                eager.generate(prompts, warm, SpecConfig(mode="off"))
            _time_hf(hf, prompts, warm.max_new_tokens, pad, device)
            done += 1
            # Alternate the two sides so that load from other processes hits both alike; keep each one's best.
            runs_ours, runs_hf, runs_eager = [], [], []
            for r in range(cfg.gen_repeats):
                progress(f"batch {batch}, run {r + 1}/{cfg.gen_repeats}")
                runs_ours.append(_time_ours(engine, prompts, params, device))
                if eager is not None:
                    runs_eager.append(_time_ours(eager, prompts, params, device))
                runs_hf.append(_time_hf(hf, prompts, cfg.max_new_tokens, pad, device))
            ours, theirs = min(runs_ours, key=lambda r: r[0]), min(runs_hf, key=lambda r: r[0])
            done += 1
            ours_tps, hf_tps = ours[1] / ours[0], theirs[1] / theirs[0]
            # Greedy outputs should agree; a near-tie of a random model can flip an argmax, so this is reported,
            # not asserted.
            match = sum(a == b for a, b in zip(ours[2], theirs[2], strict=True)) / batch
            rows.append({"batch": batch, "ours_tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps,
                         "ratio": ours_tps / hf_tps, "ours_seconds": ours[0], "hf_seconds": theirs[0],
                         "tokens": ours[1], "greedy_match": match})
            if runs_eager:
                best = min(runs_eager, key=lambda r: r[0])
                rows[-1].update(eager_tokens_per_s=best[1] / best[0], compiled_vs_eager=ours_tps * best[0] / best[1])
        del hf

        curve = []
        for batch in cfg.verify_batches:
            base = None
            for n in range(1, cfg.verify_max_n + 1):
                progress(f"verify cost, batch {batch}, n {n}")
                seconds = target_seconds(model, batch, n, cfg.verify_prefill, cfg.verify_repeats, gen)
                base = seconds if n == 1 else base
                curve.append({"batch": batch, "n": n, "seconds": seconds, "ratio_to_n1": seconds / base})
                done += 1

    log("engine: done", 1.0)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    config = asdict(cfg)
    config["model_config"] = mcfg.to_hf()
    config["num_parameters"] = sum(p.numel() for p in model.parameters())
    config["dtype"] = str(dtype).removeprefix("torch.")
    return {"engine_vs_hf": rows, "verify_cost": curve, "machine": machine, "config": config}


def engine_tables(data: dict) -> list[Table]:
    """Returns the two result tables of `bench_engine` data, for the caller to print."""
    table = Table(title="Plain decoding: respec Engine vs transformers generate (greedy, tokens/s)")
    rows = data["engine_vs_hf"]
    eager = all("eager_tokens_per_s" in r for r in rows)
    for col in ("batch", "ours tok/s", "HF tok/s", "ours / HF", "greedy match") + \
            (("eager tok/s", "compiled / eager") if eager else ()):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), f"{r['ours_tokens_per_s']:.1f}", f"{r['hf_tokens_per_s']:.1f}",
                      f"{r['ratio']:.2f}x", f"{r['greedy_match']:.0%}",
                      *((f"{r['eager_tokens_per_s']:.1f}", f"{r['compiled_vs_eager']:.2f}x") if eager else ()))
    tables = [table]
    curve = data["verify_cost"]
    ns = sorted({c["n"] for c in curve})
    table = Table(title="Verification cost: t(B, n) / t(B, 1), one cached target forward over n tokens per row")
    table.add_column("batch", justify="right")
    table.add_column("n=1 ms", justify="right")
    for n in ns:
        table.add_column(f"n={n}", justify="right")
    for batch in sorted({c["batch"] for c in curve}):
        cells = {c["n"]: c for c in curve if c["batch"] == batch}
        table.add_row(str(batch), f"{cells[1]['seconds'] * 1e3:.1f}", *(f"{cells[n]['ratio_to_n1']:.2f}" for n in ns))
    return [*tables, table]


def write_results(data: dict, path: Path, plot: Callable[[dict, Path], Path]) -> tuple[Path, Path]:
    """Writes data as JSON at `path` and `plot(data, png)` at the same stem + .png, each atomically; returns both."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path, plot(data, path.with_suffix(".png"))
