"""The embedded default policy: a small Qwen2 model trained here from scratch by supervised learning on a task's
generated solutions, saved as an ordinary HF checkpoint directory (config.json, model.safetensors, tokenizer).

The policy is shaped for the demo rather than for accuracy:
- deep and narrow (12 layers of width 128), so a one-layer EAGLE-3 drafter costs a small fraction of a target
  forward even at batch 1 on a CPU, where per-layer overhead dominates;
- trained on a *mixture* of solution styles (probe, the default world: worked 70%, direct 15%, sloppy 15%;
  arithmetic: worked 50%, direct 25%, sloppy 15%, checked 10%) of which only the worked ones are reliably right,
  every notation choice drawn at random (the tasks' docstrings), so its reward at temperature 1 is low and RL can
  visibly move both its style mix and its notation;
- trained briefly (800 steps on an idle 2-core machine with 2 threads as `respec demo` runs it, the layers skipping
  each batch's padding); the result is cached under $RESPEC_CACHE keyed by the config, and a
  cache entry is trusted only once its completion marker exists.

What the built policy scores on held-out problems is written to its directory (`eval.json`).

Training sequences are ``<bos> prompt completion <eos>`` with the loss on the completion and eos only; prompt and
completion are encoded separately, exactly as the policy sees them at generation (`respec.world.prompts.encode_prompt`).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from respec.engine.checkpoint import all_cores, load_model, save_model, torch_threads
from respec.engine.generate import Engine, SpecConfig
from respec.engine.model import ModelConfig, Transformer, init_model
from respec.engine.sampling import SamplingParams
from respec.errors import ConfigError, check_finite_loss
from respec.world.artifacts import cache_path, discard_partial, is_complete, mark_complete
from respec.world.env import TaskEnv, encode_transcript, is_env_task
from respec.world.prompts import encode_prompt
from respec.world.tasks import Problem, Task, get_task, task_budget
from respec.world.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer

Log = Callable[..., None]  # log(message) or log(message, fraction_done): progress for the caller to show

FORMAT_VERSION = 5  # bump when the training recipe changes so that old cache entries are not reused (CHANGELOG.md)
EVAL_SEED_OFFSET = 1_000_003  # eval problems come from seed + this; training skips any prompt they contain (but
# for a task with an environment)
# Per-task changes to the defaults (`PretrainConfig.for_task`). chainsum: a context for its longest training
# sequence plus its 384-token budget; length-grouped batches (its tail would pad most random batches' attention to
# several hundred positions, 3x slower); and a start from the arithmetic policy, which already adds column by column
# in the same notation and copies operands from the prompt: from scratch, 800 steps left the policy at 0% right,
# not yet copying the operands. redraw: the same start and batching, 800 steps (its traces are new text to the
# arithmetic policy: the range in the prompt, the bar, the stop decision). probe (the default world): from scratch
# in 800 steps (it copies two-digit numbers from a few tokens back and compares them; a start from the arithmetic
# policy cost that policy's build too, beyond the demo's budget), length-grouped, a context of 1,088 positions
# (its longest training transcript, spaced notation and all, plus its 512-token budget), and a vocabulary of 192
# so that each of its notation's words and spaced marks is one token (a choice the policy makes in one token).
RECIPES_BASES = ("arithmetic", "countdown")  # tasks a policy may start from (their own recipes start from scratch)
RECIPES: dict[str, dict] = {
    "chainsum": {"max_seq_len": 1024, "length_grouping": 50, "init_from": "arithmetic", "steps": 400, "lr": 1e-3,
                 "warmup": 20},
    "redraw": {"max_seq_len": 1024, "length_grouping": 50, "init_from": "arithmetic", "steps": 800, "lr": 1e-3,
               "warmup": 20},
    "probe": {"max_seq_len": 1088, "length_grouping": 50, "vocab_size": 192},
}
TOKENIZER_PROBLEMS = 2000  # problems whose prompts and completions (every style) train the tokenizer


@dataclass(frozen=True)
class PretrainConfig:
    """How the default policy is built; every field but num_threads enters the cache key."""

    task: str = "arithmetic"  # a synthetic task (one with sft_completion): "arithmetic" | "chainsum" | "countdown" | "redraw"
    # | "probe"; the field defaults are arithmetic's recipe, `for_task` gives another task's (probe: the default world)
    hidden_size: int = 128  # model width
    num_layers: int = 12  # decoder layers; >= 8 so a one-layer drafter is cheap relative to the target
    num_heads: int = 4  # attention heads (head_dim = hidden_size // num_heads)
    num_kv_heads: int = 2  # key/value heads (GQA); divides num_heads
    intermediate_size: int = 384  # SwiGLU width
    max_seq_len: int = 256  # max_position_embeddings of the saved model
    vocab_size: int = 128  # target size of the BPE tokenizer (the model's vocab is it rounded up to a multiple of 8)
    tie_word_embeddings: bool = True  # share embedding and head (fewer parameters to learn in a short run)
    steps: int = 800  # optimiser steps
    batch_size: int = 64  # sequences per step
    lr: float = 3e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # the cosine schedule decays to lr * min_lr_ratio
    warmup: int = 50  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not norms, biases)
    grad_clip: float = 1.0  # max global grad norm
    seed: int = 0  # model init, problems, styles and batch order
    num_train_problems: int = 60_000  # distinct training problems, one sampled completion each
    # The solution-style mixture (arithmetic: worked, direct, sloppy, checked); None = the task's default. The
    # checked style needs ~10% to be learnt at all: with less the policy's check lines come out wrong.
    style_weights: tuple[float, ...] | None = (0.5, 0.25, 0.15, 0.1)
    # Batches drawn from pools of this many batches sorted by length (0: uniformly random batches): a task with
    # heavy-tailed lengths needs it, or most batches pad their attention to a tail row (`epoch_batches`).
    length_grouping: int = 0
    # The task whose default policy (built or reused from the cache) this one starts from, its tokenizer and weights
    # (a curriculum); None = from scratch with a tokenizer trained on this task's texts.
    init_from: str | None = None
    # The task's parameters (e.g. {"min_operands": 1} for chainsum); empty = its defaults.
    task_options: dict = field(default_factory=dict)
    eval_problems: int = 256  # held-out problems evaluated after training
    eval_max_new_tokens: int = 96  # generation budget per eval problem (the RL rollout budget)
    # torch CPU threads while training; None = every core this process may use. 1 by default: on a small machine
    # shared with other processes more threads run slower (each OpenMP region waits for a descheduled thread);
    # `respec demo` uses every core of an idle machine. Not in the cache key: it changes speed only (the thread
    # count does not change the built weights).
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.style_weights is not None:
            object.__setattr__(self, "style_weights", tuple(float(w) for w in self.style_weights))
        positive = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_seq_len",
                    "steps", "batch_size", "num_train_problems", "eval_problems", "eval_max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"pretrain {name} must be a positive integer, got {value!r}")
        if not isinstance(self.length_grouping, int) or self.length_grouping < 0:
            raise ConfigError(f"pretrain length_grouping must be an integer >= 0 (0: random batches), "
                              f"got {self.length_grouping!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ConfigError(f"pretrain num_threads must be a positive integer or None, got {self.num_threads!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"head_dim hidden_size/num_heads must be even for RoPE, got "
                              f"{self.hidden_size // self.num_heads}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 64:
            raise ConfigError(f"vocab_size must be an integer >= 64 (the tokenizer alphabet needs ~100), "
                              f"got {self.vocab_size!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not isinstance(self.warmup, int) or not 0 <= self.warmup <= self.steps:
            raise ConfigError(f"warmup must be an integer in [0, steps={self.steps}], got {self.warmup!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0, got {self.grad_clip!r}")
        if self.style_weights is not None and (min(self.style_weights, default=-1) < 0
                                               or sum(self.style_weights) <= 0):
            raise ConfigError(f"style_weights must be non-negative with a positive sum, got {self.style_weights}")
        if self.init_from is not None and (self.init_from == self.task or self.init_from not in RECIPES_BASES):
            raise ConfigError(f"pretrain init_from must be another synthetic task ({', '.join(RECIPES_BASES)}), "
                              f"got {self.init_from!r}")
        self.make_task()  # unknown task or style weights that do not fit it fail now, not after the tokenizer

    @classmethod
    def for_task(cls, task: str, **changes) -> PretrainConfig:
        """Returns the default config for `task`: the default style mixture is the arithmetic one (four styles), so
        any other task trains on its own default mixture unless `changes` gives one; the evaluation budget is the
        task's (`task_budget`), and a task in RECIPES gets its recipe."""
        if task != "arithmetic":
            changes.setdefault("style_weights", None)
        changes.setdefault("eval_max_new_tokens", task_budget(task))
        for name, value in RECIPES.get(task, {}).items():
            changes.setdefault(name, value)
        return cls(task=task, **changes)

    def make_task(self) -> Task:
        """Returns the synthetic task this config trains on."""
        kwargs = {} if self.style_weights is None else {"style_weights": self.style_weights}
        task = get_task(self.task, **{**self.task_options, **kwargs})
        if not hasattr(task, "sft_completion"):
            raise ConfigError(f"task {self.task!r} has no generated solutions to pretrain on; "
                              f"use a synthetic task (arithmetic, chainsum, countdown, redraw, probe)")
        return task

    def cache_key(self) -> dict:
        """Returns the dict that names this config's cache entry."""
        fields = asdict(self)
        fields.pop("num_threads")  # changes speed, not the result
        for name in ("length_grouping", "init_from", "task_options"):  # absent from the keys of policies built
            # before they existed
            if not fields[name]:
                fields.pop(name)
        task = self.make_task()
        if is_env_task(task):  # trained on every prompt (not on those left after the held-out ones)
            fields["train_prompts"] = "all"
        if getattr(task, "text_format", 1) != 1:  # the task's texts changed since its first policies were built
            fields["text_format"] = task.text_format
        return {"kind": "policy", "format": FORMAT_VERSION, **fields}


def pretrain(cfg: PretrainConfig, out: str | Path | None = None, log: Log | None = None,
             metrics_path: Path | None = None) -> Path:
    """Returns the policy directory: `out` if given (always rebuilt), else cfg's cache entry (reused if complete).

    Training metrics go to `metrics_path` (default <dir>/train_metrics.jsonl) and the held-out evaluation to
    <dir>/eval.json. The directory appears atomically, and a cache entry is marked complete only afterwards.
    """
    key = cfg.cache_key()
    path = Path(out) if out is not None else cache_path("policy", key)
    if out is None:
        if is_complete(path):
            return path
        discard_partial(path)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        metrics = Path(metrics_path) if metrics_path is not None else scratch / "train_metrics.jsonl"
        model, tokenizer, evaluation = build_policy(cfg, metrics, log)
        save_tokenizer(tokenizer, scratch / "tokenizer")
        extra = {f.name: f.read_text() for f in sorted((scratch / "tokenizer").iterdir())}
        extra["eval.json"] = json.dumps(evaluation, indent=2) + "\n"
        if metrics_path is None:
            extra["train_metrics.jsonl"] = metrics.read_text()
        save_model(model, path, extra_files=extra)  # atomic: the directory appears whole or not at all
    if out is None:
        mark_complete(path, key)
    return path


def build_policy(cfg: PretrainConfig, metrics_path: Path, log: Log | None = None) -> tuple[Transformer, object, dict]:
    """Returns (trained model, its tokenizer, held-out evaluation); writes training metrics to `metrics_path`."""
    with torch_threads(cfg.num_threads or all_cores()):
        return _build_policy(cfg, metrics_path, log)


def _build_policy(cfg: PretrainConfig, metrics_path: Path, log: Log | None) -> tuple[Transformer, object, dict]:
    started = time.perf_counter()
    task = cfg.make_task()
    eval_set, train_set = split_problems(task, cfg)

    rng = random.Random(cfg.seed)
    base = None
    if cfg.init_from is not None:
        base_dir = pretrain(PretrainConfig.for_task(cfg.init_from, num_threads=cfg.num_threads), log=log)
        tokenizer, base = load_tokenizer(base_dir), load_model(base_dir, dtype=torch.float32)
    else:
        corpus = []
        for p in train_set[:TOKENIZER_PROBLEMS]:
            corpus.append(p.prompt)
            corpus.extend(task.sft_completion(p, rng, style=s)[0] for s in task.styles)
        tokenizer = build_tokenizer(corpus, vocab_size=cfg.vocab_size)
    model_cfg = ModelConfig(
        model_type="qwen2", vocab_size=-(-len(tokenizer) // 8) * 8, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = init_model(model_cfg, seed=cfg.seed)
    if base is not None:
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        if shapes != {k: v.shape for k, v in base.state_dict().items()}:
            raise ConfigError(f"pretrain init_from={cfg.init_from!r}: that policy's shape differs from this config's; "
                              "give both the same model shape")
        model.load_state_dict(base.state_dict())  # the context (max_seq_len) may differ: RoPE has no table

    examples = encode_examples(tokenizer, task, train_set, rng)
    needed = max(len(ids) for ids, *_ in examples) + cfg.eval_max_new_tokens
    if needed > cfg.max_seq_len:
        raise ConfigError(f"max_seq_len {cfg.max_seq_len} is too short for this task's sequences plus "
                          f"eval_max_new_tokens ({needed} needed); raise max_seq_len")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    train(model, examples, cfg, metrics_path, log)

    evaluation = {
        "temperature_1": evaluate_policy(model, tokenizer, task, eval_set, temperature=1.0, seed=cfg.seed,
                                         max_new_tokens=cfg.eval_max_new_tokens),
        "greedy": evaluate_policy(model, tokenizer, task, eval_set, temperature=0.0, seed=cfg.seed,
                                  max_new_tokens=cfg.eval_max_new_tokens),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - started, 1),
        "config": asdict(cfg),
    }
    if log is not None:
        t1, g = evaluation["temperature_1"], evaluation["greedy"]
        styles = ", ".join(f"{k} {v:.0%}" for k, v in t1["styles"].items())
        log(f"policy: {evaluation['parameters'] / 1e6:.2f}M parameters, {cfg.num_layers} layers; accuracy "
              f"{t1['accuracy']:.1%} at T=1, {g['accuracy']:.1%} greedy; styles at T=1: {styles}; "
              f"eos {t1['stop_rate']:.0%}; {evaluation['seconds']:.0f}s")
    return model, tokenizer, evaluation


def split_problems(task: Task, cfg: PretrainConfig) -> tuple[list[Problem], list[Problem]]:
    """Returns (held-out problems, training problems). A held-out problem's prompt is never trained on, except
    for a task with an environment: its rows differ by the environment's draws (the evaluation's nonces come from
    its own seed) and its prompts are few (probe: one per bar, nearly all of them among 256 held-out problems)."""
    eval_set = task.problems(cfg.eval_problems, seed=cfg.seed + EVAL_SEED_OFFSET)
    held_out = set() if is_env_task(task) else {p.prompt for p in eval_set}
    return eval_set, [p for p in task.problems(cfg.num_train_problems, seed=cfg.seed) if p.prompt not in held_out]


def encode_examples(tokenizer, task: Task, problems: list[Problem], rng: random.Random) -> list[tuple]:
    """Returns (ids = [bos] prompt completion [eos], number of prompt ids incl. bos) per problem, one sampled
    completion each. A multi-turn task's transcript is encoded turn by turn as rollouts hold it (eos after each
    policy turn, `world.env.encode_transcript`) and its example has a third item: the indices of its observation
    ids, which are never trained on (the environment writes them, the policy never samples them)."""
    completions = [task.sft_completion(p, rng)[0] for p in problems]
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if is_env_task(task):
        out = []
        for p, text in zip(prompts, completions, strict=True):
            ids, generated = encode_transcript(tokenizer, task, text)
            start = 1 + len(p)
            out.append(([bos, *p, *ids], start, tuple(start + j for j, g in enumerate(generated) if not g)))
        return out
    answers = tokenizer(completions, add_special_tokens=False)["input_ids"]
    return [([bos, *p, *a, eos], 1 + len(p)) for p, a in zip(prompts, answers, strict=True)]


def collate(examples: list[tuple], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (inputs [B, T], targets [B, T]) right-padded; targets are -100 on prompt, padding and an example's
    observation ids (its optional third item)."""
    T = max(len(ids) for ids, *_ in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (ids, n_prompt, *observed) in enumerate(examples):
        ids_t = torch.tensor(ids)
        inputs[b, : len(ids) - 1] = ids_t[:-1]
        # position j predicts ids[j + 1]; the first completion token is ids[n_prompt]
        targets[b, n_prompt - 1 : len(ids) - 1] = ids_t[n_prompt:]
        if observed and observed[0]:
            targets[b, torch.tensor(observed[0]) - 1] = -100
    return inputs, targets


def lr_schedule(step: int, steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Returns the learning rate of `step` (0-based): linear warm-up over `warmup` steps, then cosine from `peak`
    down to peak * min_ratio at `steps`. The one schedule of pretraining, drafter distillation and RL."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(steps - warmup, 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


def epoch_batches(lengths: list[int], batch_size: int, grouping: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Yields batches of example indices forever, epoch after epoch (each reshuffled with `gen`, its last partial
    batch dropped). With `grouping` = N > 0, each epoch's shuffled examples are cut into pools of N batches, each
    pool sorted by `lengths` and cut into batches, and the epoch's batches shuffled: attention runs over a batch
    padded to its longest row, and a heavy-tailed task would otherwise pad most batches to a tail row (HF's
    group_by_length). Pretraining and distillation draw their batches here."""
    while True:
        order = torch.randperm(len(lengths), generator=gen).tolist()
        usable = len(order) // batch_size * batch_size
        if not grouping:
            yield from (order[i : i + batch_size] for i in range(0, usable, batch_size))
            continue
        pool = grouping * batch_size
        grouped = []
        for start in range(0, usable, pool):
            members = sorted(order[start : min(start + pool, usable)], key=lambda i: lengths[i])
            grouped += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
        yield from (grouped[i] for i in torch.randperm(len(grouped), generator=gen).tolist())


def train(model: Transformer, examples: list[tuple[list[int], int]], cfg: PretrainConfig, metrics_path: Path,
          log: Log | None = None) -> None:
    """Trains `model` in place on `examples` for cfg.steps AdamW steps; appends one JSON line per step."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    batches = epoch_batches([len(ids) for ids, *_ in examples], cfg.batch_size, cfg.length_grouping,
                            torch.Generator().manual_seed(cfg.seed))
    pad_id = model.config.pad_token_id
    started = time.perf_counter()
    every = max(cfg.steps // 20, 1)
    with metrics_path.open("w") as metrics:
        for step in range(cfg.steps):
            batch = [examples[i] for i in next(batches)]
            t0 = time.perf_counter()
            inputs, targets = collate(batch, pad_id)  # [B, T] each
            seq_lens = torch.tensor([len(ids) - 1 for ids, *_ in batch])  # [B] real input tokens per row
            lr = lr_schedule(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            # The layers skip the padding (about 60% of a batch's positions here) and the head runs only where
            # a loss is taken: the same mean cross-entropy over the completion tokens, for less work.
            hidden, _ = model(inputs, seq_lens=seq_lens)  # [B, T, H]
            scored = targets != -100  # [B, T]
            loss = F.cross_entropy(model.lm_head(hidden[scored]), targets[scored])
            check_finite_loss(loss, step, "pretrain")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            dt = time.perf_counter() - t0
            tokens = int((inputs != pad_id).sum())
            row = {"step": step + 1, "loss": round(loss.item(), 5), "lr": lr, "grad_norm": round(grad_norm.item(), 4),
                   "tokens_per_s": round(tokens / dt, 1), "elapsed": round(time.perf_counter() - started, 2)}
            metrics.write(json.dumps(row) + "\n")
            if log is not None and (step % every == 0 or step == cfg.steps - 1):
                log(f"pretrain step {step + 1}/{cfg.steps} loss {row['loss']:.3f}", (step + 1) / cfg.steps)
    model.eval()


def evaluate_policy(policy: str | Path | Transformer, tokenizer, task: Task | str, problems: list[Problem] | int,
                    temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 64,
                    batch_size: int = 256) -> dict:
    """Returns accuracy, mean completion length, style histogram and finish reasons of `policy` on `problems`.

    `policy` is a model or a policy directory (then `tokenizer` may be None: the directory's is used); `task` a
    Task or its name; `problems` a list or a count of held-out problems (drawn with the pretraining eval seed
    offset). Temperature 0 is greedy.
    """
    if not isinstance(policy, Transformer):
        tokenizer = tokenizer or load_tokenizer(policy)
        policy = load_model(policy, dtype=torch.float32)
    task = get_task(task) if isinstance(task, str) else task
    if isinstance(problems, int):
        problems = task.problems(problems, seed=seed + EVAL_SEED_OFFSET)
    engine = Engine(policy)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    rewards, lengths, styles, finish = [], [], Counter(), Counter()
    style_of = getattr(task, "style_of", None)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        env = TaskEnv(task, chunk, tokenizer, seed) if is_env_task(task) else None
        result = engine.generate([encode_prompt(tokenizer, p.prompt) for p in chunk], params,
                                 SpecConfig(mode="off"), env=env)
        for p, seq in zip(chunk, result.sequences, strict=True):
            text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
            rewards.append(task.score(p, text).reward)
            lengths.append(len(seq.tokens))
            finish[seq.finish_reason] += 1
            if style_of is not None:
                styles[style_of(p, text)] += 1
    n = len(problems)
    return {"n": n, "temperature": temperature, "accuracy": sum(rewards) / n, "mean_tokens": sum(lengths) / n,
            "styles": {k: v / n for k, v in sorted(styles.items())}, "finish_reasons": dict(finish),
            "stop_rate": finish["stop"] / n}
