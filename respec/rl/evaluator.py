"""The evaluator: held-out accuracy of the current policy through the engine, and the drafter's staleness.

The held-out problems are never trained on (the problem stream removes their prompts). Evaluation runs on the
engine that rolls out, so it measures the policy the next rollout will sample from.
"""

from __future__ import annotations

from respec.engine.generate import Engine, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.rl.config import TrainConfig
from respec.rl.rollout import RewardFn
from respec.world.env import TaskEnv, is_env_task
from respec.world.prompts import encode_prompt
from respec.world.tasks import Problem

EVAL_K = 4  # draft length of the sampled evaluation pass (the drafter's staleness measure)


class Evaluator:
    """Scores the engine's policy on fixed held-out problems; stateless between calls (its tuner is rebuilt from
    the profiled costs, its seed is the run's)."""

    def __init__(self, config: TrainConfig, engine: Engine, tokenizer, reward_fn: RewardFn, problems: list[Problem],
                 task=None):
        self.config, self.engine, self.tokenizer, self.reward_fn, self.problems = \
            config, engine, tokenizer, reward_fn, problems
        # A multi-turn task's environment answers the held-out rows' tool calls (nonces from the run's seed).
        self.env = TaskEnv(task, problems, tokenizer, config.trainer.seed) if is_env_task(task) else None
        self.spec = config.rollout.spec_config()
        self._chooser = None

    def evaluate(self) -> dict:
        """Returns held-out metrics through the engine: mean reward at the rollout temperature (val/accuracy, verl's
        test score) and greedy (val/accuracy_greedy); the share of answers with a positive reward (val/correct,
        val/correct_greedy: the right answers of the embedded tasks, whose reward is 0 only when wrong); and the
        mean response length at that temperature.

        With a drafter, the sampled pass runs static SD with k = EVAL_K drafts (exact, so the accuracy is the
        policy's) and also returns `val/emitted_per_step_k4`: the current drafter's tokens per verify step on the
        held-out prompts, the staleness measure that does not depend on the tuner's choice of k."""
        d, r = self.config.data, self.config.rollout
        prompts = [encode_prompt(self.tokenizer, p.prompt) for p in self.problems]
        budget = d.eval_max_new_tokens or r.max_new_tokens
        out = {}
        for name, temperature in (("", r.temperature), ("_greedy", 0.0)):
            params = SamplingParams(temperature=temperature, max_new_tokens=budget, seed=self.config.trainer.seed)
            if not name and self.engine.drafter is not None:
                result = self.engine.generate(prompts, params, SpecConfig(mode="static", k=EVAL_K), env=self.env)
                out[f"val/emitted_per_step_k{EVAL_K}"] = result.mean_emitted_per_step
            else:
                result = self.engine.generate(prompts, params, self.spec, chooser=self._k_chooser(), env=self.env)
            texts = self.tokenizer.batch_decode([s.tokens for s in result.sequences], skip_special_tokens=True)
            rewards = [float(self.reward_fn(p, t)) for p, t in zip(self.problems, texts, strict=True)]
            out[f"val/accuracy{name}"] = sum(rewards) / len(rewards)
            out[f"val/correct{name}"] = sum(r > 0 for r in rewards) / len(rewards)
            if not name:
                out["val/response_length"] = result.num_tokens / len(prompts)
        return out

    def _k_chooser(self):
        """Returns a tuner of its own for evaluation (adaptive mode), so that greedy acceptance rates do not leak
        into the rollout tuner's estimates; it shares the profiled costs."""
        if self.spec.mode != "adaptive":
            return None
        if self._chooser is None:
            from respec.engine.tuner import Tuner

            tuner = self.engine.default_tuner(self.spec.k_max)
            self._chooser = Tuner(tuner.costs, tuner.k_max, tuner.config)
        return self._chooser

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
