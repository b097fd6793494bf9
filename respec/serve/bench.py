"""`respec bench serve`'s load generator: concurrent streaming clients against the rollout server, per spec setting.

For each spec setting the server runs in this process (`serving_in_thread`, the machinery of `respec serve`) on a
free loopback port; after one untimed warm-up request (the adaptive tuner profiles on its first step), each
concurrency level C runs C client threads at once (in a child process, so that they do not share the server's
interpreter lock), each sending its requests back to back as streaming
`/generate` calls with token-id prompts. Per request: time to first token (the first streamed event holding at
least one token), end-to-end latency and tokens; per level: throughput (generated tokens / wall time from the
common start to the last answer) and p50 / p99 of latency and TTFT. The server is stopped before the next setting.

This module stands on `engine/` and `serve/` alone: the caller builds the engines and the prompts (the CLI takes
them from the embedded world), adds the machine it ran on, and writes the JSON and the plot.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx
import numpy as np
from rich.table import Table

from respec.engine.generate import Engine
from respec.engine.sampling import SamplingParams
from respec.errors import ConfigError, RespecError
from respec.serve.protocol import ServeLimits
from respec.serve.server import ServeConfig, serving_in_thread

Log = Callable[..., None]  # log(message, fraction=None)
SPECS = ("off", "static", "adaptive")


def _no_progress(message: str, fraction: float | None = None) -> None:
    pass


@dataclass(frozen=True)
class ServeBenchConfig:
    """What `bench_serve` measures."""

    clients: tuple[int, ...] = (1, 16, 64)  # concurrency levels: clients sending at once
    requests_per_client: int = 4  # requests each client sends back to back at every level
    max_new_tokens: int = 96
    temperature: float = 1.0
    specs: tuple[str, ...] = ("adaptive", "off")  # spec modes of the server, one server each
    seed: int = 0  # request i of a level is seeded seed + i
    request_timeout_s: float = 600.0  # a request taking longer fails the benchmark
    # The clients run in a child process, so their threads (HTTP, JSON, SSE parsing) do not take the server's
    # interpreter lock: in the server's process they measure the load generator as much as the server.
    clients_in_subprocess: bool = True

    def __post_init__(self) -> None:
        if not self.clients or any(not isinstance(c, int) or c < 1 for c in self.clients):
            raise ConfigError(f"clients must be integers >= 1, got {list(self.clients)}")
        for name in ("requests_per_client", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)}")
        if not self.specs or any(s not in SPECS for s in self.specs):
            raise ConfigError(f"specs must be among {', '.join(SPECS)}, got {list(self.specs)}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")


def percentile(xs: list[float], q: float) -> float:
    """Returns the q-th percentile (0..100) of xs, numpy's linear interpolation between order statistics, so
    p50 <= p99 <= max always holds; NaN for no values."""
    return float(np.percentile(xs, q)) if xs else float("nan")


def stream_request(client: httpx.Client, prompt: list[int], sampling: dict) -> dict:
    """Returns {"ttft_s", "latency_s", "tokens", "finish"} of one streaming /generate call; raises RespecError on
    an HTTP error or an error event in the stream."""
    t0 = time.perf_counter()
    ttft, last = None, None
    with client.stream("POST", "/generate", json={"input_ids": prompt, "sampling_params": sampling,
                                                  "stream": True}) as response:
        if response.status_code != 200:
            response.read()
            raise RespecError(f"/generate answered {response.status_code}: {response.text[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RespecError(f"/generate stream failed: {event['error'].get('message')}")
            if ttft is None and event.get("output_ids"):
                ttft = time.perf_counter() - t0
            last = event
    latency = time.perf_counter() - t0
    if last is None:
        raise RespecError("/generate streamed no event")
    tokens = len(last["output_ids"])
    finish = (last["meta_info"].get("finish_reason") or {}).get("type")
    return {"ttft_s": ttft if ttft is not None else latency, "latency_s": latency, "tokens": tokens,
            "finish": finish}


def run_level(url: str, prompts: list[list[int]], clients: int, cfg: ServeBenchConfig) -> dict:
    """Returns one concurrency level's measurements: `clients` threads start together, each sends
    cfg.requests_per_client streaming requests back to back; wall time runs from the common start to the last
    answer."""
    n = cfg.requests_per_client
    results: list[dict | None] = [None] * (clients * n)
    errors: list[BaseException] = []
    t0 = [0.0]
    start = threading.Barrier(clients + 1, action=lambda: t0.__setitem__(0, time.perf_counter()))  # before any send

    def client_thread(c: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=cfg.request_timeout_s) as client:
                start.wait()
                for r in range(n):
                    i = c * n + r
                    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                                "sampling_seed": cfg.seed + i}
                    results[i] = stream_request(client, prompts[i % len(prompts)], sampling)
        except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
            errors.append(e)
            start.abort()

    threads = [threading.Thread(target=client_thread, args=(c,), name=f"bench-client-{c}") for c in range(clients)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0[0]
    if errors:
        raise RespecError(f"a client failed at {clients} clients: {errors[0]}") from errors[0]
    done = [r for r in results if r is not None]
    tokens = sum(r["tokens"] for r in done)
    latency, ttft = [r["latency_s"] for r in done], [r["ttft_s"] for r in done]
    return {"clients": clients, "requests": len(done), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "requests_per_s": len(done) / wall,
            "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "mean_tokens": tokens / len(done),
            "finish": {f: sum(r["finish"] == f for r in done) for f in sorted({str(r["finish"]) for r in done})}}


def run_level_in_subprocess(url: str, prompts: list[list[int]], clients: int, cfg: ServeBenchConfig) -> dict:
    """Returns `run_level` run in a fresh child process (its start-up is outside the timed part)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_level, url, prompts, clients, cfg).result()


def offline_tokens_per_s(engine: Engine, prompts: list[list[int]], clients: int, cfg: ServeBenchConfig) -> float:
    """Returns the generated tokens per second of the requests of a level of `clients` clients (same prompts, seeds
    and parameters as `run_level` sends) run offline through `engine.add_request` / `step`, all queued at once."""
    n = clients * cfg.requests_per_client
    for i in range(n):
        engine.add_request(f"offline-{i}", prompts[i % len(prompts)],
                           SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                          seed=cfg.seed + i))
    tokens, t0 = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        tokens += sum(len(out.token_ids) for out in engine.step() if out.finished)
    return tokens / (time.perf_counter() - t0)


def bench_serve(make_engine: Callable[[str], Engine], prompts: list[list[int]],
                cfg: ServeBenchConfig | None = None, log: Log | None = None) -> dict:
    """Returns {"config", "levels": [{"spec", "clients", "tokens", "wall_s", "tokens_per_s", "latency_p50_s",
    "latency_p99_s", "ttft_p50_s", "ttft_p99_s", ...}], "servers": {spec: server info}}: for each spec setting,
    `make_engine(spec)` served on a loopback port, warmed up with one request, then every concurrency level.
    Each server is stopped (its threads joined) before the next starts; then the largest level's requests run
    offline on the same engine (`offline_tokens_per_s`, `vs_offline` on that level)."""
    cfg = cfg or ServeBenchConfig()
    log = log or _no_progress
    if not prompts or any(not p for p in prompts):
        raise ConfigError("bench_serve needs at least one non-empty prompt")
    levels, servers = [], {}
    total, done = len(cfg.specs) * (len(cfg.clients) + 1), 0
    for spec in cfg.specs:
        engine = make_engine(spec)
        config = ServeConfig(model_name="bench", limits=ServeLimits(max_pending=max(4096, max(cfg.clients))))
        with serving_in_thread(engine, config) as url:
            log(f"serve: spec {spec}, warm-up", done / total)
            with httpx.Client(base_url=url, timeout=cfg.request_timeout_s) as client:
                stream_request(client, prompts[0], {"max_new_tokens": cfg.max_new_tokens,
                                                    "temperature": cfg.temperature, "sampling_seed": cfg.seed})
            done += 1
            for clients in cfg.clients:
                log(f"serve: spec {spec}, {clients} clients", done / total)
                run = run_level_in_subprocess if cfg.clients_in_subprocess else run_level
                levels.append({"spec": spec, **run(url, prompts, clients, cfg)})
                done += 1
            with httpx.Client(base_url=url, timeout=30) as client:
                info = client.get("/get_server_info").json()
            servers[spec] = {k: info[k] for k in ("speculative", "max_running_requests", "compile",
                                                  "decode_steps", "aborted_requests")}
        # The largest level's requests once more, offline on the same engine (no HTTP, all queued at once): what
        # the server's scheduling and transport cost.
        clients = max(cfg.clients)
        log(f"serve: spec {spec}, offline baseline of {clients} clients' requests", done / total)
        level = next(lv for lv in levels if lv["spec"] == spec and lv["clients"] == clients)
        level["offline_tokens_per_s"] = offline_tokens_per_s(engine, prompts, clients, cfg)
        level["vs_offline"] = level["tokens_per_s"] / level["offline_tokens_per_s"]
    log("serve: done", 1.0)
    return {"config": asdict(cfg), "levels": levels, "servers": servers}


def serve_table(data: dict) -> Table:
    """Returns the table of `bench_serve` data, one row per spec setting and concurrency level."""
    table = Table(title=f"Rollout server under load: streaming /generate, up to "
                        f"{data['config']['max_new_tokens']} new tokens, {data['config']['requests_per_client']} "
                        "requests per client")
    for col in ("spec", "clients", "reqs", "tokens", "tok/s", "lat p50 s", "lat p99 s", "TTFT p50 s", "TTFT p99 s",
                "vs offline"):
        table.add_column(col, justify="left" if col == "spec" else "right")
    for lv in data["levels"]:
        table.add_row(lv["spec"], str(lv["clients"]), str(lv["requests"]), str(lv["tokens"]),
                      f"{lv['tokens_per_s']:.1f}", f"{lv['latency_p50_s']:.2f}", f"{lv['latency_p99_s']:.2f}",
                      f"{lv['ttft_p50_s']:.3f}", f"{lv['ttft_p99_s']:.3f}",
                      f"{lv['vs_offline']:.2f}x" if "vs_offline" in lv else "")
    return table
