"""`respec experiment`: the ReSpec experiment — the same RL run under five rollout configurations.

  no_sd            plain decoding (the baseline every speedup is measured against)
  naive_sd         static k = 4 drafts per step, the drafter frozen
  adaptive_frozen  the tuner picks k per step, the drafter frozen
  online_kd        adaptive + the online learner with uniform weights (plain online KD)
  respec           adaptive + the online learner with reward weights (ReSpec)
  respec_update    respec with learner.schedule=update (its learner trains only while the policy updates);
                   run on request (--configs), not by default

Every configuration runs the same seeds, steps and data through `Trainer`. The runs of one seed are interleaved
step by step in one process (`_run_interleaved`): this host's speed drifts by 10-30% over minutes, more than the
differences measured, so configurations run one after another were compared across different machine states
(sessions 3-7; section 10 of benchmarks/RESULTS.md found the rollout ratio only in alternated steps). Per run the
summary holds end-to-end and phase seconds (evaluation excluded: it is the same work in every configuration),
final held-out accuracy, and the drafter's tokens per verify step at k = 4 on held-out prompts at the start and the
end (`val/emitted_per_step_k4`, the staleness measure that does not depend on the tuner's k).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from respec.bench.plot import read_metrics
from respec.engine.checkpoint import torch_threads
from respec.errors import ConfigError
from respec.rl.config import TrainConfig
from respec.rl.trainer import METRICS, Trainer

Log = Callable[..., None]

CONFIGS: dict[str, dict[str, dict]] = {
    "no_sd": {"rollout": {"spec": "off"}},
    "naive_sd": {"rollout": {"spec": "static", "k": 4}},
    "adaptive_frozen": {"rollout": {"spec": "adaptive"}},
    "online_kd": {"rollout": {"spec": "adaptive"}, "learner": {"mode": "async", "weighting": "uniform"}},
    "respec": {"rollout": {"spec": "adaptive"}, "learner": {"mode": "async", "weighting": "reward"}},
    # not among the five by default: ReSpec with its learner kept off the cores while the engine runs
    "respec_update": {"rollout": {"spec": "adaptive"},
                      "learner": {"mode": "async", "weighting": "reward", "schedule": "update"}},
}
FIVE = ("no_sd", "naive_sd", "adaptive_frozen", "online_kd", "respec")  # the experiment the issue names
SUMMARY_KEYS = ("wall_s", "rollout_s", "update_s", "learner_s", "final_accuracy", "accept_start", "accept_end")
EMITTED = "val/emitted_per_step_k4"


def config_for(base: TrainConfig, name: str, seed: int, steps: int) -> TrainConfig:
    """Returns `base` changed into configuration `name` for one seed and run length."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown experiment configuration {name!r}; choose among {', '.join(CONFIGS)}")
    sections = {section: replace(getattr(base, section), **changes) for section, changes in CONFIGS[name].items()}
    if "learner" not in sections:
        sections["learner"] = replace(base.learner, mode="off")
    elif base.learner.mode in ("process", "sync"):  # where the learner runs is the base's choice (async by default)
        sections["learner"] = replace(sections["learner"], mode=base.learner.mode)
    trainer = replace(base.trainer, seed=seed, steps=steps, save_every=0)
    return replace(base, trainer=trainer, **sections)


def summarize(rows: list[dict]) -> dict:
    """Returns one run's summary R from its metrics rows (step 0 = the evaluation before training)."""
    steps = [r for r in rows if r["step"] > 0]
    evals = [r for r in rows if EMITTED in r]
    accuracy = [r for r in rows if "val/accuracy" in r]

    def total(key: str) -> float:
        return sum(r.get(key, 0.0) for r in steps)

    emitted = [r.get("rollout/mean_emitted_per_step", 1.0) for r in steps]
    edge = max(len(emitted) // 10, 1)
    return {"wall_s": total("timing/step_s"), "rollout_s": total("timing/rollout_s"),
            "rollout_cpu_s": total("timing/rollout_cpu_s"),
            "update_s": total("timing/update_s"), "learner_s": total("learner/busy_s"),
            "final_accuracy": accuracy[-1]["val/accuracy"] if accuracy else math.nan,
            "start_accuracy": accuracy[0]["val/accuracy"] if accuracy else math.nan,
            "final_correct": accuracy[-1].get("val/correct", math.nan) if accuracy else math.nan,
            "accept_start": evals[0][EMITTED] if evals else math.nan,
            "accept_end": evals[-1][EMITTED] if evals else math.nan,
            "rollout_emitted_start": sum(emitted[:edge]) / edge, "rollout_emitted_end": sum(emitted[-edge:]) / edge,
            "steps": len(steps)}


def curve_agreement(runs_a: list[list[dict]], runs_b: list[list[dict]], key: str = "critic/score/mean",
                    bin_steps: int = 10) -> dict:
    """Returns how well two configurations' per-step curves agree over seeds.

    Steps are binned (`bin_steps` per bin); per seed and bin the mean of `key`; per bin the difference of the
    two configurations' seed means and its standard error sqrt(s_a^2 / n_a + s_b^2 / n_b) from the seed
    spread. A bin agrees when |difference| <= 2 standard errors (a ~95% band). With one seed there is no spread
    and the result says so.
    """
    def bins(run: list[dict]) -> dict[int, float]:
        out: dict[int, list[float]] = {}
        for r in run:
            if r["step"] > 0 and key in r:
                out.setdefault((r["step"] - 1) // bin_steps, []).append(r[key])
        return {b: sum(v) / len(v) for b, v in out.items()}

    a, b = [bins(r) for r in runs_a], [bins(r) for r in runs_b]
    common = sorted(set.intersection(*(set(x) for x in a + b))) if a and b else []
    result = {"key": key, "bin_steps": bin_steps, "bins": []}
    if len(a) < 2 or len(b) < 2:
        result["note"] = "fewer than 2 seeds per configuration: no seed-noise band"
    for i in common:
        va, vb = [x[i] for x in a], [x[i] for x in b]
        ma, mb = sum(va) / len(va), sum(vb) / len(vb)
        se = math.sqrt(_var(va) / len(va) + _var(vb) / len(vb)) if len(va) > 1 and len(vb) > 1 else math.nan
        result["bins"].append({"steps": [i * bin_steps + 1, (i + 1) * bin_steps], "a": ma, "b": mb,
                               "diff": mb - ma, "se": se,
                               "agree": None if math.isnan(se) else bool(abs(mb - ma) <= 2 * se)})
    judged = [x for x in result["bins"] if not math.isnan(x["se"])]
    result["agree_fraction"] = sum(x["agree"] for x in judged) / len(judged) if judged else math.nan
    return result


def seed_mean_curves(runs: list[list[dict]]) -> dict:
    """Returns the per-step seed means of the plotted metrics: training reward, rollout tokens per verify step,
    and at evaluation steps held-out accuracy and the drafter's tokens per verify step at k = 4."""
    def mean_by_step(key: str) -> tuple[list[int], list[float]]:
        by_step: dict[int, list[float]] = {}
        for run in runs:
            for r in run:
                if key in r:
                    by_step.setdefault(r["step"], []).append(r[key])
        steps = sorted(by_step)
        return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]

    out = {}
    for name, key in (("reward", "critic/score/mean"), ("emitted", "rollout/mean_emitted_per_step"),
                      ("accuracy", "val/accuracy"), ("accept_k4", EMITTED)):
        out[f"{name}_step"], out[name] = mean_by_step(key)
    return out


def _var(values: list[float]) -> float:
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - 1)


def run_experiment(base: TrainConfig, out: str | os.PathLike, steps: int, seeds: tuple[int, ...],
                   configs: tuple[str, ...] = FIVE, log: Log | None = None) -> dict:
    """Runs every configuration for every seed (out/NAME/seedS, replaced if present); returns the report:
    {"runs": {name: R}, "agreement": {...}, "config": ...} with R = the seed means of `summarize` plus
    "per_seed" lists."""
    out = Path(out)
    for name in configs:
        if name not in CONFIGS:
            raise ConfigError(f"unknown experiment configuration {name!r}; choose among {', '.join(CONFIGS)}")
    if not seeds:
        raise ConfigError("give at least one seed")
    for seed in seeds:
        _run_interleaved(base, out, steps, seed, configs, log)
    return report_from_runs(out, configs, seeds, steps)


def _run_interleaved(base: TrainConfig, out: Path, steps: int, seed: int, configs: tuple[str, ...],
                     log: Log | None) -> None:
    """Runs one seed of every configuration, one RL step of each in turn (the order rotates every step), in
    this process. A learner trains only while its own trainer steps (it is paused, after its step in flight,
    while the others step), as it would with that trainer alone on the machine: its core is not shared with
    another configuration's rollout."""
    trainers: dict[str, Trainer] = {}
    held: list[str] = []  # configurations whose learner is paused
    try:
        for name in configs:
            run_dir = out / name / f"seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            _log(log, f"experiment: {name}, seed {seed}, {steps} steps -> {run_dir}")
            trainers[name] = Trainer.start(config_for(base, name, seed, steps), run_dir, log=log)
            if trainers[name].learner is not None:
                trainers[name].learner.pause()
                held.append(name)
        threads = {t.config.trainer.num_threads for t in trainers.values()}
        if len(threads) > 1:
            raise ConfigError(f"experiment configurations must share trainer.num_threads, got {sorted(threads)}")
        with torch_threads(threads.pop()):
            for name, trainer in trainers.items():
                trainer.begin(_prefixed(log, f"{name}/s{seed}"))
            for step in range(steps):
                for name in _rotated(configs, step):
                    learner = trainers[name].learner
                    if learner is not None:
                        learner.resume()
                        held.remove(name)
                    try:
                        trainers[name].advance(steps, _prefixed(log, f"{name}/s{seed}"))
                    finally:
                        if learner is not None:
                            learner.pause()  # after its step in flight: no learner runs beside another trainer
                            held.append(name)
    finally:
        for name in held:
            trainers[name].learner.resume()
        for trainer in trainers.values():
            trainer.close()


def _rotated(configs: tuple[str, ...], step: int) -> tuple[str, ...]:
    """Returns the configurations in the order of RL step `step`: rotated by one each step, so that no
    configuration always runs first (after the evaluation) or always after the same neighbour."""
    i = step % len(configs)
    return configs[i:] + configs[:i]


def report_from_runs(out: str | os.PathLike, configs: tuple[str, ...], seeds: tuple[int, ...],
                     steps: int | None = None) -> dict:
    """Returns the experiment report from the run directories out/NAME/seedS (also of an interrupted
    experiment: runs missing or cut short are reported as they are; `steps` None = the longest run's)."""
    out = Path(out)
    rows: dict[str, list[list[dict]]] = {}
    for name in configs:
        for seed in seeds:
            path = out / name / f"seed{seed}" / METRICS
            if path.is_file():
                rows.setdefault(name, []).append(read_metrics(path))
    if not rows:
        raise ConfigError(f"{out}: no experiment runs (expected {out}/CONFIG/seedS/{METRICS})")
    done = [max((r["step"] for r in run), default=0) for runs in rows.values() for run in runs]
    report: dict = {"runs": {}, "steps": steps if steps is not None else max(done), "seeds": list(seeds),
                    "out": str(out)}
    for name, runs in rows.items():
        per_seed = [summarize(r) for r in runs]
        mean = {k: sum(s[k] for s in per_seed) / len(per_seed) for k in per_seed[0]}
        report["runs"][name] = {**mean, "per_seed": {k: [s[k] for s in per_seed] for k in per_seed[0]}}
    report["curves"] = {name: seed_mean_curves(runs) for name, runs in rows.items()}
    if "no_sd" in rows:
        ref = report["runs"]["no_sd"]
        for r in report["runs"].values():
            r["speedup"] = ref["wall_s"] / r["wall_s"]
            r["rollout_speedup"] = ref["rollout_s"] / r["rollout_s"]
            if ref["rollout_cpu_s"] > 0 and r["rollout_cpu_s"] > 0:  # runs from before session 8 lack it
                r["rollout_cpu_speedup"] = ref["rollout_cpu_s"] / r["rollout_cpu_s"]
        report["agreement"] = {name: {key: curve_agreement(rows["no_sd"], rows[name], key, bin_steps)
                                      for key, bin_steps in (("critic/score/mean", 10), ("val/accuracy", 1))}
                               for name in rows if name != "no_sd"}
    return report


def write_report(report: dict, json_path: str | os.PathLike) -> Path:
    """Writes the report as JSON atomically; returns the path."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path


def _prefixed(log: Log | None, prefix: str) -> Log | None:
    if log is None:
        return None
    return lambda message, fraction=None: log(f"{prefix} {message}", fraction)


def _log(log: Log | None, message: str, fraction: float | None = None) -> None:
    if log is not None:
        log(message, fraction)
