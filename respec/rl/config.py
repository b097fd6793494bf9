"""The configuration of an RL run: one tree of frozen dataclasses (trainer, algorithm, rollout, data, learner), read from
YAML with `section.key=value` overrides, written back into the run directory as config.yaml.

Names follow verl (and TRL where verl has none) so that a number means the same here: each field's comment names
its verl / TRL counterpart. The defaults train the embedded 2.4M-parameter arithmetic policy with adaptive
speculative decoding.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from respec.engine.compile import COMPILE_MODES
from respec.errors import ConfigError
from respec.rl.grpo import ADV_SCALES, KL_KINDS, LOSS_AGGS
from respec.world.tasks import DEFAULT_TASK, task_budget

SPEC_MODES = ("off", "static", "adaptive")  # the engine's modes that make sense for rollouts (not "replay")
DTYPES = ("fp32", "bf16")
BACKENDS = ("local", "ray")


def _positive_int(section: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{section}.{name} must be an integer >= {minimum}, got {value!r}")


def _finite(section: str, name: str, value, low: float, low_inclusive: bool, hint: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value >= low if low_inclusive else value > low)
    if not ok:
        bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
        raise ConfigError(f"{section}.{name} must be a finite number {bound}, got {value!r}{hint}")


@dataclass(frozen=True)
class TrainerConfig:
    """The optimiser, the schedule and the run's bookkeeping (verl `trainer.*` and `actor.optim.*`)."""

    model: str | None = None  # policy directory (HF layout + tokenizer); None = the embedded default (cached)
    steps: int = 200  # RL steps in the run; the LR schedule spans them (verl trainer.total_training_steps)
    lr: float = 1e-4  # peak AdamW learning rate (verl actor.optim.lr, TRL learning_rate); on the embedded policy
    # 1e-4 learns faster than 5e-5 and 5e-4 collapses reward to 0 (Adam's early steps move every weight by ~lr)
    warmup_steps: int = 5  # linear LR warm-up, in RL steps (verl actor.optim.lr_warmup_steps)
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step (verl optim.min_lr_ratio)
    weight_decay: float = 0.0  # AdamW weight decay on matrices (TRL's 0.0; verl uses 0.01)
    grad_clip: float = 1.0  # max global gradient norm (verl actor.grad_clip, TRL max_grad_norm)
    eval_every: int = 10  # evaluate on held-out problems every N steps and at the last one; 0 = never
    eval_before_train: bool = True  # evaluate the starting policy too, logged as step 0 (verl val_before_train)
    save_every: int = 10  # checkpoint every N steps and at the last one; 0 = only at the last
    seed: int = 0  # data order, rollout sampling, minibatch shuffling
    dtype: str | None = None  # "fp32" | "bf16": the engine's weights and the actor's autocast (master weights
    # stay fp32); None = fp32 on CPU, bf16 on CUDA
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:1" ...
    num_threads: int | None = 1  # torch CPU threads (1: on a shared 2-core machine more threads ran slower)
    backend: str = "local"  # "local": every role in this process; "ray": rollout workers (and an async learner)
    # as Ray actors (respec/cluster, the `ray` extra); the driver runs the update, evaluation and checkpoints
    ray_address: str | None = None  # backend=ray: "HOST:PORT" of a running cluster's head (`ray start --head`);
    # None = start a local Ray instance on this machine's CPUs

    def __post_init__(self) -> None:
        s = "trainer"
        _positive_int(s, "steps", self.steps)
        _finite(s, "lr", self.lr, 0.0, False, " (try 1e-4 for the embedded policy, ~1e-6 for a 0.5B+ model)")
        _positive_int(s, "warmup_steps", self.warmup_steps, 0)
        _finite(s, "min_lr_ratio", self.min_lr_ratio, 0.0, True)
        if self.min_lr_ratio > 1:
            raise ConfigError(f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        _finite(s, "weight_decay", self.weight_decay, 0.0, True)
        _finite(s, "grad_clip", self.grad_clip, 0.0, False)
        _positive_int(s, "eval_every", self.eval_every, 0)
        _positive_int(s, "save_every", self.save_every, 0)
        if not isinstance(self.seed, int):
            raise ConfigError(f"trainer.seed must be an integer, got {self.seed!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"trainer.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.num_threads is not None:
            _positive_int(s, "num_threads", self.num_threads)
        if self.backend not in BACKENDS:
            raise ConfigError(f"trainer.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.ray_address is not None and self.backend != "ray":
            raise ConfigError("trainer.ray_address joins a Ray cluster and needs trainer.backend=ray")


@dataclass(frozen=True)
class AlgorithmConfig:
    """GRPO: advantages, the clipped policy loss, optimisation epochs, the optional KL term (grpo.py's math)."""

    adv_scale: str = "group"  # "group": (r - mean) / (std + eps); "none": r - mean, Dr. GRPO
    # (verl algorithm.norm_adv_by_std_in_grpo True / False, TRL scale_rewards "group" / "none")
    ppo_epochs: int = 1  # optimisation passes over each step's rollouts (verl actor.ppo_epochs, TRL num_iterations)
    ppo_mini_batch_size: int = 4  # prompts per optimiser step, each with its G samples (verl actor.ppo_mini_batch_size,
    # in prompts as verl counts it); data.prompts_per_step / this = updates per epoch
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low (verl clip_ratio_low, TRL epsilon)
    clip_high: float = 0.2  # ratio clipped above at 1 + clip_high (verl clip_ratio_high, TRL epsilon_high; DAPO 0.28)
    clip_c: float | None = 3.0  # dual clip bound for negative advantages (verl clip_ratio_c); None = off (TRL)
    loss_agg: str = "token-mean"  # verl loss_agg_mode: token-mean | seq-mean-token-mean | seq-mean-token-sum |
    # seq-mean-token-sum-norm (TRL loss_type "dapo" = token-mean)
    kl_coef: float = 0.0  # KL-to-reference loss weight (verl actor.kl_loss_coef with use_kl_loss, TRL beta);
    # 0 = no reference model is built
    kl_kind: str = "low_var_kl"  # verl actor.kl_loss_type: low_var_kl (k3, clamped) | k1 | k2 | abs (and aliases)

    def __post_init__(self) -> None:
        s = "algorithm"
        if self.adv_scale not in ADV_SCALES:
            raise ConfigError(f"algorithm.adv_scale must be one of {', '.join(ADV_SCALES)}, got {self.adv_scale!r}")
        _positive_int(s, "ppo_epochs", self.ppo_epochs)
        _positive_int(s, "ppo_mini_batch_size", self.ppo_mini_batch_size)
        _finite(s, "clip_low", self.clip_low, 0.0, False, " (verl's default is 0.2)")
        _finite(s, "clip_high", self.clip_high, 0.0, False, " (verl's default is 0.2, DAPO's clip-higher 0.28)")
        if self.clip_c is not None:
            _finite(s, "clip_c", self.clip_c, 1.0, False, " (verl's clip_ratio_c is 3.0; null turns the dual clip off)")
        if self.loss_agg not in LOSS_AGGS:
            raise ConfigError(f"algorithm.loss_agg must be one of {', '.join(LOSS_AGGS)}, got {self.loss_agg!r}")
        _finite(s, "kl_coef", self.kl_coef, 0.0, True)
        if self.kl_kind not in KL_KINDS:
            raise ConfigError(f"algorithm.kl_kind must be one of {', '.join(KL_KINDS)}, got {self.kl_kind!r}")


@dataclass(frozen=True)
class RolloutConfig:
    """How the engine samples the G answers per prompt (verl actor_rollout_ref.rollout.*)."""

    group_size: int = 8  # G samples per prompt (verl rollout.n, TRL num_generations)
    temperature: float = 1.0  # sampling temperature; logprobs are log softmax(logits / T) (verl rollout.temperature)
    max_new_tokens: int | None = None  # completion budget (verl data.max_response_length, TRL
    # max_completion_length); None = the data task's (`respec.world.tasks.task_budget`: probe 512, arithmetic 96)
    spec: str = "adaptive"  # speculative decoding: "off" | "static" (k drafts every step) | "adaptive" (the tuner)
    k: int = 4  # draft tokens per step in static mode
    k_max: int = 8  # the largest k the tuner may pick in adaptive mode
    compile: str = "off"  # decode steps: "off" (eager) | "on" (torch.compile) | "auto" (the faster per profiled cell)
    drafter: str | None = None  # EAGLE-3 drafter directory (the learner's start when it runs); None = the default's
    # when trainer.model is None, else none (then spec must be "off")
    workers: int = 1  # backend=ray: RolloutWorker actors, each with its own engine; prompts are sharded by group
    worker_threads: int = 1  # backend=ray: torch threads (and CPUs in the placement group) of each worker
    worker_gpus: float = 0.0  # backend=ray: GPUs of each worker's placement bundle (0 on CPU machines)

    def __post_init__(self) -> None:
        s = "rollout"
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2:
            raise ConfigError(f"rollout.group_size (G) must be an integer >= 2, got {self.group_size!r}: GRPO's "
                              "advantage compares the samples of one prompt with each other")
        _finite(s, "temperature", self.temperature, 0.0, False,
                " (GRPO needs sampled rollouts; greedy evaluation is done separately)")
        if self.max_new_tokens is not None:
            _positive_int(s, "max_new_tokens", self.max_new_tokens)
        if self.spec not in SPEC_MODES:
            raise ConfigError(f"rollout.spec must be one of {', '.join(SPEC_MODES)}, got {self.spec!r}")
        self.spec_config()  # k and k_max in the engine's range
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"rollout.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        _positive_int(s, "workers", self.workers)
        _positive_int(s, "worker_threads", self.worker_threads)
        _finite(s, "worker_gpus", self.worker_gpus, 0.0, True)

    def spec_config(self):
        """Returns the engine's SpecConfig for this rollout setting."""
        from respec.engine.generate import SpecConfig

        try:
            return SpecConfig(mode=self.spec, k=self.k, k_max=self.k_max)
        except ConfigError as e:
            raise ConfigError(f"rollout: {e}") from None


@dataclass(frozen=True)
class DataConfig:
    """Where prompts and rewards come from (verl data.*)."""

    task: str = DEFAULT_TASK  # a task of respec.world.tasks: probe (the default) | arithmetic | chainsum | countdown |
    # jsonl | redraw; rollout.max_new_tokens defaults to its budget (respec.world.tasks.task_budget)
    task_options: dict = field(default_factory=dict)  # the generated task's parameters, e.g. {min_operands: 1,
    # alpha: 2.0} for chainsum (respec.world.tasks); empty = its defaults
    path: str | None = None  # the .jsonl (or verl .parquet) file of task "jsonl" (GSM8K / MATH style: question, answer fields)
    eval_path: str | None = None  # held-out .jsonl for task "jsonl" (verl data.val_files); None = hold out
    # eval_problems problems of `path` (never trained on)
    reward_fn: str | None = None  # "module:function" called as f(problem, completion_text) -> float; None = the
    # task's scorer (slime's custom reward function)
    prompts_per_step: int = 16  # P distinct prompts per step; the rollout batch is P x G (verl data.train_batch_size)
    epoch_problems: int = 8192  # problems per pass of a generated task (a jsonl task passes over its file)
    eval_problems: int = 128  # held-out problems per evaluation
    eval_seed: int = 424_242  # problem seed of the held-out set of a generated task (world.prompts.HELD_OUT_SEED)
    eval_max_new_tokens: int | None = None  # evaluation budget; None = rollout.max_new_tokens

    def __post_init__(self) -> None:
        from respec.world.tasks import TASKS

        s = "data"
        if self.task not in TASKS:
            raise ConfigError(f"data.task {self.task!r} is unknown; choose one of {', '.join(TASKS)}")
        if self.task == "jsonl" and not self.path:
            raise ConfigError("data.task 'jsonl' needs data.path, a GSM8K-style .jsonl file (--data PATH)")
        if self.task != "jsonl" and (self.path or self.eval_path):
            raise ConfigError(f"data.path / data.eval_path are for task 'jsonl'; task {self.task!r} generates its "
                              "problems (pass --task jsonl with --data)")
        if self.task_options:
            if self.task == "jsonl":
                raise ConfigError("data.task_options are for a generated task; task 'jsonl' reads data.path")
            from respec.world.tasks import get_task

            get_task(self.task, **self.task_options)  # unknown or bad options fail now
        if self.reward_fn is not None and (self.reward_fn.count(":") != 1 or not all(self.reward_fn.split(":"))):
            raise ConfigError(f"data.reward_fn must look like 'package.module:function', got {self.reward_fn!r}")
        _positive_int(s, "prompts_per_step", self.prompts_per_step)
        _positive_int(s, "epoch_problems", self.epoch_problems)
        _positive_int(s, "eval_problems", self.eval_problems)
        if not isinstance(self.eval_seed, int):
            raise ConfigError(f"data.eval_seed must be an integer, got {self.eval_seed!r}")
        if self.eval_max_new_tokens is not None:
            _positive_int(s, "eval_max_new_tokens", self.eval_max_new_tokens)


LEARNER_MODES = ("off", "async", "sync")
WEIGHTINGS = ("reward", "uniform")
SCHEDULES = ("always", "update")


@dataclass(frozen=True)
class LearnerConfig:
    """The online drafter learner (rl/learner.py): reward-weighted distillation of the drafter on the rollouts,
    published to the engine between decode steps. ReSpec's names have no verl/TRL counterpart."""

    mode: str = "off"  # "off": the drafter stays frozen; "async": a thread trains while rollout and update go on;
    # "sync": the same steps run in the trainer's thread after each update (deterministic; for tests and ablations)
    schedule: str = "always"  # when an async learner trains: "always" (beside the rollout and the update);
    # "update": only while the policy updates, never beside the engine's rollouts and evaluations (where cores
    # share caches and memory bandwidth, a learner beside the rollout slows it; docs/rl.md)
    weighting: str = "uniform"  # "uniform": every sequence weighs 1 (plain online KD); "reward": ReSpec's
    # w ∝ exp(A / weight_temperature) per sequence (see learner.py). Uniform by default: on the embedded world
    # reward weighting measured no better (docs/results.md); the `respec` experiment configuration sets "reward"
    weight_temperature: float = 1.0  # tau of the reward weights; larger = closer to uniform
    lookahead: float = 0.0  # eta of the lookahead targets: each training target is moved one policy-gradient
    # step ahead, softmax(log p + eta * A * (onehot(next token) - p)) (see learner.py); 0 = the target p as is
    max_weight: float = 4.0  # reward weights are clipped to [0, max_weight] after normalising to mean 1
    lr: float = 1e-3  # AdamW learning rate of the drafter (constant)
    batch_size: int = 32  # sequences per learner step
    steps_per_rollout: int = 16  # learner steps per RL step at most (async: then it waits for the next rollouts)
    buffer_steps: int = 4  # the buffer keeps the rollouts of the last N RL steps
    holdout_fraction: float = 0.125  # share of each step's prompts (whole groups) kept out of training for the guard
    publish_every: int = 8  # learner steps between candidate checks (guard, then publish)
    guard_k: int = 4  # the guard compares expected tokens per verify step at this draft length
    guard_margin: float = 0.0  # publish only if candidate >= current + margin (tokens per verify step)
    ttt_steps: int = 4  # training-time-test unroll, as the offline drafter's
    step_decay: float = 0.8  # weight of unroll step j is step_decay ** j
    max_restarts: int = 3  # consecutive crashes after which the learner stops (training goes on, drafter frozen)

    def __post_init__(self) -> None:
        s = "learner"
        if self.mode not in LEARNER_MODES:
            raise ConfigError(f"learner.mode must be one of {', '.join(LEARNER_MODES)}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"learner.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"learner.weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        _finite(s, "weight_temperature", self.weight_temperature, 0.0, False)
        _finite(s, "max_weight", self.max_weight, 1.0, True)
        _finite(s, "lookahead", self.lookahead, 0.0, True)
        _finite(s, "lr", self.lr, 0.0, False)
        for name in ("batch_size", "steps_per_rollout", "buffer_steps", "publish_every", "guard_k", "ttt_steps"):
            _positive_int(s, name, getattr(self, name))
        _positive_int(s, "max_restarts", self.max_restarts, 0)
        _finite(s, "holdout_fraction", self.holdout_fraction, 0.0, False)
        if self.holdout_fraction >= 1:
            raise ConfigError(f"learner.holdout_fraction must be in (0, 1), got {self.holdout_fraction!r}")
        _finite(s, "guard_margin", self.guard_margin, 0.0, True)
        _finite(s, "step_decay", self.step_decay, 0.0, False)
        if self.step_decay > 1:
            raise ConfigError(f"learner.step_decay must be in (0, 1], got {self.step_decay!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One RL run: `TrainConfig(trainer=TrainerConfig(lr=1e-3), rollout=RolloutConfig(spec="off"))`."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)

    def __post_init__(self) -> None:
        if self.rollout.max_new_tokens is None:  # the task's budget
            object.__setattr__(self, "rollout", replace(self.rollout, max_new_tokens=task_budget(self.data.task)))
        P, G, mini = self.data.prompts_per_step, self.rollout.group_size, self.algorithm.ppo_mini_batch_size
        if P % mini:
            divisors = [d for d in range(1, P + 1) if P % d == 0]
            raise ConfigError(
                f"data.prompts_per_step ({P}) x rollout.group_size ({G}) = {P * G} samples do not split into "
                f"minibatches of algorithm.ppo_mini_batch_size ({mini}) prompts x {G} samples: choose "
                f"ppo_mini_batch_size among {divisors}")
        if self.rollout.spec != "off" and self.trainer.model is not None and self.rollout.drafter is None:
            raise ConfigError(
                f"rollout.spec '{self.rollout.spec}' needs a drafter for the policy {self.trainer.model}: pass "
                "--drafter DIR (an EAGLE-3 drafter of this policy, e.g. from `respec train-drafter`) or --spec off")
        if self.trainer.backend == "local" and (self.rollout.workers > 1 or self.rollout.worker_gpus):
            raise ConfigError(f"rollout.workers={self.rollout.workers} (and worker_gpus) place rollout workers on "
                              "Ray: set trainer.backend=ray, or rollout.workers=1")
        if self.learner.mode != "off" and self.trainer.model is not None and self.rollout.drafter is None:
            raise ConfigError(f"learner.mode '{self.learner.mode}' trains a drafter online and needs one to start "
                              f"from for the policy {self.trainer.model}: pass --drafter DIR or learner.mode=off")

    def to_dict(self) -> dict:
        """Returns the config as nested plain values (the layout of config.yaml)."""
        return asdict(self)

    def with_overrides(self, overrides: dict[str, str]) -> TrainConfig:
        """Returns this config with `{"section.key": "value"}` overrides applied (values parsed as YAML). A
        completion budget that is this config's task budget follows an overridden data.task unless
        rollout.max_new_tokens is overridden too."""
        tree = self.to_dict()
        if "data.task" in overrides and "rollout.max_new_tokens" not in overrides \
                and self.rollout.max_new_tokens == task_budget(self.data.task):
            tree["rollout"]["max_new_tokens"] = None
        return from_dict(_overridden(tree, overrides))


def _overridden(tree: dict, overrides: dict[str, str]) -> dict:
    """Returns the nested config tree with `{"section.key": "value"}` overrides applied."""
    for key, text in overrides.items():
        section, name = _split_key(key)
        if tree.get(section) is None:
            tree[section] = {}
        if isinstance(tree[section], dict):  # else from_dict names the section that is not a mapping
            tree[section][name] = _parse_value(key, text, _field_type(section, name))
    return tree


SECTIONS = {"trainer": TrainerConfig, "algorithm": AlgorithmConfig, "rollout": RolloutConfig, "data": DataConfig,
            "learner": LearnerConfig}


def _split_key(key: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise ConfigError(f"override {key!r} must be section.key with section one of {', '.join(SECTIONS)}, "
                          "e.g. algorithm.clip_high=0.28")
    known = [f.name for f in fields(SECTIONS[section])]
    if name not in known:
        raise ConfigError(f"{section} has no setting {name!r}; its settings are: {', '.join(known)}")
    return section, name


def _field_type(section: str, name: str):
    return typing.get_type_hints(SECTIONS[section])[name]


def _parse_value(key: str, text: str, kind):
    """Returns an override's value: the raw text for string settings, else the text read as YAML."""
    import yaml

    optional = type(None) in typing.get_args(kind)
    if optional and text.strip().lower() in ("", "null", "none", "~"):
        return None
    if kind is str or (optional and str in typing.get_args(kind)):
        return text  # paths and names stay text even if they look like numbers
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override {key}={text!r}: not a valid value") from None


def _coerce(where: str, value, kind):
    """Returns `value` as the setting's type (an int where a float is expected, a list as a tuple), or raises."""
    args = typing.get_args(kind)
    if value is None and (kind is type(None) or type(None) in args):
        return None
    expected = [a for a in args if a is not type(None)] or [kind]
    for t in expected:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
        if t is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    names = " or ".join(t.__name__ for t in expected) + (" or null" if type(None) in args else "")
    raise ConfigError(f"{where} must be {names}, got {value!r}")


def from_dict(tree: dict) -> TrainConfig:
    """Returns the TrainConfig of nested dicts like config.yaml's; unknown sections or keys are errors."""
    if not isinstance(tree, dict):
        raise ConfigError(f"a run config is a mapping of sections ({', '.join(SECTIONS)}), got {type(tree).__name__}")
    unknown = sorted(set(tree) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; the sections are {', '.join(SECTIONS)}")
    parts = {}
    for section, cls in SECTIONS.items():
        values = tree.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of settings, got {values!r}")
        hints = typing.get_type_hints(cls)
        for name in values:
            if name not in hints:
                raise ConfigError(f"{section} has no setting {name!r}; its settings are: {', '.join(hints)}")
        parts[section] = cls(**{name: _coerce(f"{section}.{name}", v, hints[name]) for name, v in values.items()})
    return TrainConfig(**parts)


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Returns the config of a YAML file (None = the defaults) with `{"section.key": "value"}` overrides applied."""
    import yaml

    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a run config is a mapping of sections ({', '.join(SECTIONS)})")
    return from_dict(_overridden(tree, overrides or {}))


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Writes config.yaml atomically (readers see the old or the new file)."""
    import yaml

    from respec.engine.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


__all__ = ["AlgorithmConfig", "DataConfig", "LearnerConfig", "RolloutConfig", "TrainConfig", "TrainerConfig", "from_dict",
           "load_config", "save_config"]
