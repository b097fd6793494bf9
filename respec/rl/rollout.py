"""The rollout role: problems in, a batch of scored rollouts with their old-policy logprobs out.

`Rollout.run` encodes each problem's prompt G times (consecutive groups), generates through the engine (which
holds its own copy of the policy, as vLLM does, and returns per token the logprob of the verifying forward: the
old-policy logprobs, never recomputed), decodes and scores each completion with `reward_fn(problem, text)`,
normalises the rewards within each group (`grpo.group_advantages`) and packs it all as training tensors
(`TrainBatch`) with the step's rollout metrics. A multi-turn task's environment (`world.env.TaskEnv`) answers the
rows' tool calls during generation; its observation tokens stay in the sequences but out of `TrainBatch.mask`. What generates is the engine, or a pool of workers with
`Engine.generate`'s signature that shards the prompts (`respec.cluster`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from respec.engine.generate import GenerationResult
from respec.engine.sampling import SamplingParams
from respec.errors import TrainingError
from respec.rl.config import TrainConfig
from respec.rl.grpo import group_advantages
from respec.rl.rollout_shape import rollout_shape
from respec.world.env import TaskEnv, is_env_task
from respec.world.prompts import encode_prompt
from respec.world.tasks import Problem

RewardFn = Callable[[Problem, str], float]  # (problem, completion text) -> reward


@dataclass
class TrainBatch:
    """A step's rollouts as training tensors; completion tensors are [N, Tc] (token j of row b's completion)."""

    input_ids: torch.Tensor  # [N, L]
    prompt_lens: torch.Tensor  # [N]
    seq_lens: torch.Tensor  # [N] prompt + completion
    tokens: torch.Tensor  # [N, Tc] completion ids (0 past the end), observation tokens included
    old_logp: torch.Tensor  # [N, Tc] the engine's logprobs of them (0.0 at observation tokens)
    mask: torch.Tensor  # [N, Tc] bool: the policy sampled token j (False past the end and at observation tokens)
    advantages: torch.Tensor  # [N]

    def rows(self, index: torch.Tensor) -> TrainBatch:
        """Returns the sub-batch of rows `index`, trimmed to its longest sequence and completion."""
        S = int(self.seq_lens[index].max())
        Tc = int((self.seq_lens - self.prompt_lens)[index].max())  # the mask has holes at observation tokens
        return TrainBatch(self.input_ids[index, :S], self.prompt_lens[index], self.seq_lens[index],
                          self.tokens[index, :Tc], self.old_logp[index, :Tc], self.mask[index, :Tc],
                          self.advantages[index])

    def loss_mask(self) -> torch.Tensor:
        """Returns [N, L] bool: position t predicts a completion token the policy sampled (prompt_len - 1 <= t <
        seq_len - 1, and `mask` set at token t + 1 - prompt_len: never an observation token)."""
        N, L = self.input_ids.shape
        Tc = self.mask.shape[1]
        pos = (self.prompt_lens[:, None] - 1 + torch.arange(Tc, device=self.mask.device)[None]).clamp(max=L - 1)
        out = torch.zeros(N, L, dtype=torch.bool, device=self.mask.device)
        return out.scatter(1, pos, self.mask & (pos < self.seq_lens[:, None] - 1))


@dataclass
class Rollouts:
    """One step's scored rollouts: the training tensors, the rewards [N], the engine's result and the metrics."""

    batch: TrainBatch
    rewards: torch.Tensor  # [N]
    result: GenerationResult
    metrics: dict
    finished: float  # time.perf_counter() when the rollout phase ended (its timings end there)


class Rollout:
    """Generates and scores one step's rollouts; holds no state of its own beyond the engine's tuner."""

    def __init__(self, config: TrainConfig, engine, tokenizer, reward_fn: RewardFn, device: torch.device,
                 workers=None, task=None):
        self.config, self.engine, self.tokenizer, self.reward_fn = config, engine, tokenizer, reward_fn
        self.device = device
        self.env_task = task if is_env_task(task) else None  # a multi-turn task: its environment answers turns
        self.workers = workers  # a pool with Engine.generate's signature that generates instead of the engine
        self.spec = config.rollout.spec_config()

    def encode(self, problem: Problem) -> list[int]:
        return encode_prompt(self.tokenizer, problem.prompt)

    def run(self, problems: list[Problem], seed: int, step: int, t0: float | None = None) -> Rollouts:
        """Returns the rollouts of `problems` x group_size samples drawn with `seed` (row i: stream i of it), for
        RL step `step` (1-based, named in errors). `timing/rollout_s` counts from `t0` (`time.perf_counter()`;
        default: now), so a caller's step phases add up to its step."""
        r, G = self.config.rollout, self.config.rollout.group_size
        t0 = time.perf_counter() if t0 is None else t0
        prompts = [self.encode(p) for p in problems for _ in range(G)]  # consecutive groups of G
        params = SamplingParams(temperature=r.temperature, max_new_tokens=r.max_new_tokens, seed=seed)
        env = None if self.env_task is None else \
            TaskEnv(self.env_task, [p for p in problems for _ in range(G)], self.tokenizer, seed)
        cpu0 = time.thread_time()
        result = (self.workers or self.engine).generate(prompts, params, self.spec, env=env)
        t_rollout = time.perf_counter()
        rollout_cpu = time.thread_time() - cpu0  # this thread's CPU time: what other processes cannot inflate

        texts = self.tokenizer.batch_decode([s.tokens for s in result.sequences], skip_special_tokens=True)
        rewards = []
        for i, text in enumerate(texts):
            reward = float(self.reward_fn(problems[i // G], text))
            if not math.isfinite(reward):
                raise TrainingError(f"the reward function returned {reward} for problem {problems[i // G].prompt!r} "
                                    f"at step {step}: rewards must be finite numbers")
            rewards.append(reward)
        rewards_t = torch.tensor(rewards, dtype=torch.float32, device=self.device)  # [N]
        advantages = group_advantages(rewards_t, G, scale=self.config.algorithm.adv_scale)  # [N]
        batch = self._batch(prompts, result, advantages)
        metrics = {**_score_metrics(rewards_t, advantages, batch, G),
                   "response_length/clip_ratio":
                       sum(s.finish_reason == "length" for s in result.sequences) / len(texts),
                   **_shape_metrics(result),
                   "rollout/tokens_per_s": result.num_tokens / max(t_rollout - t0, 1e-9),
                   "rollout/mean_emitted_per_step": result.mean_emitted_per_step,
                   "rollout/k_mean": result.mean_k,
                   "timing/rollout_s": t_rollout - t0,
                   "timing/rollout_cpu_s": rollout_cpu,
                   "timing/decode_s": sum(s.seconds for s in result.stats),  # the decode steps' share of it
                   "timing/prefill_s": result.prefill_seconds}  # and the prefills' (continuations included)
        finished = time.perf_counter()
        metrics["timing/reward_s"] = finished - t_rollout
        return Rollouts(batch, rewards_t, result, metrics, finished)

    def _batch(self, prompts: list[list[int]], result: GenerationResult, advantages: torch.Tensor) -> TrainBatch:
        """Returns the step's training tensors from the prompts and the engine's sequences (once per step)."""
        seqs = result.sequences
        N, dev = len(seqs), self.device
        prompt_lens = torch.tensor([len(p) for p in prompts])
        comp_lens = torch.tensor([len(s.tokens) for s in seqs])
        seq_lens = prompt_lens + comp_lens
        L, Tc = int(seq_lens.max()), max(int(comp_lens.max()), 1)
        input_ids = torch.zeros(N, L, dtype=torch.long)
        tokens = torch.zeros(N, Tc, dtype=torch.long)
        old_logp = torch.zeros(N, Tc, dtype=torch.float32)
        for b, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
            input_ids[b, : len(p) + len(s.tokens)] = torch.tensor(p + s.tokens)
            tokens[b, : len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
            old_logp[b, : len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
        mask = torch.zeros(N, Tc, dtype=torch.bool)
        for b, s in enumerate(seqs):
            mask[b, : len(s.tokens)] = torch.tensor(s.generated, dtype=torch.bool)
        return TrainBatch(input_ids.to(dev), prompt_lens.to(dev), seq_lens.to(dev), tokens.to(dev),
                          old_logp.to(dev), mask.to(dev), advantages)

    def state_dict(self) -> dict:
        """Returns the adaptive tuner's state (its acceptance evidence) as {"tuner": state}, or with rollout
        workers {"tuners": [state or None per worker]}; {} in other modes."""
        if self.spec.mode != "adaptive":
            return {}
        if self.workers is not None:
            return {"tuners": self.workers.tuner_states()}
        tuner = self.engine.tuner
        return {"tuner": tuner.state_dict()} if tuner is not None and hasattr(tuner, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        """Loads `state_dict()`'s tuner states, also across backends (every worker gets a local run's tuner; a
        local run gets the first worker's)."""
        if self.spec.mode != "adaptive":
            return
        states = state.get("tuners") or ([state["tuner"]] if "tuner" in state else [])
        if self.workers is not None:
            self.workers.load_tuner_states(states, self.spec.k_max)
        elif any(s is not None for s in states):
            first = next(s for s in states if s is not None)
            self.engine.default_tuner(self.spec.k_max).load_state_dict(first)


def _score_metrics(rewards: torch.Tensor, advantages: torch.Tensor, batch: TrainBatch, G: int) -> dict[str, float]:
    """Returns the reward, advantage and length metrics under verl's names and TRL's (one host sync)."""
    lengths = batch.mask.sum(1).float()  # [N]
    group_std = rewards.view(-1, G).std(1)  # [P]
    stats = {
        "critic/score/mean": rewards.mean(), "critic/score/std": rewards.std(),
        "critic/score/max": rewards.max(), "critic/score/min": rewards.min(),
        "critic/advantages/mean": advantages.mean(), "critic/advantages/max": advantages.max(),
        "critic/advantages/min": advantages.min(),
        "response_length/mean": lengths.mean(), "response_length/max": lengths.max(),
        # TRL's names (reward_std: the mean of the per-prompt stds, as TRL logs it)
        "reward": rewards.mean(), "reward_std": group_std.mean(),
        "frac_reward_zero_std": (group_std == 0).float().mean(), "completions/mean_length": lengths.mean(),
    }
    return dict(zip(stats, torch.stack(list(stats.values())).tolist(), strict=True))


def _shape_metrics(result: GenerationResult) -> dict[str, float]:
    """Returns the rollout's response-length quantiles and its decode seconds per live-batch range
    (`rollout_shape`): where the rollout's time went as its batch drained."""
    shape = rollout_shape([len(s.tokens) for s in result.sequences], result.stats)
    return {**{f"response_length/{k}": shape["length"][k] for k in ("median", "p90", "p99")},
            **{f"rollout/batch_s/{label}": v for label, v in shape["batch_s"].items()}}
