"""`respec.bench.experiment` and `respec experiment`: configurations, run summaries, the paired agreement test,
the report from (possibly interrupted) run directories, the plot and the CLI."""

import json
import math
import sys

import pytest
from typer.testing import CliRunner

from respec.bench.experiment import (
    CONFIGS,
    config_for,
    curve_agreement,
    decode_split,
    phase_bound,
    report_from_runs,
    run_experiment,
    run_shape,
    summarize,
    write_report,
)
from respec.bench.plot import plot_experiment
from respec.cli import app, main
from respec.errors import ConfigError
from respec.rl.config import AlgorithmConfig, DataConfig, RolloutConfig, TrainConfig, TrainerConfig

pytestmark = pytest.mark.usefixtures("per_test_cache")


def tiny_base(world) -> TrainConfig:
    policy, drafter = world
    return TrainConfig(
        trainer=TrainerConfig(model=str(policy), lr=3e-3, warmup_steps=1, eval_every=1),
        algorithm=AlgorithmConfig(ppo_mini_batch_size=2),
        rollout=RolloutConfig(group_size=4, max_new_tokens=6, drafter=str(drafter)),
        data=DataConfig(prompts_per_step=2, eval_problems=4))


def test_each_configuration_sets_what_it_names(tiny_world):
    base = tiny_base(tiny_world)
    for name in CONFIGS:
        cfg = config_for(base, name, seed=3, steps=7)
        assert (cfg.trainer.seed, cfg.trainer.steps, cfg.trainer.save_every) == (3, 7, 0)
        assert cfg.rollout.spec == {"no_sd": "off", "naive_sd": "static"}.get(name, "adaptive")
        assert cfg.learner.mode == ("async" if name in ("online_kd", "respec", "respec_update") else "off")
        assert cfg.learner.schedule == ("update" if name == "respec_update" else "always")
    assert config_for(base, "naive_sd", 0, 1).rollout.k == 4
    assert config_for(base, "online_kd", 0, 1).learner.weighting == "uniform"
    assert config_for(base, "respec", 0, 1).learner.weighting == "reward"
    with pytest.raises(ConfigError, match="unknown experiment configuration"):
        config_for(base, "fast", 0, 1)


def rows_of(rewards, step_s=1.0, emitted=None):
    rows = [{"step": 0, "val/accuracy": 0.1, "val/emitted_per_step_k4": 3.0}]
    for i, r in enumerate(rewards, 1):
        rows.append({"step": i, "critic/score/mean": r, "timing/step_s": step_s, "timing/rollout_s": step_s / 2,
                     "timing/update_s": step_s / 2, "rollout/mean_emitted_per_step": emitted or 2.0})
    rows[-1].update({"val/accuracy": 0.4, "val/emitted_per_step_k4": 2.5})
    return rows


def test_summary_of_hand_made_rows():
    s = summarize(rows_of([0.1, 0.2, 0.3, 0.4], step_s=2.0))
    assert (s["wall_s"], s["rollout_s"], s["update_s"], s["learner_s"]) == (8.0, 4.0, 4.0, 0.0)
    assert (s["start_accuracy"], s["final_accuracy"], s["accept_start"], s["accept_end"]) == (0.1, 0.4, 3.0, 2.5)
    assert s["steps"] == 4


def test_phase_bound_splits_the_no_sd_rollout_into_decode_steps_and_prefills():
    rows = rows_of([0.1, 0.2], step_s=4.0)  # rollout 2 s of a 4 s step
    for r in rows[1:]:
        r.update({"timing/decode_s": 1.5, "timing/prefill_s": 0.4})
    base = summarize(rows)
    assert (base["decode_s"], base["prefill_s"]) == (3.0, 0.8)
    bound = phase_bound({"runs": {"no_sd": base}})
    assert bound["rollout_share"] == pytest.approx(0.5) and bound["bound"] == pytest.approx(1 / (0.5 + 0.5 / 1.5))
    assert (bound["decode_share"], bound["prefill_share"]) == (pytest.approx(0.75), pytest.approx(0.2))
    assert bound["decode_bound"] == pytest.approx(1 / (0.25 + 0.75 / 1.5))  # Amdahl over the rollout's phases
    assert "75% decode steps and 20% prefills" in decode_split(bound) and "at most 1.33x" in decode_split(bound)
    old = summarize(rows_of([0.1, 0.2]))  # metrics recorded before the split: no decode keys
    assert "decode_share" not in phase_bound({"runs": {"no_sd": old}})


def test_summary_carries_the_rollout_shape_and_old_rows_give_none():
    rows = rows_of([0.1, 0.2])
    for r, median, p99, longest in zip(rows[1:], (30, 40), (200, 300), (250, 380), strict=True):
        r.update({"response_length/median": median, "response_length/p90": 100, "response_length/p99": p99,
                  "response_length/max": longest, "rollout/batch_s/97+": 1.0, "rollout/batch_s/33-96": 0.5,
                  "rollout/batch_s/17-32": 0.5, "rollout/batch_s/9-16": 1.0, "rollout/batch_s/1-8": 2.0})
    s = summarize(rows)
    assert (s["length_median"], s["length_p90"], s["length_p99"], s["length_max"]) == (35, 100, 250, 380)
    assert s["batch_share/97+"] == pytest.approx(0.2) and s["batch_share/1-8"] == pytest.approx(0.4)
    assert s["small_batch_share"] == pytest.approx(0.6)
    shape = run_shape(s)
    assert shape["length"] == {"median": 35, "p90": 100, "p99": 250, "max": 380}
    assert shape["small_batch_share"] == pytest.approx(0.6)
    assert run_shape(summarize(rows_of([0.1, 0.2]))) is None  # metrics logged before the shape existed


def test_curve_agreement_is_a_paired_test_by_seed_with_holm_correction():
    from scipy.stats import ttest_rel

    same = {s: rows_of([0.1 * s + 0.01 * i for i in range(20)]) for s in range(3)}
    agree = curve_agreement(same, same)
    assert agree["agree_fraction"] == 1.0 and [b["p"] for b in agree["bins"]] == [1.0, 1.0]
    # A shift of +5 in every seed is found however large the seed spread is: the pairs remove it.
    shifted = {s: rows_of([5 + 0.1 * s + 0.01 * i + 0.001 * s * i for i in range(20)]) for s in range(3)}
    result = curve_agreement(same, shifted)
    assert result["agree_fraction"] == 0.0 and len(result["bins"]) == 2
    assert result["bins"][0]["diff"] == pytest.approx(5.0, abs=0.01) and result["bins"][0]["steps"] == [1, 10]
    # Noise that differs per seed: p is scipy's paired t-test of the per-seed bin means, Holm-corrected.
    noisy = {s: rows_of([0.1 * s + 0.01 * i + (0.05 if (s + i) % 3 == 0 else -0.02) for i in range(20)])
             for s in range(3)}
    result = curve_agreement(same, noisy)
    for b, lo in zip(result["bins"], (0, 10), strict=True):
        a = [sum(0.1 * s + 0.01 * i for i in range(lo, lo + 10)) / 10 for s in range(3)]
        n = [sum(0.1 * s + 0.01 * i + (0.05 if (s + i) % 3 == 0 else -0.02) for i in range(lo, lo + 10)) / 10
             for s in range(3)]
        assert b["p"] == pytest.approx(ttest_rel(n, a).pvalue)
    ps = sorted(b["p"] for b in result["bins"])
    assert sorted(b["p_holm"] for b in result["bins"]) == pytest.approx([min(1, 2 * ps[0]), min(1, max(2 * ps[0],
                                                                                                       ps[1]))])
    # Seeds are paired by number: a seed only one configuration ran is left out.
    partial = curve_agreement({0: same[0], 1: same[1], 2: same[2]}, {1: shifted[1], 2: shifted[2], 7: same[0]})
    assert partial["seeds"] == [1, 2]
    one = curve_agreement({0: same[0]}, {0: same[0]})
    assert "fewer than 2 paired seeds" in one["note"] and math.isnan(one["agree_fraction"])


def test_holm_adjustment_matches_its_definition():
    from respec.bench.experiment import holm

    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_experiment_runs_reports_plots_and_rebuilds(tiny_world, tmp_path):
    out = tmp_path / "exp"
    report = run_experiment(tiny_base(tiny_world), out, steps=2, seeds=(0, 1), configs=("no_sd", "respec"))
    assert set(report["runs"]) == {"no_sd", "respec"}
    for r in report["runs"].values():
        for key in ("wall_s", "rollout_s", "update_s", "learner_s", "final_accuracy", "accept_start", "accept_end"):
            assert len(r["per_seed"][key]) == 2 and math.isfinite(r[key])
        assert r["steps"] == 2 and r["wall_s"] == pytest.approx(sum(r["per_seed"]["wall_s"]) / 2)
        assert r["wall_s"] >= r["rollout_s"] + r["update_s"] > 0  # a step is at least its two phases
        assert 0 < r["rollout_cpu_s"] <= r["rollout_s"] * 1.05  # the rollout thread's CPU time, logged per step
    ref = report["runs"]["no_sd"]
    for r in report["runs"].values():
        assert r["speedup"] == pytest.approx(ref["wall_s"] / r["wall_s"])
        assert r["rollout_speedup"] == pytest.approx(ref["rollout_s"] / r["rollout_s"])
        assert r["rollout_cpu_speedup"] == pytest.approx(ref["rollout_cpu_s"] / r["rollout_cpu_s"])
    assert ref["speedup"] == 1.0 and ref["learner_s"] == 0.0 and report["runs"]["respec"]["learner_s"] > 0
    reward = report["agreement"]["respec"]["critic/score/mean"]
    assert reward["seeds"] == [0, 1] and reward["bins"] and all(0 <= b["p"] <= b["p_holm"] <= 1 for b in reward["bins"])
    assert report["curves"]["respec"]["accept_k4_step"] == [0, 1, 2]
    path = write_report(report, tmp_path / "report.json")
    saved = json.loads(path.read_text())
    assert saved["runs"]["respec"]["wall_s"] == pytest.approx(report["runs"]["respec"]["wall_s"])
    assert plot_experiment(report, tmp_path / "report.png").stat().st_size > 0
    rebuilt = report_from_runs(out, ("no_sd", "respec", "naive_sd"), (0, 1))  # naive_sd never ran: left out
    assert set(rebuilt["runs"]) == {"no_sd", "respec"}
    assert rebuilt["runs"]["respec"]["per_seed"] == report["runs"]["respec"]["per_seed"]

    cli = CliRunner().invoke(app, ["experiment", "--out", str(out), "--report-only", "--configs", "no_sd,respec",
                                   "--seeds", "0,1"])
    assert cli.exit_code == 0, cli.output
    assert "respec" in cli.output and (out / "experiment.json").is_file() and (out / "experiment.png").is_file()
    assert "no_sd: the rollout is" in cli.output and "end to end, an instant one" in cli.output


def test_cli_experiment_errors_are_one_line(monkeypatch, capsys, tmp_path):
    for argv, words in ((["experiment", "--out", str(tmp_path / "none"), "--report-only"], "no experiment runs"),
                        (["experiment", "--out", str(tmp_path / "x"), "--configs", "warp"], "unknown experiment")):
        monkeypatch.setattr(sys, "argv", ["respec", *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_configurations_alternate_step_by_step_and_a_learner_trains_only_in_its_own_steps(tiny_world, tmp_path,
                                                                                          monkeypatch):
    from respec.bench import experiment
    from respec.rl.trainer import Trainer

    seen = []  # (configuration, its step, the respec learner's steps at the start and end of this step)
    trainers = {}
    original = Trainer.advance

    def advance(self, total, log=None):
        name = self.run_dir.parent.name
        trainers[name] = self
        learner = trainers.get("respec", self).learner
        before = learner.steps if learner is not None else 0
        row = original(self, total, log)
        seen.append((name, row["step"], before, learner.steps if learner is not None else 0))
        return row

    monkeypatch.setattr(Trainer, "advance", advance)
    base = tiny_base(tiny_world)
    base = TrainConfig(trainer=base.trainer, algorithm=base.algorithm, rollout=base.rollout, data=base.data,
                       learner=base.learner.__class__(steps_per_rollout=50, batch_size=4, publish_every=2))
    run_experiment(base, tmp_path / "exp", steps=3, seeds=(0,), configs=("no_sd", "respec"))
    assert [(name, step) for name, step, _, _ in seen] == [("no_sd", 1), ("respec", 1), ("respec", 2), ("no_sd", 2),
                                                           ("no_sd", 3), ("respec", 3)]
    # While no_sd stepped after respec's first submission, the respec learner had credits but did not train.
    idle = [(before, after) for name, step, before, after in seen if name == "no_sd" and "respec" in trainers
            and step > 1]
    assert idle and all(before == after for before, after in idle)
    assert trainers["respec"].learner.steps > 0  # it did train, in respec's own steps
    assert experiment._rotated(("a", "b", "c"), 4) == ("b", "c", "a")
