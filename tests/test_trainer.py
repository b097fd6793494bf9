"""`respec.rl.trainer` and `respec train`: GRPO on the engine with a tiny policy and drafter built once per module.

Reward moves, weights pushed in memory equal a save/reload, the trainer's logprobs equal the verifier's, a run
killed with SIGKILL resumes to the same step count, bad configs and diverging losses give one clear error.
"""

import json
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from respec.bench.plot import plot_runs
from respec.cli import main
from respec.engine.checkpoint import load_model, save_model
from respec.engine.generate import Engine, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.errors import CheckpointError, ConfigError, DataError, TrainingError
from respec.rl.config import (
    AlgorithmConfig,
    DataConfig,
    RolloutConfig,
    TrainConfig,
    TrainerConfig,
    load_config,
)
from respec.rl.trainer import Trainer


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


pytestmark = pytest.mark.usefixtures("per_test_cache")


def digit_share(problem, completion: str) -> float:
    """A reward the near-random tiny policy can move in a few steps: the share of digits in its completion."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def wait_until(condition, what: str, timeout: float = 120.0, poll_s: float = 0.02) -> None:
    """Polls `condition` until it holds; fails naming `what` after `timeout` seconds. For conditions that nothing
    in this process signals: another process's progress (a file it writes) or a listener thread's state."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(poll_s)


def tiny_config(world, **sections) -> TrainConfig:
    policy, drafter = world
    base = TrainConfig(
        trainer=TrainerConfig(model=str(policy), steps=6, lr=3e-3, warmup_steps=2, eval_every=3, save_every=3),
        algorithm=AlgorithmConfig(ppo_mini_batch_size=8),
        rollout=RolloutConfig(group_size=8, max_new_tokens=8, spec="static", k=2, k_max=3, drafter=str(drafter)),
        data=DataConfig(prompts_per_step=8, eval_problems=8))
    return replace(base, **{name: replace(getattr(base, name), **kw) for name, kw in sections.items()})


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_reward_rises_and_metrics_are_logged(world, tmp_path):
    trainer = Trainer.start(tiny_config(world, trainer={"steps": 9}), tmp_path / "run", reward_fn=digit_share)
    rows = trainer.train()
    assert [r["step"] for r in rows] == list(range(10)) and read_metrics(tmp_path / "run") == rows
    train_rows = rows[1:]
    first, last = train_rows[0]["critic/score/mean"], sum(r["critic/score/mean"] for r in train_rows[-2:]) / 2
    assert last > first + 0.1, [r["critic/score/mean"] for r in train_rows]
    names = {"critic/score/mean", "critic/score/std", "critic/advantages/mean", "response_length/mean",
             "response_length/max", "actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy",
             "actor/grad_norm", "actor/lr", "timing/rollout_s", "timing/update_s", "timing/step_s",
             "rollout/tokens_per_s", "rollout/mean_emitted_per_step", "rollout/k_mean", "rollout/logprob_diff_max",
             "reward", "reward_std", "completions/mean_length"}
    for row in train_rows:
        assert names <= set(row), names - set(row)
        assert row["rollout/k_mean"] == 2.0 and row["rollout/logprob_diff_max"] <= 1e-4
        assert "actor/kl_loss" not in row  # kl_coef 0: no reference, no KL term
    evals = {"val/accuracy", "val/accuracy_greedy", "val/correct", "val/correct_greedy", "val/response_length"}
    assert [r["step"] for r in rows if evals <= set(r)] == [0, 3, 6, 9]
    assert all(1 >= r["val/correct"] >= r["val/accuracy"] >= 0 for r in rows if "val/correct" in r)  # reward <= 1
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert load_config(tmp_path / "run" / "config.yaml") == trainer.config

    # The features the online learner reads: the first epoch's forward over this step's 64 rollouts.
    f = trainer.last_features
    N, L = f.input_ids.shape
    assert f.step == 9 and N == 64 and f.features.shape == (N, L, 3 * 32) and f.rewards.shape == (N,)
    assert f.loss_mask.sum(1).float().mean().item() == pytest.approx(rows[-1]["response_length/mean"])
    assert (f.loss_mask.float().argmax(1) == f.prompt_lens - 1).all()  # the last prompt position comes first
    assert f.features[f.loss_mask].abs().sum(-1).min() > 0


def test_weights_pushed_in_memory_equal_a_save_and_reload(world, tmp_path):
    trainer = Trainer.start(tiny_config(world, trainer=dict(eval_before_train=False, eval_every=0)),
                            tmp_path / "run", reward_fn=digit_share)
    trainer.step()
    reloaded = Engine(load_model(save_model(trainer.actor, tmp_path / "reloaded")))
    engine = trainer.engine
    for name, tensor in reloaded.target.state_dict().items():
        assert torch.equal(engine.target.state_dict()[name], tensor), name
    prompts = [[0, 5, 6, 7], [0, 9, 9]]
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, max_new_tokens=12, seed=3)
        ours = engine.generate(prompts, params, SpecConfig(mode="off")).sequences
        theirs = reloaded.generate(prompts, params, SpecConfig(mode="off")).sequences
        assert [s.tokens for s in ours] == [s.tokens for s in theirs]


@pytest.mark.parametrize("sections", [
    dict(rollout=dict(spec="off", temperature=0.7)),
    dict(rollout=dict(spec="adaptive"), algorithm=dict(ppo_epochs=2, ppo_mini_batch_size=2, kl_coef=0.05,
                                                       loss_agg="seq-mean-token-sum-norm")),
], ids=["plain-T0.7", "adaptive-kl-epochs"])
def test_logprobs_of_the_verifier_equal_the_trainers(world, tmp_path, sections):
    sections["trainer"] = dict(steps=2, eval_every=0, eval_before_train=False, save_every=1)
    trainer = Trainer.start(tiny_config(world, **sections), tmp_path / "run", reward_fn=digit_share)
    rows = trainer.train()
    for row in rows:
        assert 0 <= row["rollout/logprob_diff_max"] <= 1e-4
    ckpt = tmp_path / "run" / "checkpoint"
    if trainer.config.algorithm.kl_coef:
        assert all("actor/kl_loss" in r for r in rows) and (ckpt / "reference" / "config.json").is_file()
    if trainer.rollout.spec.mode == "adaptive":
        saved = json.loads((ckpt / "rollout.json").read_text())["tuner"]
        assert saved == json.loads(json.dumps(trainer.engine.tuner.state_dict()))
        assert Trainer.resume(tmp_path / "run").engine.tuner.state_dict() == trainer.engine.tuner.state_dict()


def test_resume_after_sigkill_reaches_the_same_step_count(world, tmp_path):
    policy, drafter = world
    run, steps = tmp_path / "run", 10
    env = {**os.environ, "RESPEC_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    common = ["--steps", str(steps), "--set", "trainer.save_every=1", "--set", "trainer.eval_every=0",
              "--set", "data.prompts_per_step=4", "--set", "rollout.group_size=4", "--set",
              "rollout.max_new_tokens=8", "--set", "algorithm.ppo_mini_batch_size=2", "--set", "data.eval_problems=4"]
    cmd = [sys.executable, "-m", "respec.cli", "train"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen([*cmd, "--out", str(run), "--model", str(policy), "--drafter", str(drafter),
                                 "--spec", "static", *common], env=env, stdout=out, stderr=subprocess.STDOUT)
    state = run / "checkpoint" / "state.json"
    wait_until(lambda: state.exists() or proc.poll() is not None, "the first checkpoint", timeout=300)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    killed_at = json.loads(state.read_text())["step"]
    assert 1 <= killed_at < steps

    done = subprocess.run([*cmd, "--resume", str(run)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"step {steps}" in done.stdout and "metrics.jsonl" in done.stdout
    assert json.loads(state.read_text())["step"] == steps
    assert [r["step"] for r in read_metrics(run)] == list(range(steps + 1))  # step 0: the evaluation before training


def test_nan_loss_stops_the_run_and_keeps_the_checkpoint(world, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer.start(tiny_config(world, trainer=dict(save_every=1, eval_every=0)), run, reward_fn=digit_share)
    trainer.train(steps=2)
    with torch.no_grad():
        trainer.actor.lm_head.weight[3, 0] = float("nan")  # a diverged actor: every logprob becomes NaN
    with pytest.raises(TrainingError, match=r"loss is nan at step 3 .*checkpoint \(step 2\) is intact"):
        trainer.train()
    assert len(read_metrics(run)) == 3  # step 0 (evaluation), 1, 2: the failed step wrote nothing
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the policy's own files, not a re-save
        assert (run / "checkpoint" / "actor" / name).read_bytes() == (world[0] / name).read_bytes()
    resumed = Trainer.resume(run, reward_fn=digit_share)
    assert resumed.global_step == 2
    assert all(torch.isfinite(p).all() for p in resumed.actor.parameters())
    assert resumed.step()["step"] == 3


def test_resume_drops_what_a_killed_run_wrote_after_its_checkpoint(world, tmp_path, monkeypatch):
    """Metrics lines and TensorBoard events past the checkpoint go; a checkpoint set aside by a kill between
    the two renames of its commit is put back."""
    writers = []

    class Writer:  # torch.utils.tensorboard.SummaryWriter's interface, recorded
        def __init__(self, logdir, purge_step=None):
            self.purge_step, self.scalars = purge_step, []
            writers.append(self)

        def add_scalar(self, key, value, step):
            self.scalars.append((key, step))

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    run = tmp_path / "run"
    trainer = Trainer.start(tiny_config(world, trainer=dict(save_every=2, eval_every=0)), run, reward_fn=digit_share)
    trainer.train(steps=2)
    trainer.step()  # step 3 is logged, then the run is "killed" before its next checkpoint
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3] and writers[0].purge_step == 0
    assert ("critic/score/mean", 3) in writers[0].scalars and ("val/accuracy", 0) in writers[0].scalars
    os.replace(run / "checkpoint", run / ".checkpoint.old-123")  # killed between commit_directory's renames
    resumed = Trainer.resume(run, reward_fn=digit_share)
    assert resumed.global_step == 2 and [r["step"] for r in read_metrics(run)] == [0, 1, 2]
    assert resumed.step()["step"] == 3 and writers[1].purge_step == 3
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]


def test_a_non_finite_reward_is_one_clear_error(world, tmp_path):
    trainer = Trainer.start(tiny_config(world), tmp_path / "run", reward_fn=lambda problem, text: float("inf"))
    with pytest.raises(TrainingError, match="reward function returned inf"):
        trainer.step()


def test_resume_of_a_run_without_checkpoint_restarts_it(world, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer.start(tiny_config(world), run, reward_fn=digit_share)
    trainer.step()  # as if killed before its first checkpoint
    assert len(read_metrics(run)) == 1 and not (run / "checkpoint").exists()
    resumed = Trainer.resume(run, reward_fn=digit_share)
    assert resumed.global_step == 0 and not (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer.start(trainer.config, run)
    with pytest.raises(CheckpointError, match="not a run directory"):
        Trainer.resume(tmp_path / "elsewhere")


def test_jsonl_data_trains_and_holds_out_its_eval_problems(world, tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"... #### {2 * i}"}) + "\n"
                            for i in range(12)))
    cfg = tiny_config(world, data=dict(task="jsonl", path=str(data), eval_problems=4, prompts_per_step=4),
                      algorithm=dict(ppo_mini_batch_size=4), rollout=dict(group_size=2, spec="off"),
                      trainer=dict(steps=3, eval_every=0, eval_before_train=False))
    trainer = Trainer.start(cfg, tmp_path / "run")
    held_out = {p.prompt for p in trainer.evaluator.problems}
    for _ in range(3):  # 12 problems, 4 held out: a pass is 8, so step 3 starts the second pass
        trainer.step()
    pool = trainer.problems.pool()
    assert len(pool) == 8 and not held_out & {p.prompt for p in pool}
    assert (trainer.problems.epoch, trainer.problems.cursor) == (1, 4)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rollout.group_size": "1"}, "group_size"),
    ({"algorithm.ppo_mini_batch_size": "3"}, "do not split into minibatches"),
    ({"trainer.lr": "0"}, "trainer.lr must be a finite number > 0"),
    ({"algorithm.clip_low": "0"}, "clip_low"),
    ({"algorithm.clip_high": "-0.2"}, "clip_high"),
    ({"algorithm.clip_c": "1.0"}, "clip_c"),
    ({"algorithm.loss_agg": "sum"}, "loss_agg"),
    ({"data.task": "chess"}, "unknown"),
    ({"data.task": "jsonl"}, "data.path"),
    ({"data.task": "chainsum", "data.task_options": "{min_operandz: 1}"}, "bad options for task 'chainsum'"),
    ({"data.task": "chainsum", "data.task_options": "{min_operands: 0}"}, "1 <= min_operands"),
    ({"data.task_options": "[1]"}, "data.task_options must be dict"),
    ({"trainer.model": "/some/policy", "rollout.spec": "adaptive"}, "--drafter"),
    ({"trainer.steps": "many"}, "trainer.steps must be int"),
    ({"algorithm.clip": "0.2"}, "no setting 'clip'"),
    ({"learner.schedule": "rollout"}, "learner.schedule must be one of always, update"),
    ({"optimizer.lr": "0.1"}, "section.key"),
])
def test_each_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_config_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm:\n  clip_high: 0.28\n  clip_c: null\nrollout:\n  group_size: 4\n")
    cfg = load_config(path, {"trainer.lr": "1e-3", "data.prompts_per_step": "8", "data.task": "chainsum",
                             "data.task_options": "{min_operands: 1, alpha: 2}"})
    assert cfg.data.task_options == {"min_operands": 1, "alpha": 2}
    assert (cfg.algorithm.clip_high, cfg.algorithm.clip_c, cfg.rollout.group_size) == (0.28, None, 4)
    assert cfg.trainer.lr == 1e-3 and cfg.data.prompts_per_step == 8
    path.write_text("algorithm:\n  clip_hi: 0.28\n")
    with pytest.raises(ConfigError, match="no setting 'clip_hi'"):
        load_config(path)
    path.write_text("algorithm: [1, 2\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: invalid YAML"):
        load_config(path)


def test_the_completion_budget_defaults_to_the_tasks():
    from respec.world.tasks import DEFAULT_TASK, task_budget

    assert TrainConfig().data.task == DEFAULT_TASK == "probe" and TrainConfig().rollout.max_new_tokens == 512
    assert load_config(None, {"data.task": "arithmetic"}).rollout.max_new_tokens == task_budget("arithmetic") == 96
    assert load_config(None, {"data.task": "chainsum"}).rollout.max_new_tokens == 384
    # a budget that is the task's own follows an overridden task; one set by hand stays
    assert TrainConfig().with_overrides({"data.task": "arithmetic"}).rollout.max_new_tokens == 96
    assert load_config(None, {"data.task": "arithmetic", "rollout.max_new_tokens": "40"}).rollout.max_new_tokens == 40
    hand = TrainConfig(rollout=RolloutConfig(max_new_tokens=200))
    assert hand.with_overrides({"data.task": "arithmetic"}).rollout.max_new_tokens == 200
    assert RolloutConfig().max_new_tokens is None  # resolved by the run config that holds it


def test_bad_data_file_is_one_error_naming_the_line(world, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"\n')
    cfg = tiny_config(world, data=dict(task="jsonl", path=str(data)), rollout=dict(spec="off"))
    with pytest.raises(DataError, match="bad.jsonl:2"):
        Trainer.start(cfg, tmp_path / "run")
    data.write_text("")
    with pytest.raises(DataError, match="empty"):
        Trainer.start(cfg, tmp_path / "run")


def run_cli(monkeypatch, args: list[str]) -> int:
    """Returns the exit code of `respec *args` run in-process."""
    monkeypatch.setattr(sys, "argv", ["respec", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_cli_bad_config_is_one_error_line(monkeypatch, capsys, tmp_path):
    assert run_cli(monkeypatch, ["train", "--out", str(tmp_path / "run"), "--set", "rollout.group_size=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "group_size" in err[0]


def test_plot_runs_overlays_run_directories(monkeypatch, capsys, tmp_path):
    for name, slope in (("a", 0.1), ("b", 0.2)):
        (tmp_path / name).mkdir()
        rows = [{"step": 0, "val/accuracy": 0.3, "val/accuracy_greedy": 0.5}] + [
            {"step": s, "critic/score/mean": slope * s, "response_length/mean": 20 - s, "timing/rollout_s": 1.0,
             "timing/update_s": 0.3} for s in range(1, 5)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "runs.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "runs.png").unlink()
    assert run_cli(monkeypatch, ["plot", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "runs.png" in capsys.readouterr().out and (tmp_path / "runs.png").is_file()
