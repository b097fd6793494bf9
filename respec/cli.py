"""The `respec` command line: thin wrappers that map flags onto the library's dataclasses and functions.

User errors (`RespecError`) are printed as one line, `error: <message>`, with exit code 2 and no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from respec.errors import ConfigError, PromptError, RespecError
from respec.world.tasks import DEFAULT_TASK

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="respec: exact, adaptive speculative decoding for RL rollouts (ReSpec).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; results go to JSON with a PNG beside it.")
app.add_typer(bench_app, name="bench")


def _numbers(text: str, flag: str, kind: type = int) -> tuple:
    """Returns the numbers of a comma-separated flag value like "1,8,32" (kind=int) or "0,0.7,1.0" (float)."""
    example = "1,8,32" if kind is int else "0,0.7,1.0"
    try:
        values = tuple(kind(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers like {example}, got '{text}'") from None
    if not values:
        raise ConfigError(f"{flag} is empty: give comma-separated numbers like {example}")
    return values


def _ints(text: str, flag: str) -> tuple[int, ...]:
    return _numbers(text, flag, int)


def _console() -> Console:
    """The console of a command's results on stdout: long lines (paths) are not wrapped, so they copy whole."""
    return Console(soft_wrap=True)


@contextmanager
def _progress() -> Iterator[Callable[..., None]]:
    """Yields a `log(message, fraction=None)` callback for library code, drawn as rich progress bars on stderr
    (stdout stays for results that scripts capture): one bar per phase (the message's first word), plain lines
    for messages without a fraction."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        tasks: dict[str, int] = {}

        def log(message: str, fraction: float | None = None) -> None:
            if fraction is None:
                bar.console.print(message, highlight=False)
                return
            phase = message.split()[0]
            if phase not in tasks:
                tasks[phase] = bar.add_task(message, total=1.0)
            bar.update(tasks[phase], completed=fraction, description=message)

        yield log


def _command() -> str:
    """Returns the command line being run, as the benchmarks record it in their JSON."""
    import shlex

    return shlex.join(["respec", *sys.argv[1:]])


@bench_app.command("engine")
def bench_engine_cmd(
    batch_sizes: str = typer.Option("1,8,32", help="generate() batch sizes, ours vs transformers"),
    max_new_tokens: int = typer.Option(64, help="tokens generated per row"),
    repeats: int = typer.Option(3, help="timed generate runs per batch size and side; the fastest is kept"),
    verify_batches: str = typer.Option("1,4,16,64", help="batch sizes of the verification cost curve"),
    verify_max_n: int = typer.Option(9, help="largest number of tokens per row in one verify forward"),
    verify_repeats: int = typer.Option(5, help="timed forwards per (batch, n); the median is kept"),
    model: Path | None = typer.Option(None, help="HF checkpoint directory (default: a random ~27M Qwen2 model)"),
    dtype: str | None = typer.Option(None, help="fp32 | bf16 | fp16 (default fp32 on CPU, bf16 on CUDA)"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    compile: str = typer.Option("off", help="decode steps: off (eager) | on (torch.compile) | auto (the faster path per batch bucket and k, profiled once per machine)"),
    seed: int = typer.Option(0),
    json_path: Path = typer.Option(Path("runs/bench/engine.json"), "--json", help="where the results go"),
) -> None:
    """Plain decoding vs transformers generate, and the verification cost t(B, n) / t(B, 1)."""
    from respec.bench.engine import EngineBenchConfig, bench_engine, engine_tables

    cfg = EngineBenchConfig(batch_sizes=_ints(batch_sizes, "--batch-sizes"), max_new_tokens=max_new_tokens,
                            gen_repeats=repeats, verify_batches=_ints(verify_batches, "--verify-batches"),
                            verify_max_n=verify_max_n, verify_repeats=verify_repeats,
                            model=str(model) if model is not None else None, dtype=dtype, device=device,
                            threads=threads, compile=compile, seed=seed)
    with _progress() as log:
        data = bench_engine(cfg, json_path, log=log, command=_command())
    console = _console()
    console.print(*engine_tables(data))
    console.print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


@app.command()
def plot(
    paths: list[Path] = typer.Argument(..., help="a JSONL metrics file, or `respec train` run directories"),
    out: Path | None = typer.Option(None, help="PNG to write (default: beside the JSONL; RUN_DIR/metrics.png for "
                                               "one run, runs.png beside the first of several)"),
) -> None:
    """Plot every numeric metric of a JSONL file, one panel per key, against "step" (or the line index); given
    run directories, overlay the runs: reward, held-out accuracy, response length, seconds per step."""
    from respec.bench.plot import plot_metrics, plot_runs

    if any(p.is_dir() for p in paths):
        default = paths[0] / "metrics.png" if len(paths) == 1 else paths[0].parent / "runs.png"
        png = plot_runs(paths, out or default)
    elif len(paths) == 1:
        png = plot_metrics(paths[0], out)
    else:
        raise ConfigError("give one JSONL file, or one or more run directories to overlay")
    _console().print(f"wrote {png}")


def _prompts(text: str) -> list[list[int]]:
    """Returns the prompts of "1,2,3;4,5" (prompts separated by ';', token ids by ',')."""
    try:
        prompts = [[int(t) for t in part.split(",") if t.strip()] for part in text.split(";")]
    except ValueError:
        raise PromptError(f"--prompt-ids must be token ids like 1,2,3 (';' between prompts), got '{text}'") from None
    if any(not p for p in prompts):
        raise PromptError(f"--prompt-ids holds an empty prompt: '{text}'")
    return prompts


@app.command()
def generate(
    model: Path = typer.Option(..., help="HF checkpoint directory of the target"),
    drafter: Path | None = typer.Option(None, help="EAGLE-3 drafter directory (enables the speculative modes)"),
    prompt_ids: str | None = typer.Option(None, help="prompt token ids, e.g. 1,2,3 (';' separates prompts)"),
    prompt: list[str] = typer.Option([], help="prompt text (repeatable), encoded by the model's tokenizer"),
    prompts_file: Path | None = typer.Option(None, help="text file with one prompt per line"),
    temperature: float = typer.Option(1.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0, help="0 = off"),
    max_new_tokens: int = typer.Option(64),
    seed: int = typer.Option(0),
    k: int = typer.Option(4, help="draft tokens per step (static mode)"),
    k_max: int = typer.Option(8, help="largest draft length the tuner may pick (adaptive mode)"),
    mode: str | None = typer.Option(None, help="off | static | adaptive (default: adaptive with a drafter, else off)"),
    dtype: str | None = typer.Option(None, help="fp32 | bf16 | fp16"),
    device: str = typer.Option("cpu"),
    compile: str = typer.Option("off", help="decode steps: off (eager) | on (torch.compile) | auto (the faster path per batch bucket and k, profiled once per machine)"),
) -> None:
    """Generate from a checkpoint (optionally with a drafter): token ids in and out (--prompt-ids), or text in
    and out through the checkpoint's tokenizer (--prompt / --prompts-file)."""
    from respec.engine.checkpoint import load_model
    from respec.engine.generate import Engine, SpecConfig
    from respec.engine.sampling import SamplingParams

    # Validate every flag before the (slow) checkpoint load.
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            seed=seed)
    spec = SpecConfig(mode=mode or ("adaptive" if drafter is not None else "off"), k=k, k_max=k_max)
    texts = list(prompt)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise PromptError(f"{prompts_file}: prompts file does not exist")
        texts += [line for line in prompts_file.read_text().splitlines() if line.strip()]
    if (prompt_ids is None) == (not texts):
        raise PromptError("give either --prompt-ids or --prompt/--prompts-file (one of the two)")
    tokenizer = None
    if texts:
        from respec.world.prompts import encode_prompt
        from respec.world.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model)
        prompts = [encode_prompt(tokenizer, t.replace("\\n", "\n")) for t in texts]
    else:
        prompts = _prompts(prompt_ids)
    target = load_model(model, dtype, device)
    draft = None
    if drafter is not None:
        from respec.engine.drafter import load_drafter

        draft = load_drafter(drafter, target)
    out = Engine(target, draft, compile=compile).generate(prompts, params, spec)
    for i, seq in enumerate(out.sequences):
        if tokenizer is not None:
            typer.echo(f"{i}: {tokenizer.decode(seq.tokens, skip_special_tokens=True)!r} ({seq.finish_reason})")
        else:
            typer.echo(f"{i}: {','.join(map(str, seq.tokens))} ({seq.finish_reason})")
    typer.echo(f"{out.num_tokens} tokens in {out.seconds:.3f} s ({out.tokens_per_s:.1f} tokens/s, "
               f"{out.mean_emitted_per_step:.2f} tokens per row per verify step, mean k {out.mean_k:.2f})", err=True)



@app.command()
def serve(
    model: Path = typer.Option(..., help="HF checkpoint directory of the target (the policy)"),
    drafter: Path | None = typer.Option(None, help="EAGLE-3 drafter directory (needed unless --spec off)"),
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default: give 0.0.0.0 to expose it)"),
    port: int = typer.Option(30000),
    api_key: str | None = typer.Option(None, help="require `Authorization: Bearer KEY` on every route but /health"),
    max_running: int = typer.Option(128, help="requests decoding at once (slots); more wait in a queue"),
    max_pending: int = typer.Option(4096, help="requests queued or running at once; more are answered 503"),
    spec: str | None = typer.Option(None, help="off | static | adaptive (default: adaptive with a drafter, else off)"),
    k: int = typer.Option(4, help="draft tokens per step (static mode)"),
    k_max: int = typer.Option(8, help="largest draft length the tuner may pick (adaptive mode)"),
    compile: str = typer.Option("off", help="decode steps: off (eager) | on (torch.compile) | auto (the faster path per batch bucket and k, profiled once per machine)"),
    max_model_len: int | None = typer.Option(None, help="prompt + generated tokens per request (default: the model's context)"),
    served_model_name: str | None = typer.Option(None, help="the `model` of OpenAI responses (default: the --model path)"),
    dtype: str | None = typer.Option(None, help="fp32 | bf16 | fp16"),
    device: str = typer.Option("cpu"),
) -> None:
    """Serve rollouts over HTTP: SGLang's /generate (and its weight-update and control routes) and OpenAI's
    /v1/completions, batched continuously by one engine thread."""
    from respec.engine.checkpoint import load_model
    from respec.engine.generate import Engine, SpecConfig
    from respec.serve.protocol import ServeLimits
    from respec.serve.server import ServeConfig, run_server

    spec_config = SpecConfig(mode=spec or ("adaptive" if drafter is not None else "off"), k=k, k_max=k_max)
    if spec_config.mode not in ("off", "static", "adaptive"):
        raise ConfigError(f"--spec must be off, static or adaptive, got '{spec_config.mode}'")
    if spec_config.mode != "off" and drafter is None:
        raise ConfigError(f"--spec {spec_config.mode} needs --drafter (or give --spec off)")
    config = ServeConfig(host=host, port=port, api_key=api_key, model_name=served_model_name or str(model),
                         model_path=str(model), limits=ServeLimits(max_pending=max_pending))
    encode = decode = None
    if (model / "tokenizer.json").is_file() or (model / "tokenizer_config.json").is_file():
        from respec.world.prompts import encode_prompt
        from respec.world.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model)

        def encode(text: str) -> list[int]:
            return encode_prompt(tokenizer, text)

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

    target = load_model(model, dtype, device)
    draft = None
    if drafter is not None:
        from respec.engine.drafter import load_drafter

        draft = load_drafter(drafter, target)
    engine = Engine(target, draft, spec=spec_config, max_running=max_running, max_model_len=max_model_len,
                    compile=compile)
    typer.echo(f"serving {model} on http://{host}:{port} (spec {spec_config.mode}, {max_running} slots, "
               f"{'text and token ids' if encode else 'token ids only'}{', API key required' if api_key else ''})",
               err=True)
    run_server(engine, config, encode, decode)


@bench_app.command("spec")
def bench_spec_cmd(
    policy: Path | None = typer.Option(None, help="policy directory (default: build/reuse the embedded policy)"),
    drafter: Path | None = typer.Option(None, help="drafter directory (default: build/reuse the default drafter)"),
    task: str = typer.Option(DEFAULT_TASK, help="task whose held-out problems are the prompts"),
    batch_sizes: str = typer.Option("1,4,16,64"),
    temperatures: str = typer.Option("0,0.7,1.0"),
    ks: str = typer.Option("1,2,4,6,8", help="static draft lengths; the choosers pick among them (tuner: 0..max)"),
    modes: str = typer.Option("plain,static,adaptive,table,bandit",
                              help="cells to run: plain, static (each k), adaptive (our tuner), table (vLLM's "
                                   "batch-size table from this run's grid), bandit (TLT/FastRL's bandit)"),
    max_new_tokens: int = typer.Option(64),
    repeats: int = typer.Option(2, help="timed runs per cell; the fastest is kept, the median reported beside it"),
    threads: int | None = typer.Option(1, help="torch CPU threads"),
    compile: str = typer.Option("off", help="decode steps: off (eager) | on (torch.compile) | auto (the faster path per batch bucket and k, profiled once per machine)"),
    device: str = typer.Option("cpu"),
    dtype: str | None = typer.Option(None),
    json_path: Path = typer.Option(Path("runs/bench/spec.json"), "--json", help="where the results go"),
) -> None:
    """Speculative vs plain decoding on the same engine, prompts and seeds: static k, our tuner, vLLM's table and
    TLT's bandit; tokens/s and speedup."""
    from respec.bench.spec import SpecBenchConfig, bench_spec, spec_tables

    cfg = SpecBenchConfig(policy=str(policy) if policy else None, drafter=str(drafter) if drafter else None,
                          task=task, batch_sizes=_ints(batch_sizes, "--batch-sizes"),
                          temperatures=_numbers(temperatures, "--temperatures", float), ks=_ints(ks, "--ks"),
                          modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
                          max_new_tokens=max_new_tokens, repeats=repeats, threads=threads, compile=compile,
                          device=device, dtype=dtype)
    with _progress() as log:
        data = bench_spec(cfg, json_path, log=log, command=_command())
    console = _console()
    console.print(*spec_tables(data))
    console.print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


@bench_app.command("serve")
def bench_serve_cmd(
    policy: Path | None = typer.Option(None, help="policy directory (default: build/reuse the embedded policy)"),
    drafter: Path | None = typer.Option(None, help="drafter directory (default: build/reuse the default drafter)"),
    task: str = typer.Option("arithmetic", help="task whose held-out problems are the prompts (a single-turn one: "
                             "the server's clients play no environment)"),
    clients: str = typer.Option("1,16,64", help="concurrency levels: clients sending at once"),
    requests_per_client: int = typer.Option(4, help="requests each client sends back to back per level"),
    max_new_tokens: int = typer.Option(96),
    temperature: float = typer.Option(1.0),
    specs: str = typer.Option("adaptive,off", help="spec modes of the server (one server each): off | static | "
                                                   "adaptive"),
    threads: int | None = typer.Option(1, help="torch CPU threads"),
    compile: str = typer.Option("off", help="decode steps: off (eager) | on (torch.compile) | auto (the faster path per batch bucket and k, profiled once per machine)"),
    device: str = typer.Option("cpu"),
    dtype: str | None = typer.Option(None),
    json_path: Path = typer.Option(Path("runs/bench/serve.json"), "--json", help="where the results go"),
) -> None:
    """The rollout server under load: concurrent streaming clients per spec setting; throughput, p50/p99 latency
    and time to first token."""
    from respec.bench.engine import machine_info, write_results
    from respec.bench.plot import plot_bench_serve
    from respec.engine.checkpoint import load_model, torch_threads
    from respec.engine.drafter import load_drafter
    from respec.engine.generate import Engine, SpecConfig
    from respec.serve.bench import ServeBenchConfig, bench_serve, serve_table
    from respec.world.defaults import resolve_models
    from respec.world.prompts import HELD_OUT_SEED, task_prompts

    levels = _ints(clients, "--clients")
    cfg = ServeBenchConfig(clients=levels, requests_per_client=requests_per_client, max_new_tokens=max_new_tokens,
                           temperature=temperature, specs=tuple(s.strip() for s in specs.split(",") if s.strip()))
    with _progress() as log, torch_threads(threads):
        policy_dir, drafter_dir = resolve_models(policy, drafter, task, log=log)
        target = load_model(policy_dir, dtype=dtype, device=device)
        draft = load_drafter(drafter_dir, target) if any(s != "off" for s in cfg.specs) else None
        prompts = task_prompts(policy_dir, task, max(levels) * requests_per_client, HELD_OUT_SEED)

        def make_engine(spec: str) -> Engine:
            return Engine(target, draft, spec=SpecConfig(mode=spec), max_running=max(levels), compile=compile)

        data = {"command": _command(), **bench_serve(make_engine, prompts, cfg, log=log),
                "machine": machine_info(device), "task": task, "policy": str(policy_dir),
                "drafter": str(drafter_dir), "max_running": max(levels), "threads": threads, "compile": compile}
    write_results(data, json_path, plot_bench_serve)
    console = _console()
    console.print(serve_table(data))
    console.print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


@bench_app.command("rollout")
def bench_rollout_cmd(
    policy: Path | None = typer.Option(None, help="policy directory (default: build/reuse the embedded policy)"),
    drafter: Path | None = typer.Option(None, help="drafter directory (default: build/reuse the default drafter)"),
    task: str = typer.Option(DEFAULT_TASK, help="task whose held-out problems are the prompts"),
    prompts: int = typer.Option(16, help="distinct prompts P"),
    samples: int = typer.Option(8, help="samples per prompt G (the rollout batch is P x G)"),
    temperature: float = typer.Option(1.0),
    max_new_tokens: int | None = typer.Option(None, help="new tokens per row (default: the task's budget, probe 512, "
                                              "arithmetic 96)"),
    ks: str = typer.Option("1,2,3,4,6,8", help="static draft lengths; the largest is every chooser's k_max"),
    repeats: int = typer.Option(3, help="timed rollouts per mode after a warm-up round; the median is kept"),
    threads: int | None = typer.Option(1, help="torch CPU threads"),
    compile: str = typer.Option("off", help="decode steps: off (eager) | on (torch.compile) | auto (the faster path per batch bucket and k, profiled once per machine)"),
    device: str = typer.Option("cpu"),
    dtype: str | None = typer.Option(None),
    json_path: Path = typer.Option(Path("runs/bench/rollout.json"), "--json", help="where the results go"),
) -> None:
    """A draining GRPO-shaped rollout: plain, each static k, vLLM's table, TLT's bandit, our tuner, the oracle."""
    from respec.bench.rollout import RolloutBenchConfig, bench_rollout, rollout_tables

    cfg = RolloutBenchConfig(policy=str(policy) if policy else None, drafter=str(drafter) if drafter else None,
                             task=task, prompts=prompts, samples=samples, temperature=temperature,
                             max_new_tokens=max_new_tokens, ks=_ints(ks, "--ks"), repeats=repeats, threads=threads,
                             compile=compile, device=device, dtype=dtype)
    with _progress() as log:
        data = bench_rollout(cfg, json_path, log=log, command=_command())
    console = _console()
    console.print(*rollout_tables(data))
    console.print(f"wrote {json_path} and {json_path.with_suffix('.png')}")


@bench_app.command("ray")
def bench_ray_cmd(
    policy: Path | None = typer.Option(None, help="policy directory (default: build/reuse the embedded policy)"),
    drafter: Path | None = typer.Option(None, help="drafter directory (default: build/reuse the default drafter)"),
    prompts: int = typer.Option(16, help="distinct prompts P per step"),
    samples: int = typer.Option(8, help="samples per prompt G (the rollout batch is P x G)"),
    max_new_tokens: int = typer.Option(96, help="completion budget"),
    k: int = typer.Option(2, help="static draft length of every rollout"),
    steps: int = typer.Option(6, help="RL steps per backend (the first is a warm-up)"),
    workers: int = typer.Option(2, help="Ray rollout workers (one thread each)"),
    repeats: int = typer.Option(3, help="timed rollouts per learner state (idle, busy)"),
    out: Path = typer.Option(Path("runs/bench/ray"), help="run directories (replaced)"),
    json_path: Path = typer.Option(Path("runs/bench/ray.json"), "--json", help="where the results go"),
) -> None:
    """The Ray backend vs the local one on the same run (phase split, Ray overhead), and a busy learner's cost to
    the rollout as a thread and as a Ray actor."""
    import json

    from respec.bench.ray import TASK, bench_config, bench_learner, bench_scale, load_average
    from respec.engine.checkpoint import atomic_write_text
    from respec.world.defaults import resolve_models

    with _progress() as log:
        policy_dir, drafter_dir = resolve_models(policy, drafter, TASK, log=log)
        config = bench_config(str(policy_dir), str(drafter_dir), prompts, samples, max_new_tokens, k)
        start = load_average()
        scale = bench_scale(config, out, steps, workers, log=log)
        learner = bench_learner(config, out, repeats, log=log)
    data = _provenance({"scale": scale, "learner": learner, "load_average_start": start,
                        "config": {"prompts": prompts, "samples": samples, "max_new_tokens": max_new_tokens, "k": k}},
                       threads=1)
    atomic_write_text(json_path, json.dumps(data, indent=2) + "\n")
    m = scale["median"]
    typer.echo(f"rollout {m['local']['rollout_s']:.2f} s local, {m['ray']['rollout_s']:.2f} s on {workers} Ray "
               f"workers ({scale['rollout_speedup']:.2f}x; {workers} plain processes at once: "
               f"{scale['shard_bound']['concurrent_speedup']:.2f}x); Ray overhead {scale['ray_overhead_share']:.1%} of a step; "
               f"busy learner costs the rollout {learner['thread']['busy_over_idle']:.2f}x as a thread, "
               f"{learner['actor']['busy_over_idle']:.2f}x as an actor; wrote {json_path}")


@app.command()
def pretrain(
    task: str = typer.Option(DEFAULT_TASK, help="synthetic task: probe | arithmetic | chainsum | countdown | redraw"),
    out: Path | None = typer.Option(None, help="output directory (default: the cache, reused when complete)"),
    steps: int | None = typer.Option(None, help="optimiser steps (default: PretrainConfig's)"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch CPU threads (0: every core; faster on an idle machine, slower on a "
                                "busy one)"),
) -> None:
    """Train the small policy of the embedded default; prints the directory it wrote."""
    from dataclasses import replace

    from respec.world.pretrain import PretrainConfig
    from respec.world.pretrain import pretrain as run

    cfg = PretrainConfig.for_task(task, seed=seed, num_threads=_threads(threads))
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    with _progress() as log:
        path = run(cfg, out=out, log=log)
    typer.echo(str(path))


@app.command()
def train(
    out: Path | None = typer.Option(None, help="run directory of a new run: config.yaml, metrics.jsonl, checkpoint/"),
    steps: int | None = typer.Option(None, help="RL steps in the run (default: the config's trainer.steps)"),
    config: Path | None = typer.Option(None, help="YAML file with trainer / algorithm / rollout / data sections"),
    set_: list[str] | None = typer.Option(None, "--set", help="override section.key=value, e.g. "
                                          "algorithm.clip_high=0.28 (repeatable)"),
    resume: Path | None = typer.Option(None, help="continue the run in this directory from its last checkpoint"),
    model: Path | None = typer.Option(None, help="policy directory with its tokenizer (default: the embedded one)"),
    drafter: Path | None = typer.Option(None, help="EAGLE-3 drafter of --model (needed unless --spec off)"),
    task: str | None = typer.Option(None, help="probe | arithmetic | chainsum | countdown | jsonl | redraw (default: "
                                    "the config's, probe); rollout.max_new_tokens defaults to the task's budget"),
    data: Path | None = typer.Option(None, help="GSM8K-style .jsonl or verl .parquet file (implies --task jsonl)"),
    spec: str | None = typer.Option(None, help="speculative decoding of rollouts: off | static | adaptive"),
) -> None:
    """GRPO on the speculative engine; with no other flag, trains the embedded default policy (built or reused)."""
    from respec.rl.config import load_config
    from respec.rl.trainer import CHECKPOINT, METRICS, Trainer

    overrides = _overrides(set_)
    if data is not None and task is None:
        task = "jsonl"  # --data names a jsonl file
    flags = {"trainer.steps": steps, "trainer.model": model, "rollout.drafter": drafter, "data.task": task,
             "data.path": data, "rollout.spec": spec}
    overrides.update({k: str(v) for k, v in flags.items() if v is not None})
    with _progress() as log:
        if resume is not None:
            if out is not None or config is not None:
                raise ConfigError("--resume continues a run with its saved config: drop --out and --config "
                                  "(--steps and --set still apply)")
            trainer = Trainer.resume(resume, overrides=overrides)
            log(f"resuming {resume} at step {trainer.global_step}")
        else:
            if out is None:
                raise ConfigError("give --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
            trainer = Trainer.start(load_config(config, overrides), out, log=log)
        try:
            trainer.train(log=log)
        finally:
            trainer.close()
    run = trainer.run_dir
    typer.echo(f"metrics: {run / METRICS}; checkpoint: {run / CHECKPOINT} (step {trainer.global_step})")


def _overrides(items: list[str] | None) -> dict[str, str]:
    """Returns the `--set section.key=value` flags as {"section.key": "value"}."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes section.key=value, e.g. algorithm.clip_high=0.28, got '{item}'")
        overrides[key.strip()] = value.strip()
    return overrides


@app.command()
def experiment(
    out: Path = typer.Option(Path("runs/experiment"), help="directory of the runs (OUT/CONFIG/seedS, replaced)"),
    steps: int = typer.Option(60, help="RL steps per run"),
    seeds: str = typer.Option("0,1,2", help="comma-separated trainer seeds"),
    configs: str | None = typer.Option(None, help="comma-separated configurations (default: the five, no_sd, "
                                       "naive_sd, adaptive_frozen, online_kd, respec; also respec_update: the "
                                       "learner only beside updates)"),
    json_path: Path | None = typer.Option(None, "--json", help="report JSON (default OUT/experiment.json)"),
    config: Path | None = typer.Option(None, help="YAML run config every configuration starts from"),
    set_: list[str] | None = typer.Option(None, "--set", help="override section.key=value for every run "
                                          "(repeatable), e.g. data.prompts_per_step=8"),
    report_only: bool = typer.Option(False, help="rebuild the report and plot from the runs already in --out "
                                                 "(e.g. of an interrupted experiment) without training"),
) -> None:
    """ReSpec's experiment: the same RL run without SD, with naive SD, adaptive SD, online KD and ReSpec."""
    from respec.bench.experiment import DEFAULT_CONFIGS, report_from_runs, run_experiment, write_report
    from respec.bench.plot import plot_experiment
    from respec.rl.config import load_config

    base = load_config(config, _overrides(set_))
    names = DEFAULT_CONFIGS if configs is None else tuple(c.strip() for c in configs.split(",") if c.strip())
    json_path = json_path or out / "experiment.json"
    if report_only:
        report = report_from_runs(out, names, _ints(seeds, "--seeds"))
    else:
        with _progress() as log:
            report = run_experiment(base, out, steps, _ints(seeds, "--seeds"), names, log=log)
    write_report(_provenance(report, base.trainer.device, base.trainer.num_threads), json_path)
    png = plot_experiment(report, json_path.with_suffix(".png"))
    _print_experiment(report, _console())
    typer.echo(f"report: {json_path}; plot: {png}; runs: {out}")


def _provenance(data: dict, device: str = "cpu", threads: int | None = None) -> dict:
    """Returns `data` with the command line that produced it and the machine it ran on (for docs/results.md);
    `threads` is the torch thread count the work ran with (None: this process's)."""
    from respec.bench.engine import machine_info
    from respec.engine.checkpoint import torch_threads

    with torch_threads(threads):
        return {**data, "command": _command(), "machine": machine_info(device)}


def _print_experiment(report: dict, console: Console) -> None:
    """Prints the experiment's table: seconds by phase, speedups against no_sd, accuracy, drafter acceptance
    (at least 140 columns wide, so that a narrow or piped console does not wrap every cell)."""
    from rich.table import Table

    if console.width < 140:
        console = Console(width=140)
    table = Table(title=f"{report['steps']} RL steps, seeds {report['seeds']} (means; evaluation excluded)")
    for col in ("config", "wall s", "rollout s", "update s", "learner s", "speedup", "rollout x", "rollout CPU x",
                "val/accuracy", "tokens/verify k=4 start -> end"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for name, r in report["runs"].items():
        table.add_row(name, f"{r['wall_s']:.1f}", f"{r['rollout_s']:.1f}", f"{r['update_s']:.1f}",
                      f"{r['learner_s']:.1f}", f"{r.get('speedup', float('nan')):.2f}x",
                      f"{r.get('rollout_speedup', float('nan')):.2f}x",
                      f"{r['rollout_cpu_speedup']:.2f}x" if "rollout_cpu_speedup" in r else "-",
                      f"{r['start_accuracy']:.3f} -> {r['final_accuracy']:.3f}",
                      f"{r['accept_start']:.2f} -> {r['accept_end']:.2f}")
    console.print(table)
    from respec.bench.experiment import decode_split, phase_bound, run_shape, staleness
    from respec.bench.rollout import shape_table

    shapes = {name: shape for name, r in report["runs"].items() if (shape := run_shape(r)) is not None}
    if shapes:
        console.print(shape_table(shapes))

    stale = staleness(report)
    if stale is not None:
        learners = ", ".join(f"{n} {v['end']:.2f} ({v['vs_frozen']:.2f}x the frozen one)"
                             for n, v in stale["learners"].items())
        console.print(f"drafter tokens per verify step at k = 4: frozen ({stale['frozen']}) {stale['start']:.2f} -> "
                      f"{stale['end']:.2f} ({stale['change']:+.0%}); online learners at the end: {learners}")
    bound = phase_bound(report)
    if bound is not None:
        console.print(f"no_sd: the rollout is {bound['rollout_share']:.0%} of a step, so a rollout 1.5x faster gives "
                      f"at most {bound['bound']:.2f}x end to end, an instant one {bound['instant_bound']:.2f}x")
        if "decode_share" in bound:
            console.print(decode_split(bound))
    for name, checks in report.get("agreement", {}).items():
        reward = checks["critic/score/mean"]
        judged = [b for b in reward["bins"] if b["agree"] is not None]
        if judged:
            ps = ", ".join(f"{b['steps'][0]}-{b['steps'][1]}: {b['p_holm']:.2f}" for b in judged)
            console.print(f"{name} vs no_sd, training reward per {reward['bin_steps']}-step bin, paired by seed "
                          f"(Holm-corrected p): {ps}; {sum(b['agree'] for b in judged)} of {len(judged)} bins "
                          f"agree at the {reward['alpha']:.0%} level")
        elif reward.get("note"):
            console.print(f"{name} vs no_sd: {reward['note']}")


@app.command()
def report(
    results: Path = typer.Option(Path("docs/results"), help="directory of the benchmark JSON files"),
    out: Path = typer.Option(Path("docs/results.md"), help="the results page to (re)write"),
    readme: Path | None = typer.Option(Path("README.md"), help="README whose results block gets the summary table "
                                       "(between its markers); --readme '' skips it"),
) -> None:
    """Regenerate the results page's tables from the benchmark JSON files (what `make results` runs)."""
    from respec.bench.report import write_results_page

    readme = readme if readme and str(readme) not in ("", ".") else None
    typer.echo(f"wrote {write_results_page(results, out, readme)} from {results}")


@app.command("train-drafter")
def train_drafter(
    target: Path = typer.Option(..., help="target (policy) directory with its tokenizer"),
    out: Path | None = typer.Option(None, help="output directory (default: the cache, reused when complete)"),
    task: str = typer.Option(DEFAULT_TASK, help="task whose prompts the target's rollouts answer"),
    steps: int | None = typer.Option(None, help="optimiser steps (default: DistillConfig's)"),
) -> None:
    """Distil an EAGLE-3 drafter from the target's rollouts; prints the directory it wrote."""

    from respec.world.distill import DistillConfig, build_drafter

    cfg = DistillConfig.for_task(task) if steps is None else DistillConfig.for_task(task, steps=steps)
    with _progress() as log:
        path = build_drafter(target, cfg, out=out, task=task, log=log)
    typer.echo(str(path))


@app.command()
def demo(
    json_path: Path = typer.Option(Path("runs/demo/spec.json"), "--json", help="where the results go"),
    full: bool = typer.Option(False, help="the full grid of `respec bench spec` instead of the quick one"),
    train_steps: int = typer.Option(30, help="RL steps of the ReSpec-vs-no-SD training run (0 skips it)"),
    threads: int = typer.Option(0, help="torch CPU threads of a first-run policy build (0: every core, faster "
                                "on an idle 2-core machine, same weights; 1 on a busy one)"),
) -> None:
    """Build (or reuse) the embedded policy and drafter, compare speculative and plain decoding, then train the
    policy with GRPO twice, without SD and with ReSpec (adaptive SD + the online drafter learner)."""
    from dataclasses import replace

    from respec.bench.spec import SpecBenchConfig, bench_spec, spec_tables
    from respec.world.artifacts import cache_root
    from respec.world.defaults import resolve_models

    console = _console()
    console.rule("respec demo: the embedded default (policy + EAGLE-3 drafter, cached)")
    # The quick grid (T = 1, as RL samples) keeps a first run (install, policy, drafter, this, the training run)
    # within ~23 minutes on an idle 2-core machine; `--full` or `make bench` measure the whole grid.
    cfg = SpecBenchConfig() if full else SpecBenchConfig(batch_sizes=(1, 16, 64), temperatures=(1.0,),
                                                         ks=(2, 4, 6), repeats=2)
    console.print(f"cache: {cache_root()} (the first run trains the policy, ~9 min, and the drafter, ~4 min "
                  "on 2 idle CPU cores; later runs reuse them)")
    with _progress() as log:
        policy, drafter = resolve_models(cfg.policy, cfg.drafter, cfg.task, log=log, threads=_threads(threads))
    console.print(f"policy:  {policy}\ndrafter: {drafter}")
    console.rule("speculative vs plain decoding")
    with _progress() as log:
        spec = bench_spec(replace(cfg, policy=str(policy), drafter=str(drafter)), json_path, log=log,
                          command=_command())
    console.print(*spec_tables(spec))
    console.print(f"results: {json_path} and plot: {json_path.with_suffix('.png')}")
    if train_steps <= 0:
        return
    from respec.bench.experiment import run_experiment, write_report
    from respec.bench.plot import plot_experiment
    from respec.rl.config import RolloutConfig, TrainConfig, TrainerConfig

    console.rule(f"GRPO, {train_steps} steps: no SD vs ReSpec (adaptive SD + online reward-weighted drafter)")
    # Evaluations every sixth of the run draw the staleness curve: the frozen drafter (measured in the no-SD run,
    # which never uses it) against the learner's, which is published only once a candidate passes the guard, so it
    # needs some steps to pull ahead. The default length shows both and keeps a first run within ~23 minutes.
    base = TrainConfig(trainer=TrainerConfig(model=str(policy), eval_every=max(train_steps // 6, 1)),
                       rollout=RolloutConfig(drafter=str(drafter)))
    runs = json_path.parent / "train"
    with _progress() as log:
        report = run_experiment(base, runs, train_steps, (0,), ("no_sd", "respec"), log=log)
    report_path = write_report(report, runs / "experiment.json")
    png = plot_experiment(report, report_path.with_suffix(".png"))
    _print_experiment(report, console)
    console.print(f"training runs: {runs} (metrics.jsonl each; `respec plot {runs}/no_sd/seed0 {runs}/respec/seed0`)"
                  f"\nreport: {report_path}; plot: {png}")


def _threads(n: int) -> int | None:
    """--threads: 0 means every core (None to the builders); negative counts are a user error."""
    if n < 0:
        raise ConfigError(f"--threads must be >= 0 (0: every core), got {n}")
    return n or None


def main() -> None:
    """Console entry point: runs the app, printing user errors as one `error:` line (exit code 2)."""
    try:
        app()
    except RespecError as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]error:[/red] {escape(str(e))}")
        sys.exit(2)


if __name__ == "__main__":
    main()
