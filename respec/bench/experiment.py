"""`respec experiment`: the ReSpec experiment — the same RL run under several rollout configurations.

  no_sd            plain decoding (the baseline every speedup is measured against)
  naive_sd         static k = 4 drafts per step, the drafter frozen
  adaptive_frozen  the tuner picks k per step, the drafter frozen
  online_kd        adaptive + the online learner with uniform weights (plain online KD)
  respec           adaptive + the online learner with reward weights (ReSpec)
  respec_update    respec with learner.schedule=update (its learner trains only while the policy updates);
                   run on request (--configs); the first five are the default

Every configuration runs the same seeds, steps and data through `Trainer`. The runs of one seed are interleaved
step by step in one process (`_run_interleaved`): a shared host's speed drifts over minutes by more than the
differences measured, and configurations run one after another would be compared across different machine
states; interleaved, a drift reaches every configuration alike. Per run the
summary holds end-to-end and phase seconds (evaluation excluded: it is the same work in every configuration),
final held-out accuracy, and the drafter's tokens per verify step at k = 4 on held-out prompts at the start and the
end (`val/emitted_per_step_k4`, the staleness measure that does not depend on the tuner's k). Whether SD
changed what the policy learns is asked of the reward curves by a paired test per 10-step bin (`curve_agreement`).
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
from respec.cluster.ray_cluster import time_shared
from respec.engine.checkpoint import atomic_write_text, torch_threads
from respec.errors import ConfigError
from respec.rl.config import TrainConfig
from respec.rl.rollout_shape import RANGE_LABELS, batch_shares, small_batch_share
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
DEFAULT_CONFIGS = ("no_sd", "naive_sd", "adaptive_frozen", "online_kd", "respec")  # what `respec experiment` runs
SUMMARY_KEYS = ("wall_s", "rollout_s", "update_s", "learner_s", "final_accuracy", "accept_start", "accept_end")
EMITTED = "val/emitted_per_step_k4"


def config_for(base: TrainConfig, name: str, seed: int, steps: int) -> TrainConfig:
    """Returns `base` changed into configuration `name` for one seed and run length."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown experiment configuration {name!r}; choose among {', '.join(CONFIGS)}")
    sections = {section: replace(getattr(base, section), **changes) for section, changes in CONFIGS[name].items()}
    if "learner" not in sections:
        sections["learner"] = replace(base.learner, mode="off")
    elif base.learner.mode == "sync":  # where the learner runs is the base's choice (async by default)
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
            "rollout_cpu_s": total("timing/rollout_cpu_s"), "decode_s": total("timing/decode_s"),
            "prefill_s": total("timing/prefill_s"),
            "update_s": total("timing/update_s"), "learner_s": total("learner/busy_s"),
            "final_accuracy": accuracy[-1]["val/accuracy"] if accuracy else math.nan,
            "start_accuracy": accuracy[0]["val/accuracy"] if accuracy else math.nan,
            "final_correct": accuracy[-1].get("val/correct", math.nan) if accuracy else math.nan,
            "accept_start": evals[0][EMITTED] if evals else math.nan,
            "accept_end": evals[-1][EMITTED] if evals else math.nan,
            "rollout_emitted_start": sum(emitted[:edge]) / edge, "rollout_emitted_end": sum(emitted[-edge:]) / edge,
            "steps": len(steps), **shape_summary(steps)}


def shape_summary(steps: list[dict]) -> dict:
    """Returns the rollout shape over a run's step rows: "length_median", "length_p90", "length_p99" (the mean
    over steps of each step's quantile), "length_max" (the longest response), "batch_share/<range>" (the run's
    decode seconds per live-batch range over their total, `respec.rl.rollout_shape`) and "small_batch_share" (at
    <= 16 rows). NaN where the rows lack the metrics (runs logged before they existed)."""
    out = {}
    for q in ("median", "p90", "p99"):
        values = [r[f"response_length/{q}"] for r in steps if f"response_length/{q}" in r]
        out[f"length_{q}"] = sum(values) / len(values) if values else math.nan
    out["length_max"] = max((r["response_length/max"] for r in steps if "response_length/max" in r),
                            default=math.nan)
    seconds = {label: sum(r.get(f"rollout/batch_s/{label}", 0.0) for r in steps) for label in RANGE_LABELS}
    shares = batch_shares(seconds)
    out.update({f"batch_share/{label}": v for label, v in shares.items()})
    out["small_batch_share"] = small_batch_share(shares)
    return out


def run_shape(run: dict) -> dict | None:
    """Returns a summarized run's rollout shape in `rollout_shape`'s layout ({"length": {"median", "p90", "p99",
    "max"}, "batch_share": {range: share}, "small_batch_share"}), or None when its metrics had none."""
    if not isinstance(run.get("small_batch_share"), (int, float)) or math.isnan(run["small_batch_share"]):
        return None
    return {"length": {q: run[f"length_{q}"] for q in ("median", "p90", "p99", "max")},
            "batch_share": {label: run[f"batch_share/{label}"] for label in RANGE_LABELS},
            "small_batch_share": run["small_batch_share"]}


def curve_agreement(runs_a: dict[int, list[dict]], runs_b: dict[int, list[dict]], key: str = "critic/score/mean",
                    bin_steps: int = 10, alpha: float = 0.05) -> dict:
    """Returns the paired test of two configurations' per-step curves, seed by seed.

    Steps are binned (`bin_steps` per bin; the evaluation before training, step 0, is left out); per seed and bin
    the mean of `key`. Per bin, the seeds both configurations ran are paired and a two-sided paired t-test
    (`scipy.stats.ttest_rel`) asks whether the mean difference b - a is zero: seed s of every configuration
    trains on the same prompts from the same initial weights, so pairing removes the seed-to-seed spread that
    an unpaired test would have to beat. Holm's step-down correction over the bins (family-wise error `alpha`)
    gives `p_holm`; a bin agrees when `p_holm >= alpha`. With fewer than two paired seeds there is no test and
    the result says so.
    """
    def bins(run: list[dict]) -> dict[int, float]:
        out: dict[int, list[float]] = {}
        for r in run:
            if r["step"] > 0 and key in r:
                out.setdefault((r["step"] - 1) // bin_steps, []).append(r[key])
        return {b: sum(v) / len(v) for b, v in out.items()}

    seeds = sorted(set(runs_a) & set(runs_b))
    a, b = {s: bins(runs_a[s]) for s in seeds}, {s: bins(runs_b[s]) for s in seeds}
    common = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds))) if seeds else []
    result: dict = {"key": key, "bin_steps": bin_steps, "test": "paired t-test by seed, Holm-corrected",
                    "alpha": alpha, "seeds": seeds, "bins": []}
    if len(seeds) < 2:
        result["note"] = "fewer than 2 paired seeds: no test"
    for i in common:
        va, vb = [a[s][i] for s in seeds], [b[s][i] for s in seeds]
        result["bins"].append({"steps": [i * bin_steps + 1, (i + 1) * bin_steps], "a": _mean(va), "b": _mean(vb),
                               "diff": _mean(vb) - _mean(va), "p": paired_p(va, vb)})
    for row, p_holm in zip(result["bins"], holm([row["p"] for row in result["bins"]]), strict=True):
        row["p_holm"] = p_holm
        row["agree"] = None if math.isnan(p_holm) else bool(p_holm >= alpha)
    judged = [x for x in result["bins"] if x["agree"] is not None]
    result["agree_fraction"] = sum(x["agree"] for x in judged) / len(judged) if judged else math.nan
    result["min_p"] = min((x["p"] for x in judged), default=math.nan)
    return result


def paired_p(a: list[float], b: list[float]) -> float:
    """Returns the two-sided p-value of the paired t-test of b - a = 0 (NaN for fewer than two pairs). Pairs
    whose differences are all equal have no spread: p is 1 when they are all zero and 0 otherwise."""
    if len(a) < 2:
        return math.nan
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    if max(diffs) - min(diffs) <= 1e-12 * max(1.0, max(abs(d) for d in diffs)):
        return 1.0 if abs(diffs[0]) <= 1e-12 else 0.0
    from scipy.stats import ttest_rel

    return float(ttest_rel(b, a).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Returns Holm's step-down adjusted p-values (NaN stays NaN and is not counted): the i-th smallest of m
    p-values is multiplied by m - i, made monotone, and capped at 1; rejecting where adjusted p < alpha keeps
    the family-wise error at alpha."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


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


def run_experiment(base: TrainConfig, out: str | os.PathLike, steps: int, seeds: tuple[int, ...],
                   configs: tuple[str, ...] = DEFAULT_CONFIGS, log: Log | None = None) -> dict:
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
    another configuration's rollout. On Ray (without a cluster address) the configurations' placement groups
    share this machine's cores in turn (`time_shared`)."""
    with time_shared([config_for(base, name, seed, steps) for name in configs]):
        _step_interleaved(base, out, steps, seed, configs, log)


def _step_interleaved(base: TrainConfig, out: Path, steps: int, seed: int, configs: tuple[str, ...],
                      log: Log | None) -> None:
    trainers: dict[str, Trainer] = {}
    pauses = {}  # configuration -> its learner's pause, entered while other configurations step
    held: list[str] = []  # configurations whose learner is paused
    try:
        for name in configs:
            run_dir = out / name / f"seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            _log(log, f"experiment: {name}, seed {seed}, {steps} steps -> {run_dir}")
            trainers[name] = Trainer.start(config_for(base, name, seed, steps), run_dir, log=log)
            if trainers[name].learner is not None:
                pauses[name] = trainers[name].learner.paused()
                pauses[name].__enter__()
                held.append(name)
        threads = {t.config.trainer.num_threads for t in trainers.values()}
        if len(threads) > 1:
            raise ConfigError(f"experiment configurations must share trainer.num_threads, got {sorted(threads)}")
        with torch_threads(threads.pop()):
            for name, trainer in trainers.items():
                trainer.begin(_prefixed(log, f"{name}/s{seed}"))
            for step in range(steps):
                for name in _rotated(configs, step):
                    if name in pauses:
                        pauses[name].__exit__(None, None, None)
                        held.remove(name)
                    try:
                        trainers[name].advance(steps, _prefixed(log, f"{name}/s{seed}"))
                    finally:
                        if name in pauses:
                            pauses[name].__enter__()  # after its step in flight: no learner runs beside another trainer
                            held.append(name)
    finally:
        for name in held:
            pauses[name].__exit__(None, None, None)
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
    rows: dict[str, dict[int, list[dict]]] = {}  # configuration -> seed -> metrics rows
    for name in configs:
        for seed in seeds:
            path = out / name / f"seed{seed}" / METRICS
            if path.is_file():
                rows.setdefault(name, {})[seed] = read_metrics(path)
    if not rows:
        raise ConfigError(f"{out}: no experiment runs (expected {out}/CONFIG/seedS/{METRICS})")
    done = [max((r["step"] for r in run), default=0) for runs in rows.values() for run in runs.values()]
    report: dict = {"runs": {}, "steps": steps if steps is not None else max(done), "seeds": list(seeds),
                    "out": str(out)}
    for name, runs in rows.items():
        per_seed = [summarize(r) for r in runs.values()]
        mean = {k: sum(s[k] for s in per_seed) / len(per_seed) for k in per_seed[0]}
        report["runs"][name] = {**mean, "seeds": list(runs),
                                "per_seed": {k: [s[k] for s in per_seed] for k in per_seed[0]}}
    report["curves"] = {name: seed_mean_curves(list(runs.values())) for name, runs in rows.items()}
    if "no_sd" in rows:
        ref = report["runs"]["no_sd"]
        for r in report["runs"].values():
            r["speedup"] = ref["wall_s"] / r["wall_s"]
            r["rollout_speedup"] = ref["rollout_s"] / r["rollout_s"]
            if ref["rollout_cpu_s"] > 0 and r["rollout_cpu_s"] > 0:  # 0 where a run's metrics lack the key
                r["rollout_cpu_speedup"] = ref["rollout_cpu_s"] / r["rollout_cpu_s"]
        report["agreement"] = {name: {key: curve_agreement(rows["no_sd"], rows[name], key, bin_steps)
                                      for key, bin_steps in (("critic/score/mean", 10), ("val/accuracy", 1))}
                               for name in rows if name != "no_sd"}
    return report


def staleness(report: dict) -> dict | None:
    """Returns the staleness summary of a report: the frozen drafter's tokens per verify step at k = 4 at the start
    and the end and its relative change, and each online learner's end value over the frozen one's; None when the
    report has no frozen configuration or no learner. The frozen drafter is measured in `adaptive_frozen`, else
    `naive_sd`, else `no_sd` (whose evaluations measure the offline drafter it never uses)."""
    runs = report["runs"]
    frozen = next((n for n in ("adaptive_frozen", "naive_sd", "no_sd") if n in runs), None)
    learners = [n for n in ("respec", "online_kd", "respec_update") if n in runs]
    if frozen is None or not learners:
        return None
    f = runs[frozen]
    return {"frozen": frozen, "start": f["accept_start"], "end": f["accept_end"],
            "change": f["accept_end"] / f["accept_start"] - 1,
            "learners": {n: {"end": runs[n]["accept_end"], "vs_frozen": runs[n]["accept_end"] / f["accept_end"]}
                         for n in learners}}


def phase_bound(report: dict, rollout_speedup: float = 1.5) -> dict | None:
    """Returns the no-SD phase split and what it allows (Amdahl): the rollout's share of a step, the end-to-end
    speedup of a rollout `rollout_speedup` times faster, and of an instant rollout; where the run recorded it,
    the decode steps' and prefills' shares of the rollout and the rollout speedup when only its decode steps
    (what SD speeds up) run `rollout_speedup` times faster. None without a no_sd run."""
    base = report["runs"].get("no_sd")
    if base is None or base["wall_s"] <= 0:
        return None
    share = base["rollout_s"] / base["wall_s"]
    out = {"rollout_share": share, "rollout_speedup": rollout_speedup,
           "bound": 1 / (1 - share + share / rollout_speedup),
           "instant_bound": 1 / (1 - share) if share < 1 else math.inf}
    if base.get("decode_s", 0) > 0 and base["rollout_s"] > 0:  # absent in runs recorded before the split
        decode = base["decode_s"] / base["rollout_s"]
        out.update(decode_share=decode, prefill_share=base["prefill_s"] / base["rollout_s"],
                   decode_bound=1 / (1 - decode + decode / rollout_speedup))
    return out


def decode_split(bound: dict) -> str:
    """Returns the sentence on the no-SD rollout's decode/prefill split of `phase_bound`'s result."""
    return (f"Its rollout is {bound['decode_share']:.0%} decode steps and {bound['prefill_share']:.0%} prefills "
            f"(prompts and environment continuations; the rest is environment turns and scheduling): decode steps "
            f"{bound['rollout_speedup']:g}x faster make the rollout at most {bound['decode_bound']:.2f}x faster")


def write_report(report: dict, json_path: str | os.PathLike) -> Path:
    """Writes the report as JSON atomically; returns the path."""
    return atomic_write_text(json_path, json.dumps(report, indent=2, default=float) + "\n")


def _prefixed(log: Log | None, prefix: str) -> Log | None:
    if log is None:
        return None
    return lambda message, fraction=None: log(f"{prefix} {message}", fraction)


def _log(log: Log | None, message: str, fraction: float | None = None) -> None:
    if log is not None:
        log(message, fraction)
