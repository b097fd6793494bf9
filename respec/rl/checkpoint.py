"""The run directory of a trainer: its metrics, its config and its checkpoint, which resumes the run exactly.

A run directory holds
  config.yaml       the resolved TrainConfig (written by `Trainer.start`, rewritten by a resume with overrides);
  metrics.jsonl     one JSON line per step (and the step-0 evaluation), appended and flushed as each finishes;
  tensorboard/      the same scalars, when tensorboard is installed;
  checkpoint/       actor/ (HF layout, with the policy's tokenizer and generation files copied as they are),
                    reference/ (with a KL term), drafter/ (the learner's published version), one NAME.pt per
                    tensor state and one NAME.json per plain state the trainer's roles hand over (their
                    `state_dict()`s: learner.pt, trainer_state.pt, problems.json, rollout.json), and state.json
                    (format, step, Python RNG and the number of metrics lines the checkpoint has seen).

`RunDir` knows files, not trainers: it is handed models and plain dicts, and hands plain dicts back.

Kill safety: a checkpoint is written whole into a temp directory beside it (.checkpoint.tmp-*) and moved into
place by `commit_directory`'s two renames, so the previous one stays whole until the new one is; a resume
(`recover_checkpoint`) removes half-written temp directories, puts back a checkpoint a kill left set aside
between the two renames (.checkpoint.old-*), and cuts metrics.jsonl back to the lines the checkpoint had seen
(TensorBoard purges its events from the same step), so no step appears twice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from respec.engine.checkpoint import atomic_directory, atomic_write_text, commit_directory, save_model
from respec.engine.drafter import Eagle3Drafter, save_drafter
from respec.engine.model import Transformer
from respec.errors import CheckpointError, ConfigError

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
CHECKPOINT = "checkpoint"
# the policy directory's files besides the weights that a checkpoint's actor/ carries over (tokenizer, generation)
POLICY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
STATE_FORMAT = 2  # bump when the checkpoint layout changes


class RunDir:
    """One run's directory: appends metrics lines, writes and reads checkpoints of plain dicts.

    `metrics_lines` counts the lines of metrics.jsonl that belong to the run's history (a checkpoint records it,
    a resume cuts the file back to it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics_lines = 0
        self.tensorboard = None  # SummaryWriter once opened, False without tensorboard

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def check_new(self) -> None:
        """Raises ConfigError if the directory already holds a run (nothing in it is touched)."""
        if any((self.path / name).exists() for name in (CONFIG, METRICS, CHECKPOINT)):
            raise ConfigError(f"{self.path} already holds a run: continue it with --resume {self.path} "
                              "(Trainer.resume) or choose another --out")

    def check_existing(self) -> None:
        """Raises CheckpointError if the directory holds no run."""
        if not self.config_file.is_file():
            raise CheckpointError(f"{self.path}: not a run directory (no {CONFIG}); start one with --out")

    # -- metrics ----------------------------------------------------------------------------------------------
    def write_metrics(self, row: dict) -> None:
        """Appends one line to metrics.jsonl (flushed: a killed run keeps every finished step's line) and its
        numbers to TensorBoard when it is installed."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.metrics_lines += 1
        writer = self._tensorboard_writer(row["step"])
        if writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, row["step"])
            writer.flush()

    def _tensorboard_writer(self, first_step: int):
        """Returns a TensorBoard writer on run_dir/tensorboard when tensorboard is installed, else None; opened
        at this process's first metrics row, whose step it purges from (and every later one)."""
        if self.tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tensorboard = False
                return None
            # purge_step drops the events a killed run wrote past the checkpoint this one resumed from.
            self.tensorboard = SummaryWriter(str(self.path / "tensorboard"), purge_step=first_step)
        return self.tensorboard or None

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, actor: Transformer, policy_dir: Path, tensors: dict[str, dict],
                        plain: dict[str, dict], reference: Transformer | None = None,
                        drafter: Eagle3Drafter | None = None) -> Path:
        """Writes run_dir/checkpoint atomically (the previous one stays whole until the new one is): the actor
        (HF layout with the policy directory's tokenizer files), the reference and the drafter when given, each
        of `tensors` as NAME.pt and each of `plain` (JSON-able) as NAME.json, and state.json with the step, the
        Python RNG and the metrics line count. Returns its path."""
        path = self.checkpoint
        tmp = atomic_directory(path)
        try:
            save_model(actor, tmp / "actor")
            for name in POLICY_FILES:  # copied as they are: a tokenizer re-saved after loading may differ
                if (policy_dir / name).is_file():
                    shutil.copy2(policy_dir / name, tmp / "actor" / name)
            if reference is not None:
                save_model(reference, tmp / "reference")
            if drafter is not None:
                save_drafter(drafter, tmp / "drafter")
            for name, state in tensors.items():
                torch.save(state, tmp / f"{name}.pt")
            for name, state in plain.items():
                (tmp / f"{name}.json").write_text(json.dumps(state) + "\n")
            state = {"format": STATE_FORMAT, "step": step, "metrics_lines": self.metrics_lines,
                     "python_rng": random.getstate()}
            (tmp / "state.json").write_text(json.dumps(state) + "\n")
            commit_directory(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def recover(self) -> Path | None:
        """Returns the run's checkpoint directory after `recover_checkpoint`, or None if it has none."""
        return recover_checkpoint(self.checkpoint)

    def load_checkpoint(self, checkpoint: Path, map_location: torch.device | str = "cpu") -> dict:
        """Returns {"step": int, NAME: state} for every NAME.pt and NAME.json `save_checkpoint` wrote, restoring the
        Python RNG and the metrics line count."""
        try:
            state = json.loads((checkpoint / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{checkpoint}: unreadable run state ({type(e).__name__}: {e})") from None
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{checkpoint}: checkpoint format {state.get('format')}, this respec reads "
                                  f"{STATE_FORMAT}")
        out = {"step": state["step"]}
        for file in sorted(checkpoint.glob("*.pt")):
            try:
                out[file.stem] = torch.load(file, map_location=map_location, weights_only=True)
            except (OSError, RuntimeError, EOFError) as e:
                raise CheckpointError(f"{checkpoint}: unreadable {file.name} ({type(e).__name__}: {e})") from None
        for file in sorted(checkpoint.glob("*.json")):
            if file.name != "state.json":
                try:
                    out[file.stem] = json.loads(file.read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise CheckpointError(f"{checkpoint}: unreadable {file.name} ({e})") from None
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        self.metrics_lines = state["metrics_lines"]
        return out

    def truncate_metrics(self) -> None:
        """Cuts metrics.jsonl back to the lines of the run's history (`metrics_lines`)."""
        truncate_lines(self.path / METRICS, self.metrics_lines)

    def saved_step(self) -> int | None:
        return saved_step(self.path)


def saved_step(run_dir: Path) -> int | None:
    """Returns the step of run_dir's checkpoint, or None if it has no readable one."""
    try:
        return json.loads((Path(run_dir) / CHECKPOINT / "state.json").read_text())["step"]
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
