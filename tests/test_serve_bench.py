"""Tests of respec/serve/bench.py (`respec bench serve`): a tiny model served on loopback under 1 and 2 concurrent
streaming clients; the measurements are consistent, the JSON and plot are written, the table is printed and
every server is stopped afterwards."""

import json
import socket
import threading

import pytest
from typer.testing import CliRunner

from respec.bench.report import render_results
from respec.cli import app
from respec.engine.generate import Engine, SpecConfig
from respec.errors import ConfigError
from respec.serve.bench import ServeBenchConfig, bench_serve, offline_level, percentile, serve_table
from respec.serve.server import ServeConfig, serving_in_thread

SERVER_THREADS = ("respec-engine", "respec-http", "bench-client")


def _server_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(SERVER_THREADS)]


def _check_levels(data: dict, specs: tuple[str, ...], clients: tuple[int, ...], requests: int) -> None:
    assert [(lv["spec"], lv["clients"]) for lv in data["levels"]] == [(s, c) for s in specs for c in clients]
    for lv in data["levels"]:
        assert lv["requests"] == lv["clients"] * requests and lv["tokens"] >= lv["requests"]
        assert lv["tokens_per_s"] == pytest.approx(lv["tokens"] / lv["wall_s"])
        assert 0 < lv["latency_p50_s"] <= lv["latency_p99_s"] <= lv["wall_s"]
        assert 0 < lv["ttft_p50_s"] <= lv["ttft_p99_s"] <= lv["latency_p99_s"]
        assert lv["ttft_p50_s"] <= lv["latency_p50_s"]
        assert sum(lv["finish"].values()) == lv["requests"]
        # the server's counters over the level, and the clients' CPU
        assert lv["steps"] >= 1 and 1 <= lv["mean_batch"] <= lv["clients"]
        assert 0 < lv["engine_busy_share"] <= 1.05 and 0 < lv["client_cpu_share"] and 0 < lv["http_cpu_share"]
        assert 0 < lv["engine_on_cpu_share"] <= 1.05


def test_serving_in_thread_frees_port_and_threads(target):
    with serving_in_thread(Engine(target, max_running=2), ServeConfig()) as url:
        port = int(url.rsplit(":", 1)[1])
        assert "respec-engine" in _server_threads()
    assert not _server_threads()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # the port is free again


def test_bench_serve_tiny(target, drafter):
    cfg = ServeBenchConfig(clients=(1, 2), requests_per_client=2, max_new_tokens=6, specs=("static", "off"),
                           clients_in_subprocess=False)  # the CLI test below runs them in a child process
    made, logged = [], []

    def make_engine(spec):
        made.append(spec)
        return Engine(target, drafter, spec=SpecConfig(mode=spec, k=3), max_running=2, max_model_len=96)

    prompts = [[1, 5, 7, 2], [3, 4], [6, 6, 6]]  # conftest's target: 8 tokens
    data = bench_serve(make_engine, prompts, cfg, log=lambda m, f=None: logged.append(m))
    assert made == ["static", "off"] and logged[-1] == "serve: done"
    _check_levels(data, ("static", "off"), (1, 2), 2)
    assert data["servers"]["static"]["speculative"]["mode"] == "static"
    assert data["servers"]["off"]["aborted_requests"] == 0
    assert not _server_threads()
    assert serve_table(data).row_count == 4
    # The largest level's requests ran offline on the same engine too (after the server stopped): all queued at
    # once, and in the clients' closed-loop pattern, whose live batch never exceeds the number of clients.
    for spec in ("static", "off"):
        level = next(lv for lv in data["levels"] if lv["spec"] == spec and lv["clients"] == 2)
        assert level["offline_tokens_per_s"] > 0 and level["closed_loop_tokens_per_s"] > 0
        assert level["vs_offline"] == level["tokens_per_s"] / level["offline_tokens_per_s"]
        assert level["vs_closed_loop"] == level["tokens_per_s"] / level["closed_loop_tokens_per_s"]
        assert level["closed_loop_vs_offline"] == level["closed_loop_tokens_per_s"] / level["offline_tokens_per_s"]
        assert 1 <= level["closed_loop_mean_batch"] <= 2 and 1 <= level["offline_mean_batch"] <= 2
        assert 0 < level["closed_loop_on_cpu_share"] <= 1.05
        assert all("vs_offline" not in lv for lv in data["levels"] if lv["clients"] == 1)


def test_offline_closed_loop_runs_each_clients_requests_one_after_another(target, drafter):
    """The closed-loop baseline holds at most one request per client at a time, generates the same seeded tokens
    as all queued at once, and needs at least as many steps."""
    cfg = ServeBenchConfig(clients=(2,), requests_per_client=3, max_new_tokens=6, clients_in_subprocess=False)
    engine = Engine(target, drafter, spec=SpecConfig(mode="off"), max_running=6, max_model_len=96)
    prompts = [[1, 5, 7, 2], [3, 4], [6, 6, 6]]
    queued, closed = (offline_level(engine, prompts, 2, cfg, closed_loop=c) for c in (False, True))
    assert closed["tokens"] == queued["tokens"] > 0
    assert 1 <= closed["mean_batch"] <= 2 < queued["mean_batch"] and closed["steps"] >= queued["steps"]
    assert not engine.has_unfinished_requests()


def test_config_and_percentile():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    with pytest.raises(ConfigError, match="specs"):
        ServeBenchConfig(specs=("eagle",))
    with pytest.raises(ConfigError, match="clients"):
        ServeBenchConfig(clients=(0,))


def test_cli_bench_serve_and_results_section(tiny_world, tmp_path):
    policy, drafter = tiny_world
    out = tmp_path / "results" / "serve.json"
    r = CliRunner().invoke(app, ["bench", "serve", "--policy", str(policy), "--drafter", str(drafter),
                                 "--clients", "1,2", "--requests-per-client", "1", "--max-new-tokens", "4",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "Rollout server under load" in r.output and "TTFT" in r.output
    data = json.loads(out.read_text())
    assert data["command"].startswith("respec") and data["machine"]["torch_threads"] == 1
    _check_levels(data, ("adaptive", "off"), (1, 2), 1)
    assert out.with_suffix(".png").stat().st_size > 0
    assert not _server_threads()
    page = render_results(out.parent)
    assert "## The rollout server under load" in page and "Throughput of SD vs off: adaptive" in page
    assert "in the clients' arrival pattern" in page and "of that bound" in page and "| client CPU |" in page
    assert "offline in the closed loop it was on a core" in page
    (out.parent / "serve.json").unlink()
    assert "rollout server under load" not in render_results(out.parent)
