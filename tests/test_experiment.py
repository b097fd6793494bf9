"""`respec.bench.experiment` and `respec experiment`: configurations, run summaries, the seed-band agreement test,
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
    report_from_runs,
    run_experiment,
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


def test_curve_agreement_band():
    same = [rows_of([0.1 * s + 0.01 * i for i in range(20)]) for s in range(3)]
    assert curve_agreement(same, same)["agree_fraction"] == 1.0
    shifted = [rows_of([5 + 0.1 * s + 0.01 * i for i in range(20)]) for s in range(3)]
    result = curve_agreement(same, shifted)
    assert result["agree_fraction"] == 0.0 and len(result["bins"]) == 2
    assert result["bins"][0]["diff"] == pytest.approx(5.0)
    one = curve_agreement(same[:1], same[:1])
    assert "fewer than 2 seeds" in one["note"] and math.isnan(one["agree_fraction"])


def test_experiment_runs_reports_plots_and_rebuilds(tiny_world, tmp_path):
    out = tmp_path / "exp"
    report = run_experiment(tiny_base(tiny_world), out, steps=2, seeds=(0, 1), configs=("no_sd", "respec"))
    assert set(report["runs"]) == {"no_sd", "respec"}
    for r in report["runs"].values():
        for key in ("wall_s", "rollout_s", "update_s", "learner_s", "final_accuracy", "accept_start", "accept_end"):
            assert len(r["per_seed"][key]) == 2 and math.isfinite(r[key])
        assert r["wall_s"] > 0 and r["steps"] == 2
        assert 0 < r["rollout_cpu_s"] <= r["rollout_s"] * 1.05  # the rollout thread's CPU time, logged per step
        assert r["rollout_cpu_speedup"] > 0
    assert report["runs"]["no_sd"]["speedup"] == 1.0 and report["runs"]["no_sd"]["learner_s"] == 0.0
    assert report["agreement"]["respec"]["critic/score/mean"]["bins"]
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
