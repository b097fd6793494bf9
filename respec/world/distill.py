"""EAGLE-3 drafter distillation: target rollouts -> (features, next-token distributions) -> TTT-unrolled KD.

Offline, `build_drafter` trains a drafter once against a target (cached like the policy); online, the learner
calls the same `distill_loss` with reward weights on the rollouts that RL produces anyway.

Alignment (EAGLE). Drafter position t pairs the target feature f_t with token x_{t+1} and predicts x_{t+2}, so
its logits at t are trained against the target's distribution p_{t+1} (after x_0 .. x_{t+1}).

Training-time test (EAGLE-3). At inference the drafter catches up on true target features, then chains k-1
steps on its own output hidden states. Training unrolls the same chain for `ttt_steps` steps at every position
at once (SpecForge `specforge/core/eagle3.py`, `OfflineEagle3Model.forward`; attention with per-step key lists
in `specforge/modeling/draft/llama3_eagle.py`, `cache_hidden`). Unroll step j >= 1 at index t is the j-th
chained draft after a catch-up that ended at position t:

    input    feature h^{j-1}_t (the drafter's own output of step j-1), token x_{t+j+1}, RoPE position t + j
    keys     step-0 keys at indices 0..t (true features of the prefix) + the step-i keys at index t, i = 1..j
    target   p_{t+j+1}, masked where x_{t+j+2} is not a completion token

which is exactly what `Engine.draft` computes with the drafter's KV cache (a test checks the equality). The
tokens are the rollout's own (a chained draft only matters when all drafts before it were accepted, i.e. were
the target's sample). Unlike SpecForge (and the EAGLE-3 reference code, see SafeAILab/EAGLE issue #247), step j
also sees the step-0 keys at indices t-j+1 .. t, because our engine's chained drafts do.

Loss. Per position, forward KL(p || q) between the target's temperature-1 distribution restricted to the draft
vocab (renormalised) and the drafter's; per sequence weighted; step j weighted `step_decay ** j` (0.8 as in
EAGLE-3 / SpecForge). Positions whose target argmax lies outside the draft vocab are skipped, as SpecForge does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from respec.engine.checkpoint import atomic_directory, commit_directory, load_model
from respec.engine.drafter import Eagle3Drafter, init_drafter, save_drafter
from respec.engine.generate import Engine, SequenceOutput, SpecConfig
from respec.engine.model import Transformer
from respec.engine.sampling import SamplingParams
from respec.errors import CheckpointError, ConfigError, check_finite_loss
from respec.world.artifacts import MARKER, cache_path, discard_partial, is_complete, mark_complete
from respec.world.env import task_env
from respec.world.pretrain import Log, epoch_batches, lr_schedule
from respec.world.prompts import task_prompts
from respec.world.tasks import DEFAULT_TASK, TASKS, task_budget

VERSION = 2  # bump when a change here should invalidate cached drafters (2: prompts tokenised by the policy's own
# tokenizer; transformers 5 had swapped in Qwen2's pre-tokenizer when loading it from the policy directory)


@dataclass(frozen=True)
class DistillConfig:
    """How a drafter is distilled from a target; the defaults fit the 5-minute CPU budget of the demo."""

    num_rollouts: int = 512  # target rollouts (one per training prompt) to train on
    rollout_temperature: float = 1.0  # sampling temperature of the rollouts (1.0 = the RL rollout distribution)
    max_new_tokens: int = 96  # completion budget of each rollout
    steps: int = 500  # optimiser steps
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3  # AdamW peak learning rate (linear warm-up, cosine decay to 10%)
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm
    ttt_steps: int = 4  # training-time-test unroll length (EAGLE-3 uses up to 7; ~k of the engine is enough)
    step_decay: float = 0.8  # weight of unroll step j is step_decay ** j
    draft_vocab_size: int | None = None  # None = the whole target vocab; else the most frequent rollout tokens
    # Batches from pools of this many batches sorted by rollout length (0: random batches; pretrain.epoch_batches):
    # a long-tailed task's random batches pad the unrolled attention to a tail row.
    length_grouping: int = 0
    eval_prompts: int = 256  # held-out prompts for the acceptance measurement
    eval_max_new_tokens: int = 96
    eval_ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # draft lengths measured at T = 1; k = 4 is the headline
    seed: int = 0  # drafter init, batch order, rollout sampling
    train_seed: int = 1  # task problem seed of the training prompts
    eval_seed: int = 424242  # task problem seed of the held-out prompts (must differ from train_seed)

    @classmethod
    def for_task(cls, task: str, **changes) -> DistillConfig:
        """Returns the default config for distilling on `task`'s prompts: rollouts and the held-out measurement
        generate the task's completion budget (`task_budget`), so that the drafter sees the long responses too,
        and a task with a longer budget than arithmetic's trains on length-grouped batches."""
        budget = task_budget(task) if task in TASKS else cls.max_new_tokens
        changes.setdefault("max_new_tokens", budget)
        changes.setdefault("eval_max_new_tokens", budget)
        if budget != cls.max_new_tokens:
            changes.setdefault("length_grouping", 8)
        return cls(**changes)

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_ks", tuple(int(k) for k in self.eval_ks))
        positive = ("num_rollouts", "max_new_tokens", "steps", "batch_size", "ttt_steps", "eval_prompts",
                    "eval_max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"DistillConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.length_grouping, int) or self.length_grouping < 0:
            raise ConfigError(f"DistillConfig.length_grouping must be an integer >= 0, got {self.length_grouping!r}")
        if not self.rollout_temperature > 0:
            raise ConfigError(f"rollout_temperature must be > 0 (sampled rollouts), got {self.rollout_temperature}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ConfigError("warmup_steps and weight_decay must be >= 0 and grad_clip > 0")
        if not 0 < self.step_decay <= 1:
            raise ConfigError(f"step_decay must be in (0, 1], got {self.step_decay}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ConfigError(f"draft_vocab_size must be >= 1 or None (whole vocab), got {self.draft_vocab_size}")
        if not self.eval_ks or min(self.eval_ks) < 1 or max(self.eval_ks) > 16:
            raise ConfigError(f"eval_ks must be draft lengths in [1, 16], got {self.eval_ks}")
        if self.train_seed == self.eval_seed:
            raise ConfigError("train_seed and eval_seed must differ: acceptance is measured on held-out prompts")


@dataclass
class DistillBatch:
    """Rollouts as the target saw them, indexed by sequence position t (right-padded)."""

    input_ids: torch.Tensor  # [B, T] x_t (0 on padding)
    features: torch.Tensor  # [B, T, 3H] target aux states entering the drafter's aux layers at t
    target_logp: torch.Tensor  # [B, T, Vd] log p_t on the draft vocab, renormalised (p_t predicts x_{t+1})
    loss_mask: torch.Tensor  # [B, T] bool: x_{t+1} is a completion token (and p_t's argmax is in the draft vocab)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> DistillBatch:
        """Returns the sub-batch of rows `index`, trimmed to its longest masked span."""
        mask = self.loss_mask[index]
        # Unroll steps read tokens and targets at indices <= the last masked one, never beyond.
        T = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        return DistillBatch(self.input_ids[index, :T], self.features[index, :T], self.target_logp[index, :T],
                            mask[:, :T])


@torch.no_grad()
def target_batch(target: Transformer, sequences: list[list[int]], prompt_lens: list[int],
                 aux_layers: tuple[int, ...], draft_ids: torch.Tensor | None = None,
                 chunk: int = 64) -> DistillBatch:
    """Returns the DistillBatch of `sequences` (prompt + completion ids) from one causal target forward per row.

    draft_ids: target ids of the draft vocab [Vd] (`drafter.draft_ids_in_target()`); None = the whole vocab.
    Rows are run `chunk` at a time; the distributions are at temperature 1.
    """
    if len(sequences) != len(prompt_lens):
        raise ValueError("one prompt length per sequence")
    dev = next(target.parameters()).device
    B, T = len(sequences), max(len(s) for s in sequences)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, n) in enumerate(zip(sequences, prompt_lens, strict=True)):  # once per rollout, not per token
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, max(n - 1, 0): len(s) - 1] = True  # p_t predicts x_{t+1}, a completion token iff t+1 >= n
    ids, mask = ids.to(dev), mask.to(dev)
    feats, logps = [], []
    for lo in range(0, B, chunk):
        hidden, aux = target(ids[lo: lo + chunk], aux_layers=tuple(aux_layers))  # [b, T, H], [b, T, 3H]
        logits = target.lm_head(hidden).float()  # [b, T, V]
        if draft_ids is not None:
            in_draft = torch.zeros(logits.shape[-1], dtype=torch.bool, device=dev)
            in_draft[draft_ids] = True
            mask[lo: lo + chunk] &= in_draft[logits.argmax(-1)]  # SpecForge: skip targets the head cannot say
            logits = logits.index_select(-1, draft_ids.to(dev))  # [b, T, Vd]
        feats.append(aux)
        logps.append(F.log_softmax(logits, -1))
    return DistillBatch(ids, torch.cat(feats), torch.cat(logps), mask)


def _shift(x: torch.Tensor, n: int, fill: float | bool = 0) -> torch.Tensor:
    """Returns x [B, T, ...] shifted left by n along dim 1 (x[:, t + n] at t), `fill` past the end."""
    if n == 0:
        return x
    pad = torch.full_like(x[:, :n], fill)
    return torch.cat([x[:, n:], pad], dim=1)[:, : x.shape[1]]


def _ttt_layer(drafter: Eagle3Drafter, embeds: torch.Tensor, feature: torch.Tensor, positions: torch.Tensor,
               keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Returns the midlayer output [B, T, H] of one unroll step; appends this step's keys/values to the lists.

    The same math as `Eagle3Layer.forward`, with the attention over [step-0 keys (causal), step-1..j keys at
    the query's own index (diagonal)], i.e. what a chained draft attends to in the engine's drafter cache.
    """
    layer = drafter.midlayer
    attn = layer.self_attn
    B, T, _ = embeds.shape
    x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(feature)], dim=-1)  # [B, T, 2H]
    cos, sin = drafter.rope(positions, embeds.dtype)  # [B, T, 1, D]
    q, k, v = attn.heads_first(*attn.qkv(x, cos, sin))  # [B, H, T, D], [B, Hkv, T, D] x 2
    keys.append(k)
    values.append(v)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    diag = torch.eye(T, dtype=torch.bool, device=x.device)
    mask = torch.cat([causal] + [diag] * (len(keys) - 1), dim=1)  # [T, (j+1) T]
    out = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask,
                                         enable_gqa=attn.n_kv != attn.n_heads)  # [B, Hq, T, D]
    x = feature + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))  # [B, T, H]


def ttt_logits(drafter: Eagle3Drafter, input_ids: torch.Tensor, features: torch.Tensor,
               ttt_steps: int) -> list[torch.Tensor]:
    """Returns the draft logits [B, T, Vd] of each unroll step j (at index t: the j-th chained draft after a
    catch-up through position t, predicting x_{t+j+2})."""
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    feature = drafter.project(features)  # [B, T, H]
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    out = []
    for j in range(ttt_steps):
        embeds = drafter.embed(_shift(input_ids, j + 1))  # x_{t+j+1}
        hidden = _ttt_layer(drafter, embeds, feature, positions + j, keys, values)  # [B, T, H]
        out.append(drafter.compute_logits(hidden))
        feature = hidden  # the next step conditions on the drafter's own output, as chained drafting does
    return out


def distill_loss(drafter: Eagle3Drafter, batch: DistillBatch, ttt_steps: int,
                 weights: torch.Tensor | None = None, step_decay: float = 0.8) -> tuple[torch.Tensor, dict]:
    """Returns (loss, metrics): the TTT-unrolled, per-sequence weighted forward KL of the drafter to the target.

    weights [B] >= 0 per sequence (None = ones). Each step's loss is sum_b w_b sum_t KL_bt / sum_b w_b n_b over
    its masked positions, so ones give the plain token mean, a zero weight removes a sequence, and a weight of 2
    equals the sequence twice. Step j counts `step_decay ** j`. Metrics per step j: `loss_j` (KL),
    `acc_j` (top-1 agreement with the target) and `accept_j` (sum_v min(p, q), the T = 1 acceptance rate).
    """
    B = len(batch)
    if weights is None:
        weights = torch.ones(B, device=batch.input_ids.device)
    weights = weights.to(batch.target_logp.device, torch.float32)
    if weights.shape != (B,) or (weights < 0).any():
        raise ValueError(f"weights must be [B={B}] non-negative per-sequence weights, got {tuple(weights.shape)}")
    logits = ttt_logits(drafter, batch.input_ids, batch.features, ttt_steps)
    total = torch.zeros((), device=weights.device)
    metrics: dict[str, float] = {}
    for j, step_logits in enumerate(logits):
        logp = _shift(batch.target_logp, j + 1)  # [B, T, Vd] p_{t+j+1}
        mask = _shift(batch.loss_mask, j + 1, False).float() * weights[:, None]  # [B, T]
        logq = F.log_softmax(step_logits.float(), -1)  # [B, T, Vd]
        p = logp.exp()
        kl = (p * (logp - logq)).sum(-1)  # [B, T]; log_softmax keeps logp finite, so p log p is safe
        denom = mask.sum().clamp_min(1e-12)
        step_loss = (kl * mask).sum() / denom
        total = total + step_decay ** j * step_loss
        with torch.no_grad():
            agree = (logq.argmax(-1) == logp.argmax(-1)).float()
            overlap = torch.minimum(p, logq.exp()).sum(-1)
            metrics[f"loss_{j}"] = step_loss.item()
            metrics[f"acc_{j}"] = ((agree * mask).sum() / denom).item()
            metrics[f"accept_{j}"] = ((overlap * mask).sum() / denom).item()
    return total, metrics


def rollouts(target: Transformer, prompts: list[list[int]], temperature: float, max_new_tokens: int,
             seed: int, env=None) -> list[SequenceOutput]:
    """Returns one sampled completion per prompt from the target (plain decoding; a multi-turn task's `env`
    answers its turns)."""
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    return Engine(target).generate(prompts, params, SpecConfig(mode="off"), env=env).sequences


def drop_observations(loss_mask: torch.Tensor, prompt_lens: list[int], outputs: list[SequenceOutput]) -> None:
    """Clears loss_mask [B, T] (in place) at every position whose next token an environment wrote: the drafter
    never drafts an observation, the engine prefills it."""
    for b, (n, s) in enumerate(zip(prompt_lens, outputs, strict=True)):
        loss_mask[b, [n - 1 + j for j, g in enumerate(s.generated) if not g]] = False


def train_drafter(target: Transformer, prompts: list[list[int]], cfg: DistillConfig,
                  drafter: Eagle3Drafter | None = None, log: Log | None = None,
                  metrics_path: str | Path | None = None, env=None) -> Eagle3Drafter:
    """Returns a drafter trained on target rollouts of `prompts` (a new one unless `drafter` is given); a
    multi-turn task's `env` answers the rollouts' turns, and observation tokens are never drafting targets.

    Samples one rollout per prompt at `cfg.rollout_temperature`, runs the target once over all of them
    (features + distributions), then trains `cfg.steps` AdamW steps of `distill_loss`. Appends one JSON line of
    metrics per logged step to `metrics_path`.
    """
    t0 = time.perf_counter()
    prompts = list(prompts)[: cfg.num_rollouts]
    outputs = rollouts(target, prompts, cfg.rollout_temperature, cfg.max_new_tokens, cfg.seed, env)
    completions = [s.tokens for s in outputs]
    sequences = [p + c for p, c in zip(prompts, completions, strict=True)]
    if drafter is None:
        counts = torch.zeros(target.config.vocab_size, dtype=torch.long)
        for c in completions:
            counts += torch.bincount(torch.tensor(c, dtype=torch.long), minlength=len(counts))
        drafter = init_drafter(target, seed=cfg.seed, draft_vocab_size=cfg.draft_vocab_size,
                               token_frequencies=counts)
    full_vocab = drafter.config.draft_vocab_size == drafter.config.vocab_size
    draft_ids = None if full_vocab else drafter.draft_ids_in_target()
    data = target_batch(target, sequences, [len(p) for p in prompts], drafter.aux_layer_ids, draft_ids)
    drop_observations(data.loss_mask, [len(p) for p in prompts], outputs)
    t_data = time.perf_counter() - t0
    _log(log, f"distill: {len(sequences)} rollouts, {int(data.loss_mask.sum())} target positions "
                   f"({t_data:.1f}s)")

    drafter.train()
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    lengths = (data.loss_mask.cumsum(1) < data.loss_mask.sum(1, keepdim=True)).sum(1).tolist()  # [B] last masked t
    batches = epoch_batches(lengths, cfg.batch_size, cfg.length_grouping, torch.Generator().manual_seed(cfg.seed))
    log_every = max(cfg.steps // 20, 1)
    sink = open(metrics_path, "a") if metrics_path is not None else None  # noqa: SIM115 (closed below)
    try:
        for step in range(cfg.steps):
            index = torch.tensor(next(batches), device=data.input_ids.device)
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step, cfg.steps, cfg.lr, cfg.warmup_steps, 0.1)
            loss, metrics = distill_loss(drafter, data.rows(index), cfg.ttt_steps, step_decay=cfg.step_decay)
            check_finite_loss(loss, step, "train-drafter")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if step % log_every == 0 or step == cfg.steps - 1:
                record = {"step": step, "loss": loss.item(), "grad_norm": float(grad_norm),
                          "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2), **metrics}
                if sink is not None:
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
                accepts = " ".join(f"{metrics[f'accept_{j}']:.2f}" for j in range(cfg.ttt_steps))
                _log(log, f"distill step {step:5d}  loss {record['loss']:.3f}  accept/step {accepts}  "
                          f"{record['seconds']:.0f}s", (step + 1) / cfg.steps)
    finally:
        if sink is not None:
            sink.close()
    return drafter.eval()


def acceptance(target: Transformer, drafter: Eagle3Drafter, prompts: list[list[int]], k: int = 4,
               temperature: float = 1.0, max_new_tokens: int = 96, seed: int = 0, env=None) -> float:
    """Returns the mean tokens emitted per verify step (accepted drafts + 1) of static SD with `k` drafts."""
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    result = Engine(target, drafter).generate(prompts, params, SpecConfig(mode="static", k=k), env=env)
    return result.mean_emitted_per_step


def target_identity(target_dir: str | Path) -> dict:
    """Returns what identifies a checkpoint's content cheaply: config.json's hash and, per weight file, its size
    and the hash of its first and last MiB (no full read of a multi-GB checkpoint)."""
    target_dir = Path(target_dir)
    config = target_dir / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{target_dir}: not a checkpoint directory (no config.json)")
    ident = {"config": hashlib.sha256(config.read_bytes()).hexdigest()[:16]}
    for f in sorted(target_dir.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)
            fh.seek(max(size - (1 << 20), 0))
            tail = fh.read()
        ident[f.name] = f"{size}:{hashlib.sha256(head + tail).hexdigest()[:16]}"
    return ident


def build_drafter(target_dir: str | Path, cfg: DistillConfig | None = None, out: str | Path | None = None,
                  task: str = DEFAULT_TASK, log: Log | None = None) -> Path:
    """Returns the directory of a drafter distilled from the checkpoint at `target_dir` (built or reused); `cfg`
    None is `DistillConfig.for_task(task)`.

    The directory holds the drafter (vLLM/SGLang EAGLE-3 layout), `eval.json` (acceptance on held-out prompts at
    T = 1 for each of `cfg.eval_ks`, timings) and `train_metrics.jsonl`. Without `out` it is the cache entry
    keyed by the target's content, `cfg` and `task`; a complete entry (or a complete `out` built with the same
    key) is reused, a partial one is rebuilt.
    """
    target_dir = Path(target_dir)
    cfg = cfg if cfg is not None else DistillConfig.for_task(task)
    config = asdict(cfg)
    if not config["length_grouping"]:
        config.pop("length_grouping")  # absent from the keys of drafters built before it existed, as they were
    key = {"kind": "drafter", "version": VERSION, "target": target_identity(target_dir), "task": task,
           "config": config}
    dest = Path(out) if out is not None else cache_path("drafter", key)
    if is_complete(dest) and _marker_key(dest) == json.loads(json.dumps(key, default=str)):
        _log(log, f"distill: reusing {dest}")
        return dest
    discard_partial(dest)

    t0 = time.perf_counter()
    target = load_model(target_dir)
    train_prompts = task_prompts(target_dir, task, cfg.num_rollouts, cfg.train_seed)
    eval_prompts = task_prompts(target_dir, task, cfg.eval_prompts, cfg.eval_seed)
    work = atomic_directory(dest)  # scratch beside dest; the finished drafter is renamed into place
    try:
        metrics_path = work / "train_metrics.jsonl"
        drafter = train_drafter(target, train_prompts, cfg, log=log, metrics_path=metrics_path,
                                env=task_env(target_dir, task, cfg.num_rollouts, cfg.train_seed, cfg.seed))
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        emitted = {str(k): acceptance(target, drafter, eval_prompts, k=k, temperature=1.0,
                                      max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed,
                                      env=task_env(target_dir, task, cfg.eval_prompts, cfg.eval_seed, cfg.seed))
                   for k in cfg.eval_ks}
        report = {"mean_emitted_per_step": emitted, "temperature": 1.0, "eval_prompts": len(eval_prompts),
                  "train_seconds": round(train_s, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
                  "total_seconds": round(time.perf_counter() - t0, 1), "target": str(target_dir), "task": task,
                  "config": asdict(cfg)}
        _log(log, f"distill: mean emitted per step (T=1) {emitted}, {report['total_seconds']}s")
        staged = save_drafter(drafter, work / "drafter")
        shutil.move(str(metrics_path), staged / "train_metrics.jsonl")
        (staged / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        commit_directory(staged, dest)
        mark_complete(dest, key)  # last, after the rename: a killed build never looks complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _marker_key(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _log(log: Log | None, message: str, fraction: float | None = None) -> None:
    if log is not None:
        log(message, fraction)
