"""`learner.mode=process`: the learner in a child process publishes to the engine, holds still when paused,
saves and restores through the checkpoint, and a child that dies leaves training running on the last drafter."""

import os
import signal

import pytest
import torch
from test_learner import digit_share, learner_config
from test_trainer import wait_until

from respec.rl.learner_process import LearnerProcess
from respec.rl.trainer import Trainer

pytestmark = pytest.mark.usefixtures("per_test_cache")


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


def process_config(world, **learner):
    return learner_config(world, learner=dict(mode="process", steps_per_rollout=6, publish_every=1, **learner))


def test_a_learner_process_trains_publishes_pauses_and_stops(world, tmp_path):
    trainer = Trainer.start(process_config(world), tmp_path / "run", reward_fn=digit_share)
    learner = trainer.learner
    assert isinstance(learner, LearnerProcess) and learner._proc.is_alive() and learner._proc.pid != os.getpid()
    try:
        trainer.step()
        wait_until(lambda: learner.version >= 1, "a publication to come back")  # and the engine took it
        assert trainer.engine.drafter_version >= 1 and learner.trained_through == 1
        row = trainer.step()
        assert row["learner/steps"] >= 1 and row["learner/alive"] == 1 and "learner/loss" in row
        # A paused or held learner with credits left comes to rest (the child's learner waits with nothing in
        # flight): nothing but the pause or hold keeps it from another step. Given back exactly n credits, it
        # goes on for exactly n steps.
        learner.grant(10 ** 6)  # busy for as long as it is let
        learner.pause()  # returns after the step in flight
        assert learner.wait_idle(60), "a paused learner did not come to rest"
        held = learner.metrics()["learner/steps"]
        learner.grant(2)
        assert learner.metrics()["learner/steps"] == held
        learner.resume()
        assert learner.wait_idle(120) and learner.metrics()["learner/steps"] == held + 2
        learner.grant(10 ** 6)
        learner.hold()  # schedule=update's call: no new step, the one in flight ends on its own
        assert learner.wait_idle(60), "a held learner did not come to rest"
        held = learner.metrics()["learner/steps"]
        learner.grant(2)
        assert learner.metrics()["learner/steps"] == held
        learner.release()
        assert learner.wait_idle(120) and learner.metrics()["learner/steps"] == held + 2
    finally:
        trainer.close()
    assert not learner._proc.is_alive() and not learner.alive
    trainer.learner.submit(trainer.last_features)  # a closed learner takes no more work, and says nothing


def test_checkpoint_and_resume_carry_the_learner_process(world, tmp_path):
    run = tmp_path / "run"
    cfg = learner_config(world, trainer=dict(steps=2, save_every=2),
                         learner=dict(mode="process", steps_per_rollout=6, publish_every=1, buffer_steps=3))
    trainer = Trainer.start(cfg, run, reward_fn=digit_share)
    try:
        trainer.train()  # checkpoints at step 2, the learner held still while it is written
    finally:
        trainer.close()
    saved = torch.load(run / "checkpoint" / "learner.pt", weights_only=True)
    assert saved["counters"]["steps"] >= 1 and [s for s, *_ in saved["buffer"]] == [1, 2]
    resumed = Trainer.resume(run, reward_fn=digit_share)
    try:
        state = resumed.learner.state_dict()  # the child's learner, loaded from the checkpoint
        assert state["counters"] == saved["counters"]
        assert [s for s, *_ in state["buffer"]] == [1, 2]
        for name in ("drafter", "published"):
            assert all(torch.equal(state[name][k], v) for k, v in saved[name].items()), name
        assert resumed.engine.drafter_version == resumed.learner.version == saved["counters"]["version"]
        assert resumed.train(steps=3)[-1]["step"] == 3
    finally:
        resumed.close()


def test_a_dead_learner_process_leaves_training_on_the_last_drafter(world, tmp_path):
    messages = []
    trainer = Trainer.start(process_config(world), tmp_path / "run", reward_fn=digit_share)
    try:
        trainer.learner.log = messages.append
        trainer.step()
        wait_until(lambda: trainer.engine.drafter_version, "a publication to reach the engine")
        os.kill(trainer.learner._proc.pid, signal.SIGKILL)
        wait_until(lambda: not trainer.learner.alive, "the trainer to notice the killed learner process")
        version = trainer.engine.drafter_version
        rows = [trainer.step(), trainer.step()]  # the run goes on
        assert [r["step"] for r in rows] == [2, 3] and rows[-1]["learner/alive"] == 0
        assert trainer.engine.drafter_version == version  # drafting with the last published drafter
        assert sum("learner process stopped" in m for m in messages) == 1, messages
    finally:
        trainer.close()
