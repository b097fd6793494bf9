"""GRPO on the speculative engine: the short loop over the roles of an RL run.

One step (slime's train loop):
  1. problems: the next P problems of the run's deterministic stream (`ProblemStream`);
  2. rollout: P x G samples from the engine, scored by `reward_fn(problem, completion_text)` (default: the task's
     scorer), with the verifier's logprobs as the old-policy logprobs and group-normalised advantages (`Rollout`);
  3. update: the GRPO optimiser steps on them (`ActorUpdate`), whose forward also taps the drafter's features for
     the online learner (kept per step in `Trainer.last_features`);
  4. push: the new policy weights to the engine, in memory (`Engine.load_weights`), and the tap to the learner;
  5. evaluate when due (`Evaluator`), one metrics line (`RunDir`), a checkpoint every `save_every` steps.
The roles know nothing of each other or of where they run; each has `state_dict()` / `load_state_dict()`, and
the run directory saves those plain dicts atomically, so a killed run resumes exactly where it was
(`respec.rl.checkpoint`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from respec.engine.checkpoint import load_model, resolve_dtype, torch_threads
from respec.engine.drafter import load_drafter
from respec.engine.generate import Engine
from respec.errors import ConfigError, TrainingError
from respec.rl.checkpoint import (  # re-exported: the CLI and benchmarks import them here
    CHECKPOINT,
    CONFIG,
    METRICS,
    RunDir,
)
from respec.rl.config import TrainConfig, load_config, save_config
from respec.rl.evaluator import EVAL_K, Evaluator
from respec.rl.learner import Learner, StepRollouts
from respec.rl.problems import ProblemStream
from respec.rl.rollout import RewardFn, Rollout
from respec.rl.update import ActorUpdate, FeatureTap
from respec.world.tasks import DEFAULT_TASK, Problem, Task, get_task
from respec.world.tokenizer import load_tokenizer

__all__ = ["CHECKPOINT", "CONFIG", "EVAL_K", "METRICS", "RewardFn", "Trainer"]

Log = Callable[..., None]  # log(message) or log(message, fraction_done)


class Trainer:
    """The loop of one run over its roles: `problems` (ProblemStream), `rollout` (Rollout: engine + reward),
    `update` (ActorUpdate: actor, optimiser, reference), `evaluator`, `learner` (None without one) and `run`
    (RunDir). It owns only the step count and the run's generator (rollout seeds, minibatch order).

    Build with `Trainer.start(config, run_dir)` or `Trainer.resume(run_dir)`; then `train()` or `step()`.
    """

    def __init__(self, config: TrainConfig, run_dir: Path, actor, engine: Engine, tokenizer,
                 task: Task, eval_problems: list[Problem], reward_fn: RewardFn,
                 reference=None, policy_dir: Path | None = None, cluster=None):
        self.config = config
        self.run = RunDir(run_dir)
        self.policy_dir = Path(policy_dir or config.trainer.model)  # where the tokenizer files come from
        self.engine, self.actor = engine, actor
        t = config.trainer
        device = next(actor.parameters()).device
        # trainer.backend=ray: rollout workers (and an async learner) as Ray actors (respec.cluster); the driver
        # keeps an engine of its own for evaluation and as the checkpoint's source of the current drafter.
        self.cluster = cluster
        self.workers = cluster.rollout_workers(engine) if cluster is not None else None
        self.learner = _learner(config, engine, self.workers, cluster)
        drafter = engine.drafter
        tap = FeatureTap(tuple(drafter.aux_layer_ids) if drafter is not None else ())
        if self.learner is not None:
            tap = replace(tap, draft_vocab_size=drafter.config.draft_vocab_size, draft_ids=self.learner.draft_ids)
        self.problems = ProblemStream(task, {p.prompt for p in eval_problems}, t.seed, config.data.epoch_problems)
        self.rollout = Rollout(config, engine, tokenizer, reward_fn, device, workers=self.workers, task=task)
        self.update = ActorUpdate(config, actor, reference,
                                  autocast=engine.dtype if engine.dtype != torch.float32 else None, tap=tap)
        self.evaluator = Evaluator(config, engine, tokenizer, reward_fn, eval_problems, task=task)
        self.global_step = 0  # RL steps done
        self.rng = torch.Generator().manual_seed(t.seed)  # rollout seeds and minibatch order
        self.last_features: StepRollouts | None = None

    @property
    def run_dir(self) -> Path:
        return self.run.path

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, config: TrainConfig, run_dir: str | os.PathLike, reward_fn: RewardFn | None = None,
              log: Log | None = None) -> Trainer:
        """Returns a trainer for a new run in `run_dir` (which must not hold one); writes run_dir/config.yaml.

        With no trainer.model the embedded default policy and drafter are built or reused from the cache; the
        config saved is the resolved one (their directories filled in).
        """
        run = RunDir(run_dir)
        run.check_new()
        if config.trainer.model is None:
            from respec.world.defaults import resolve_models

            synthetic = config.data.task if config.data.task != "jsonl" else DEFAULT_TASK
            policy, drafter = resolve_models(None, config.rollout.drafter, synthetic, log=log)
            config = replace(config, trainer=replace(config.trainer, model=str(policy)),
                             rollout=replace(config.rollout, drafter=str(drafter)))
        trainer = cls._build(config, run.path, None, reward_fn)
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(config, run.config_file)
        return trainer

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, reward_fn: RewardFn | None = None,
               overrides: dict[str, str] | None = None) -> Trainer:
        """Returns the trainer of the run in `run_dir` at its last checkpoint (at step 0 if it has none).

        metrics.jsonl is cut back to the lines the checkpoint had seen, so no step appears twice. `overrides`
        ({"trainer.steps": "300"}) change the saved config, which is rewritten.
        """
        run = RunDir(run_dir)
        run.check_existing()
        config = load_config(run.config_file, overrides)
        checkpoint = run.recover()
        trainer = cls._build(config, run.path, checkpoint, reward_fn)
        if overrides:
            save_config(config, run.config_file)
        if checkpoint is not None:
            trainer.load_state_dict(trainer.run.load_checkpoint(checkpoint, map_location=trainer.update.device))
        trainer.run.truncate_metrics()
        return trainer

    @classmethod
    def _build(cls, config: TrainConfig, run_dir: Path, checkpoint: Path | None,
               reward_fn: RewardFn | None) -> Trainer:
        t, r, d = config.trainer, config.rollout, config.data
        task, eval_task = _tasks(config)  # data errors first, before the (slow) model loads
        reward_fn = reward_fn or _reward_fn(d.reward_fn, task)
        cluster = _cluster(config)  # Ray missing, unreachable or too small: one line before any model loads
        device = torch.device(t.device)
        engine_dtype = resolve_dtype(t.dtype, device)
        policy_dir = checkpoint / "actor" if checkpoint is not None else Path(t.model)
        actor = load_model(policy_dir, torch.float32, device)  # fp32 master weights
        tokenizer = load_tokenizer(policy_dir)
        # The engine's own copy of the policy, loaded in its dtype (a .to(dtype) would round the RoPE buffers).
        rollout_model = load_model(policy_dir, engine_dtype, device).requires_grad_(False)
        drafter_dir = checkpoint / "drafter" if checkpoint is not None and (checkpoint / "drafter").is_dir() \
            else (Path(r.drafter) if r.drafter else None)
        drafter = load_drafter(drafter_dir, rollout_model) if drafter_dir is not None else None
        if drafter is not None:
            drafter.requires_grad_(False)
        reference = None
        if config.algorithm.kl_coef > 0:
            saved = checkpoint / "reference" if checkpoint is not None else None
            ref_dir = saved if saved is not None and saved.is_dir() else Path(t.model)  # the starting policy
            reference = load_model(ref_dir, torch.float32, device).requires_grad_(False)
        eval_problems = eval_task.problems(d.eval_problems, seed=d.eval_seed)
        # As many slots as a rollout or an evaluation has rows: the tuner profiles no larger batch.
        engine = Engine(rollout_model, drafter, compile=r.compile,
                        max_running=max(d.prompts_per_step * r.group_size, d.eval_problems))
        try:
            return cls(config, run_dir, actor, engine, tokenizer, task, eval_problems, reward_fn, reference,
                       policy_dir, cluster)
        except BaseException:
            if cluster is not None:
                cluster.close()
            raise

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self, steps: int | None = None, log: Log | None = None) -> list[dict]:
        """Runs steps until `global_step == steps` (default trainer.steps), checkpointing every save_every steps
        and at the end; returns this call's metrics rows."""
        total = self.config.trainer.steps if steps is None else steps
        with torch_threads(self.config.trainer.num_threads):
            rows = self.begin(log)
            while self.global_step < total:
                rows.append(self.advance(total, log))
        return rows

    def begin(self, log: Log | None = None) -> list[dict]:
        """Routes the learner's messages to `log` and runs the evaluation before training when it is due (a fresh
        run); returns its metrics row, if any. `train` calls it once; so does a driver that calls `advance`."""
        if self.learner is not None:
            self.learner.log = lambda message: _log(log, message)
        if not (self.config.trainer.eval_before_train and self.global_step == 0 and self.run.metrics_lines == 0):
            return []
        row = {"step": 0, **self.evaluator.evaluate()}
        self.run.write_metrics(row)
        _log(log, f"eval  step 0: accuracy {row['val/accuracy']:.1%} (T={self.config.rollout.temperature:g}), "
                  f"{row['val/accuracy_greedy']:.1%} greedy")
        return [row]

    def advance(self, total: int, log: Log | None = None) -> dict:
        """Runs one step of a run of `total` steps, checkpoints when due and reports progress; returns its row."""
        save_every = self.config.trainer.save_every
        row = self.step()
        if self.global_step == total or (save_every and self.global_step % save_every == 0):
            self.save_checkpoint()
        _log(log, f"train step {self.global_step}/{total}: reward {row['critic/score/mean']:.3f}, "
                  f"{row['timing/step_s']:.2f} s (rollout {row['timing/rollout_s']:.2f} s, k "
                  f"{row['rollout/k_mean']:.1f})"
                  + (f", drafter v{row['drafter/version']}" if self.learner is not None else ""),
             self.global_step / total)
        if "val/accuracy" in row:
            _log(log, f"eval  step {self.global_step}: accuracy {row['val/accuracy']:.1%}, "
                      f"{row['val/accuracy_greedy']:.1%} greedy")
        return row

    def step(self) -> dict:
        """Runs one RL step (rollout, reward, update, weight push, and evaluation when due); appends its metrics
        line and returns it."""
        t0 = time.perf_counter()
        cfg, step = self.config, self.global_step + 1
        problems = self.problems.next(cfg.data.prompts_per_step)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.rng))
        rollouts = self.rollout.run(problems, seed, step, t0)
        t_reward = rollouts.finished
        if self.learner is not None:  # learner.schedule=update: it trains while the policy updates, only
            self.learner.update_window(True)
        try:
            update, self.last_features = self.update.run(rollouts.batch, rollouts.rewards, step, self.rng)
        except TrainingError as e:
            saved = self.run.saved_step()
            kept = f"the last checkpoint (step {saved}) is intact" if saved is not None else "no checkpoint was saved"
            raise TrainingError(f"{e}; {kept}: resume with a lower trainer.lr, or check the rewards and the "
                                "weights") from None
        finally:
            if self.learner is not None:
                self.learner.update_window(False)  # its step in flight ends beside what follows; no new one starts
        t_update = time.perf_counter()
        weights = self.actor.state_dict()
        self.engine.load_weights(weights)  # in memory, from the next rollout on
        if self.workers is not None:
            self.workers.load_weights(weights)  # one transport send, every worker loads before its next rollout
        self.global_step = step
        t_push = time.perf_counter()
        if self.learner is not None:  # async: hands the rollouts over; sync: also trains the drafter now
            self.learner.submit(self.last_features)
        t_learner = time.perf_counter()
        row = {"step": step, **rollouts.metrics, **update,
               "timing/update_s": t_update - t_reward,
               "timing/push_s": t_push - t_update,
               "timing/learner_s": t_learner - t_push,
               "timing/step_s": t_learner - t0,
               **self._drafter_metrics(), **self._worker_metrics()}
        every = cfg.trainer.eval_every
        if every and (step % every == 0 or step == cfg.trainer.steps):
            t_eval = time.perf_counter()
            row.update(self.evaluator.evaluate())
            row["timing/eval_s"] = time.perf_counter() - t_eval
        self.run.write_metrics(row)
        return row

    def evaluate(self) -> dict:
        """Returns the held-out metrics of the current policy (`Evaluator.evaluate`)."""
        return self.evaluator.evaluate()

    def _drafter_metrics(self) -> dict:
        """Returns the staleness metrics: the drafter's version and age in policy steps, the learner's state."""
        if self.engine.drafter is None:
            return {}
        through = self.learner.trained_through if self.learner is not None else 0
        out = {"drafter/version": self.engine.drafter_version or 0, "drafter/age_steps": self.global_step - through}
        return {**out, **(self.learner.metrics() if self.learner is not None else {})}

    def _worker_metrics(self) -> dict:
        """Returns the Ray backend's: live workers, shards re-run after a worker died, and the rollout's wall time
        beyond its slowest shard (dispatch, transfer and gathering)."""
        if self.workers is None:
            return {}
        return {"rollout/workers_live": len(self.workers.live), "rollout/redispatched": self.workers.redispatched,
                "timing/ray_overhead_s": self.workers.overhead_s}

    def close(self) -> None:
        """Stops the learner's thread (a no-op without one) and the Ray actors; the trainer must not step
        afterwards."""
        if self.learner is not None:
            self.learner.close()
        if self.cluster is not None:
            self.workers.close()
            self.cluster.close()

    # -- persistence -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Returns the run's state as plain dicts, one per role, with the loop's own (step, generator, torch RNG).
        The learner's state and the engine's drafter are taken at one moment (the learner paused)."""
        with self.learner.paused() if self.learner is not None else contextlib.nullcontext():
            drafter = self.engine.drafter  # the learner's published version: replaced, never changed in place
            learner = self.learner.state_dict() if self.learner is not None else None  # None: none to save
        tensors = {"trainer_state": {"update": self.update.state_dict(), "rng": self.rng.get_state(),
                                     "torch_rng": torch.get_rng_state()}}
        if learner is not None:
            tensors["learner"] = learner
        plain = {"problems": self.problems.state_dict(), "rollout": self.rollout.state_dict()}
        return {"step": self.global_step, "tensors": tensors, "plain": plain, "drafter": drafter}

    def load_state_dict(self, state: dict) -> None:
        """Restores what `RunDir.load_checkpoint` returns of a checkpoint `save_checkpoint` wrote (the models
        themselves are loaded from it by `_build`)."""
        saved = state["trainer_state"]
        self.update.load_state_dict(saved["update"])
        self.rng.set_state(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        self.global_step = state["step"]
        self.problems.load_state_dict(state["problems"])
        self.rollout.load_state_dict(state.get("rollout", {}))
        if self.learner is not None and "learner" in state:
            self.learner.load_state_dict(state["learner"])
            self.engine.drafter_version = self.learner.version  # checkpoint/drafter is the learner's published one

    def save_checkpoint(self) -> Path:
        """Writes run_dir/checkpoint atomically (the previous one stays whole until the new one is): the actor
        (HF layout with its tokenizer), the reference, the drafter and every role's state. Returns its path."""
        state = self.state_dict()
        return self.run.save_checkpoint(state["step"], self.actor, self.policy_dir, state["tensors"], state["plain"],
                                        reference=self.update.reference, drafter=state["drafter"])


def _cluster(config: TrainConfig):
    """Returns the run's Ray cluster (trainer.backend=ray), or None."""
    if config.trainer.backend != "ray":
        return None
    from respec.cluster.ray_cluster import Cluster  # the one import upwards: the Ray placement of these roles

    return Cluster(config)


def _learner(config: TrainConfig, engine: Engine, workers, cluster):
    """Returns the online learner of the engine's drafter (a Ray actor's handle for an async learner on the Ray
    backend), or None (learner.mode=off or no drafter)."""
    if config.learner.mode == "off" or engine.drafter is None:
        return None
    t = config.trainer

    def publish(drafter, version: int) -> None:
        # A published version passed the guard (at least as good on recent rollouts): the tuner keeps its
        # acceptance evidence instead of falling back to its prior after every publication.
        engine.set_drafter(drafter, version, keep_evidence=1.0)
        if workers is not None:
            workers.set_drafter(drafter, version)

    if cluster is not None and config.learner.mode == "async":
        return cluster.learner(engine.drafter, publish, seed=t.seed)
    return Learner(config.learner, engine.drafter, publish, seed=t.seed)


def _tasks(config: TrainConfig) -> tuple[Task, Task]:
    """Returns (training task, held-out task); a jsonl file is read and checked now."""
    d = config.data
    if d.task != "jsonl":
        task = get_task(d.task, **d.task_options)
        return task, task
    task = get_task("jsonl", path=d.path)
    return task, (get_task("jsonl", path=d.eval_path) if d.eval_path else task)


def _reward_fn(spec: str | None, task: Task) -> RewardFn:
    """Returns the reward function named by data.reward_fn ("module:function"), else the task's scorer."""
    if spec is None:
        return lambda problem, completion: task.score(problem, completion).reward
    module, name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.reward_fn {spec!r} cannot be imported ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"data.reward_fn {spec!r} is not a function")
    return fn


def _log(log: Log | None, message: str, fraction: float | None = None) -> None:
    if log is not None:
        log(message, fraction)
