"""The trainer's roles on their own: the run directory saves and restores plain dicts without knowing the trainer,
the problem stream continues from its state, and a trainer's state round-trips through them."""

import ast
import json
from pathlib import Path

import torch

import respec.rl.checkpoint
from respec.engine.checkpoint import load_model
from respec.rl.checkpoint import RunDir
from respec.rl.problems import ProblemStream
from respec.world.tasks import get_task


def test_the_run_directory_knows_files_not_trainers():
    tree = ast.parse(Path(respec.rl.checkpoint.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.startswith("respec.rl.") for m in imported), imported


def test_run_dir_saves_and_restores_plain_dicts(tiny_world, tmp_path):
    policy, _ = tiny_world
    run = RunDir(tmp_path / "run")
    for step in range(3):
        run.write_metrics({"step": step, "x": float(step)})
    actor = load_model(policy)
    tensors = {"trainer_state": {"rng": torch.Generator().manual_seed(3).get_state(), "w": torch.arange(4)}}
    plain = {"problems": {"epoch": 1, "cursor": 7}}
    path = run.save_checkpoint(2, actor, policy, tensors, plain)
    assert (path / "actor" / "tokenizer.json").read_bytes() == (policy / "tokenizer.json").read_bytes()
    assert json.loads((path / "problems.json").read_text()) == plain["problems"]
    run.write_metrics({"step": 3})  # after the checkpoint: a resume drops it

    again = RunDir(tmp_path / "run")
    state = again.load_checkpoint(again.recover())
    assert state["step"] == 2 and state["problems"] == plain["problems"]
    assert torch.equal(state["trainer_state"]["w"], torch.arange(4))
    assert torch.equal(state["trainer_state"]["rng"], tensors["trainer_state"]["rng"])
    again.truncate_metrics()
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] \
        == [0, 1, 2]


def test_the_problem_stream_continues_from_its_state():
    task = get_task("arithmetic")
    stream = ProblemStream(task, set(), seed=5, epoch_problems=10)
    stream.next(7)
    state = stream.state_dict()
    expected = [p.prompt for p in stream.next(9)]  # crosses into the second pass
    other = ProblemStream(task, set(), seed=5, epoch_problems=10)
    other.load_state_dict(state)
    assert [p.prompt for p in other.next(9)] == expected and other.state_dict() == {"epoch": 1, "cursor": 6}
