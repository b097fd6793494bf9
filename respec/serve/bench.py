"""`respec bench serve`'s load generator: concurrent streaming clients against the rollout server, per spec setting.

For each spec setting the server runs in this process (`serving_in_thread`, the machinery of `respec serve`) on a
free loopback port; after one untimed warm-up request (the adaptive tuner profiles on its first step), each
concurrency level C runs C client threads at once (in a child process, so that they do not share the server's
interpreter lock), each sending its requests back to back as streaming
`/generate` calls with token-id prompts. Per request: time to first token (the first streamed event holding at
least one token), end-to-end latency and tokens; per level: throughput (generated tokens / wall time from the
common start to the last answer), p50 / p99 of latency and TTFT, the clients' CPU share of the machine, and from
the server's counters its decode steps, mean live batch and busy share. The server is stopped before the next
setting.

The largest level's requests then run offline on the same engine twice: all queued at once (the engine's best),
and in the clients' arrival pattern (closed loop: a client's next request queued when its previous one finishes,
with no transport), which is what any server fed by these clients can reach at best: back-to-back clients leave
slots empty while the last requests of the longest chains drain.

This module stands on `engine/` and `serve/` alone: the caller builds the engines and the prompts (the CLI takes
them from the embedded world), adds the machine it ran on, and writes the JSON and the plot.
"""

from __future__ import annotations

import json
import os
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
    answer. `client_cpu_share` is the CPU time the client threads took over the level (HTTP, SSE and JSON parsing)
    as a share of all the machine's cores over its wall time: what the load generator leaves the server."""
    n = cfg.requests_per_client
    results: list[dict | None] = [None] * (clients * n)
    errors: list[BaseException] = []
    t0 = [0.0]
    start = threading.Barrier(clients + 1, action=lambda: t0.__setitem__(0, time.perf_counter()))  # before any send

    cpu = [0.0] * clients  # each client thread's CPU seconds from the common start on

    def client_thread(c: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=cfg.request_timeout_s) as client:
                start.wait()
                cpu0 = time.thread_time()
                for r in range(n):
                    i = c * n + r
                    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                                "sampling_seed": cfg.seed + i}
                    results[i] = stream_request(client, prompts[i % len(prompts)], sampling)
                cpu[c] = time.thread_time() - cpu0
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
            "finish": {f: sum(r["finish"] == f for r in done) for f in sorted({str(r["finish"]) for r in done})},
            "client_cpu_s": sum(cpu), "client_cpu_share": sum(cpu) / (wall * (os.cpu_count() or 1))}


def run_level_in_subprocess(url: str, prompts: list[list[int]], clients: int, cfg: ServeBenchConfig) -> dict:
    """Returns `run_level` run in a fresh child process (its start-up is outside the timed part)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_level, url, prompts, clients, cfg).result()


def offline_level(engine: Engine, prompts: list[list[int]], clients: int, cfg: ServeBenchConfig,
                  closed_loop: bool = False) -> dict:
    """Returns {"tokens", "tokens_per_s", "steps", "mean_batch", "on_cpu_share"} of the requests of a level of
    `clients` clients (same prompts, seeds and parameters as `run_level` sends) run offline through
    `engine.add_request` / `step`; on_cpu_share is this thread's CPU time over the wall time (the rest it waited for
    a core: the machine's other load).

    closed_loop=False: all requests queued at once, so a freed slot is refilled at the next step until the queue
    runs dry. closed_loop=True: the clients' arrival pattern without transport: each client's next request is
    queued the moment its previous one's last output comes out of `step`, so a client's requests run one after
    another and the level ends in a drain, as it does against the server. No server can beat that pattern on this
    engine; it is the server's bound."""
    n = clients * cfg.requests_per_client
    per = cfg.requests_per_client

    def add(i: int) -> None:
        engine.add_request(f"offline-{i}", prompts[i % len(prompts)],
                           SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                          seed=cfg.seed + i))

    for i in range(0, n, per) if closed_loop else range(n):
        add(i)
    tokens, steps, rows, t0, cpu0 = 0, 0, 0, time.perf_counter(), time.thread_time()
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps, rows = steps + 1, rows + len(outs)
        for out in outs:
            if out.finished:
                tokens += len(out.token_ids)
                i = int(out.request_id.rsplit("-", 1)[1])
                if closed_loop and (i + 1) % per:  # client i // per sends its next request
                    add(i + 1)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "tokens_per_s": tokens / wall, "steps": steps, "mean_batch": rows / max(steps, 1),
            "on_cpu_share": (time.thread_time() - cpu0) / wall}


def _counters(client: httpx.Client) -> dict:
    info = client.get("/get_server_info").json()
    return {k: info[k] for k in ("decode_steps", "decode_rows", "decode_seconds", "decode_cpu_seconds",
                                 "event_loop_cpu_seconds")}


def bench_serve(make_engine: Callable[[str], Engine], prompts: list[list[int]],
                cfg: ServeBenchConfig | None = None, log: Log | None = None) -> dict:
    """Returns {"config", "levels": [{"spec", "clients", "tokens", "wall_s", "tokens_per_s", "latency_p50_s",
    "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "client_cpu_share", "steps", "mean_batch", "engine_busy_share",
    "engine_on_cpu_share", "http_cpu_share", ...}], "servers": {spec: server info}}: for each spec setting,
    `make_engine(spec)` served on a loopback port, warmed up with one request, then every concurrency level.
    From the server's counters: `steps`, `mean_batch` (requests advanced per decode step), `engine_busy_share`
    (the engine thread's time inside steps over the level's wall time), `engine_on_cpu_share` (its CPU time over
    its time inside steps: the rest it waited for the interpreter lock or a core) and `http_cpu_share` (the event
    loop thread's CPU time, as a share of all the machine's cores over the level). Each server is stopped (its
    threads joined) before the next starts; then the largest level's requests run offline on the same engine,
    all queued at once (`offline_tokens_per_s`, `vs_offline`) and in the clients' arrival pattern
    (`closed_loop_tokens_per_s`, `vs_closed_loop`: the server against its bound; `closed_loop_vs_offline`: the
    bound against all queued at once; `closed_loop_on_cpu_share`: the engine's share of time on a core there,
    against which `engine_on_cpu_share` shows what the server's own threads took from it)."""
    cfg = cfg or ServeBenchConfig()
    log = log or _no_progress
    if not prompts or any(not p for p in prompts):
        raise ConfigError("bench_serve needs at least one non-empty prompt")
    levels, servers = [], {}
    total, done = len(cfg.specs) * (len(cfg.clients) + 1), 0
    for spec in cfg.specs:
        engine = make_engine(spec)
        config = ServeConfig(model_name="bench", limits=ServeLimits(max_pending=max(4096, max(cfg.clients))))
        with serving_in_thread(engine, config) as url, \
                httpx.Client(base_url=url, timeout=cfg.request_timeout_s) as client:
            log(f"serve: spec {spec}, warm-up", done / total)
            stream_request(client, prompts[0], {"max_new_tokens": cfg.max_new_tokens,
                                                "temperature": cfg.temperature, "sampling_seed": cfg.seed})
            done += 1
            for clients in cfg.clients:
                log(f"serve: spec {spec}, {clients} clients", done / total)
                run = run_level_in_subprocess if cfg.clients_in_subprocess else run_level
                before = _counters(client)
                level = run(url, prompts, clients, cfg)
                after = _counters(client)
                delta = {k: after[k] - before[k] for k in after}
                steps, wall = delta["decode_steps"], level["wall_s"]
                level.update(steps=steps, mean_batch=delta["decode_rows"] / max(steps, 1),
                             engine_busy_share=delta["decode_seconds"] / wall,
                             engine_on_cpu_share=delta["decode_cpu_seconds"] / max(delta["decode_seconds"], 1e-9),
                             http_cpu_share=delta["event_loop_cpu_seconds"] / (wall * (os.cpu_count() or 1)))
                levels.append({"spec": spec, **level})
                done += 1
            info = client.get("/get_server_info").json()
            servers[spec] = {k: info[k] for k in ("speculative", "max_running_requests", "compile",
                                                  "decode_steps", "aborted_requests")}
        # The largest level's requests once more, offline on the same engine (no HTTP): all queued at once, what
        # the server's scheduling and transport cost; and in the clients' arrival pattern, what that pattern
        # costs by itself.
        clients = max(cfg.clients)
        log(f"serve: spec {spec}, offline baselines of {clients} clients' requests", done / total)
        level = next(lv for lv in levels if lv["spec"] == spec and lv["clients"] == clients)
        offline, closed = (offline_level(engine, prompts, clients, cfg, closed_loop=c) for c in (False, True))
        level.update(offline_tokens_per_s=offline["tokens_per_s"], offline_mean_batch=offline["mean_batch"],
                     closed_loop_tokens_per_s=closed["tokens_per_s"], closed_loop_mean_batch=closed["mean_batch"],
                     closed_loop_on_cpu_share=closed["on_cpu_share"])
        level.update(vs_offline=level["tokens_per_s"] / level["offline_tokens_per_s"],
                     vs_closed_loop=level["tokens_per_s"] / level["closed_loop_tokens_per_s"],
                     closed_loop_vs_offline=level["closed_loop_tokens_per_s"] / level["offline_tokens_per_s"])
    log("serve: done", 1.0)
    return {"config": asdict(cfg), "levels": levels, "servers": servers}


def serve_table(data: dict) -> Table:
    """Returns the table of `bench_serve` data, one row per spec setting and concurrency level; its caption holds
    the largest level against offline and against the clients' closed-loop bound."""
    bounds = [f"{lv['spec']} {lv['vs_closed_loop']:.2f}x of the closed-loop bound, which is "
              f"{lv['closed_loop_vs_offline']:.2f}x offline" for lv in data["levels"] if "vs_closed_loop" in lv]
    table = Table(title=f"Rollout server under load: streaming /generate, up to "
                        f"{data['config']['max_new_tokens']} new tokens, {data['config']['requests_per_client']} "
                        "requests per client", caption="; ".join(bounds) or None)
    for col in ("spec", "clients", "reqs", "tok/s", "lat p50 s", "lat p99 s", "TTFT p50 s", "TTFT p99 s", "batch",
                "client CPU", "vs offline"):
        table.add_column(col, justify="left" if col == "spec" else "right")
    for lv in data["levels"]:
        table.add_row(lv["spec"], str(lv["clients"]), str(lv["requests"]), f"{lv['tokens_per_s']:.1f}",
                      f"{lv['latency_p50_s']:.2f}", f"{lv['latency_p99_s']:.2f}", f"{lv['ttft_p50_s']:.3f}",
                      f"{lv['ttft_p99_s']:.3f}", f"{lv['mean_batch']:.1f}", f"{lv['client_cpu_share']:.0%}",
                      f"{lv['vs_offline']:.2f}x" if "vs_offline" in lv else "")
    return table
