"""The run directory of a trainer: its checkpoint, which resumes the run exactly where it was, and its metrics.

A run directory holds
  config.yaml       the resolved TrainConfig (written by `Trainer.start`, rewritten by a resume with overrides);
  metrics.jsonl     one JSON line per step (and the step-0 evaluation), appended and flushed as each finishes;
  tensorboard/      the same scalars, when tensorboard is installed;
  checkpoint/       actor/ (HF layout, with the policy's tokenizer and generation files copied as they are),
                    reference/ (with a KL term), drafter/ (the learner's published version), learner.pt,
                    tuner.json, trainer_state.pt (optimiser, rollout RNG, torch RNG) and state.json (format,
                    step, data position, Python RNG and the number of metrics lines the checkpoint has seen).

Kill safety: a checkpoint is written whole into a temp directory beside it (.checkpoint.tmp-*) and moved into
place by `commit_directory`'s two renames, so the previous one stays whole until the new one is; a resume
(`recover_checkpoint`) removes half-written temp directories, puts back a checkpoint a kill left set aside
between the two renames (.checkpoint.old-*), and cuts metrics.jsonl back to the lines the checkpoint had seen
(TensorBoard purges its events from the same step), so no step appears twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from respec.engine.checkpoint import atomic_directory, atomic_write_text, commit_directory, save_model
from respec.engine.drafter import save_drafter
from respec.errors import CheckpointError

if TYPE_CHECKING:
    from respec.rl.trainer import Trainer

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
CHECKPOINT = "checkpoint"
# the policy directory's files besides the weights that a checkpoint's actor/ carries over (tokenizer, generation)
POLICY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
STATE_FORMAT = 1  # bump when the checkpoint layout changes


def save_checkpoint(trainer: Trainer) -> Path:
    """Writes run_dir/checkpoint atomically (the previous one stays whole until the new one is): the actor
    (HF layout with its tokenizer), optimiser, reference, drafter, tuner state, data position, RNG states and
    the metrics line count. Returns its path."""
    path = trainer.run_dir / CHECKPOINT
    tmp = atomic_directory(path)
    try:
        save_model(trainer.actor, tmp / "actor")
        for name in POLICY_FILES:  # copied as they are: a tokenizer re-saved after loading may differ
            if (trainer.policy_dir / name).is_file():
                shutil.copy2(trainer.policy_dir / name, tmp / "actor" / name)
        if trainer.reference is not None:
            save_model(trainer.reference, tmp / "reference")
        with trainer.learner.paused() if trainer.learner is not None else contextlib.nullcontext():
            if trainer.engine.drafter is not None:
                save_drafter(trainer.engine.drafter, tmp / "drafter")  # the learner's published version
            if trainer.learner is not None:
                torch.save(trainer.learner.state_dict(), tmp / "learner.pt")
        tuner = trainer.engine.tuner
        if tuner is not None and hasattr(tuner, "state_dict"):
            (tmp / "tuner.json").write_text(json.dumps(tuner.state_dict()) + "\n")
        torch.save({"optimizer": trainer.optimizer.state_dict(), "rng": trainer.rng.get_state(),
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
        state = {"format": STATE_FORMAT, "step": trainer.global_step, "epoch": trainer.epoch,
                 "cursor": trainer.cursor, "metrics_lines": trainer.metrics_lines, "python_rng": random.getstate()}
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
        commit_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_state(trainer: Trainer, checkpoint: Path) -> None:
    """Restores into `trainer` (built on the checkpoint's models) the optimiser, RNG states, data position,
    metrics line count, learner and tuner state that `save_checkpoint` wrote."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        saved = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{checkpoint}: unreadable trainer state ({type(e).__name__}: {e})") from None
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{checkpoint}: checkpoint format {state.get('format')}, this respec reads "
                              f"{STATE_FORMAT}")
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.rng.set_state(saved["rng"])
    torch.set_rng_state(saved["torch_rng"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    trainer.global_step, trainer.epoch, trainer.cursor = state["step"], state["epoch"], state["cursor"]
    trainer.metrics_lines = state["metrics_lines"]
    if trainer.learner is not None and (checkpoint / "learner.pt").is_file():
        try:
            learner = torch.load(checkpoint / "learner.pt", map_location=trainer.device, weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"{checkpoint}: unreadable learner state ({type(e).__name__}: {e})") from None
        trainer.learner.load_state_dict(learner)
        trainer.engine.drafter_version = trainer.learner.version  # checkpoint/drafter is the learner's published one
    tuner_file = checkpoint / "tuner.json"
    if tuner_file.is_file() and trainer.spec.mode == "adaptive":
        trainer.engine.default_tuner(trainer.spec.k_max).load_state_dict(json.loads(tuner_file.read_text()))


def saved_step(run_dir: Path) -> int | None:
    """Returns the step of run_dir's checkpoint, or None if it has no readable one."""
    try:
        return json.loads((run_dir / CHECKPOINT / "state.json").read_text())["step"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None


def recover_checkpoint(path: Path) -> Path | None:
    """Returns the run's checkpoint directory, or None if it has none. A kill between the two renames of
    `commit_directory` leaves only the previous checkpoint, set aside as .checkpoint.old-PID: it is put back.
    Half-written checkpoints (.checkpoint.tmp-*) of killed runs are removed."""
    for partial in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(partial, ignore_errors=True)
    if path.is_dir():
        return path
    old = sorted(path.parent.glob(f".{path.name}.old-*"))
    if old:
        os.replace(old[-1], path)
        return path
    return None


def truncate_lines(path: Path, n: int) -> None:
    """Keeps the first n lines of a text file (atomically); lines a killed run wrote after its checkpoint go."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) == n and (not lines or lines[-1].endswith("\n")):
        return
    atomic_write_text(path, "".join(lines[:n]))


# -- metrics ------------------------------------------------------------------------------------------------
def write_metrics(trainer: Trainer, row: dict) -> None:
    """Appends one line to metrics.jsonl (flushed: a killed run keeps every finished step's line) and its
    numbers to TensorBoard when it is installed."""
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    with open(trainer.run_dir / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
    trainer.metrics_lines += 1
    writer = _tensorboard_writer(trainer, row["step"])
    if writer is not None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, row["step"])
        writer.flush()


def _tensorboard_writer(trainer: Trainer, first_step: int):
    """Returns a TensorBoard writer on run_dir/tensorboard when tensorboard is installed, else None; opened
    at this process's first metrics row, whose step it purges from (and every later one)."""
    if trainer.tensorboard is None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            trainer.tensorboard = False
            return None
        # purge_step drops the events a killed run wrote past the checkpoint this one resumed from.
        trainer.tensorboard = SummaryWriter(str(trainer.run_dir / "tensorboard"), purge_step=first_step)
    return trainer.tensorboard or None
