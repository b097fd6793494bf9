"""`trainer.backend=ray` (respec/cluster): the same run as the local backend, a rollout worker killed mid-rollout,
a dead learner actor, a killed driver resumed, and each bad input as one line before any work starts.

One local Ray instance (2 CPUs, no dashboard) serves the module and is stopped after it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
from test_trainer import digit_share, read_metrics, run_cli, tiny_config, wait_until

import respec.cluster.ray_cluster
from respec.bench.ray import rollout_rows
from respec.cluster.ray_cluster import SYSTEM_CONFIG
from respec.errors import ConfigError
from respec.rl.config import load_config
from respec.rl.trainer import Trainer

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("per_test_cache")
STEPS = 4


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of 2 CPUs for this module's runs."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=SYSTEM_CONFIG)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def ray_config(world, **sections):
    """The tiny run of test_trainer on `backend` (static k = 2, fixed seeds), long enough rollouts to kill one."""
    base = tiny_config(world, trainer=dict(steps=STEPS, eval_every=0, eval_before_train=False, save_every=1),
                       rollout=dict(max_new_tokens=24), data=dict(prompts_per_step=4),
                       algorithm=dict(ppo_mini_batch_size=2))
    return replace(base, **{name: replace(getattr(base, name), **kw) for name, kw in sections.items()})


def on_ray(config, workers=2, **learner):
    return replace(config, trainer=replace(config.trainer, backend="ray"),
                   rollout=replace(config.rollout, workers=workers),
                   learner=replace(config.learner, **learner))


# -- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"rollout.workers": "0"}, "rollout.workers must be an integer >= 1"),
    ({"rollout.workers": "2"}, "set trainer.backend=ray"),
    ({"trainer.backend": "spark"}, "trainer.backend must be one of local, ray"),
    ({"trainer.ray_address": "10.0.0.1:6379"}, "needs trainer.backend=ray"),
])
def test_bad_backend_settings_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_ray_missing_or_unreachable_is_one_line_and_the_run_dir_is_kept(world, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    config = on_ray(ray_config(world))
    real = respec.cluster.ray_cluster.importlib.util.find_spec
    monkeypatch.setattr(respec.cluster.ray_cluster.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs Ray, which is not installed: pip install 'respec\[ray\]'"):
        Trainer.start(config, run)
    monkeypatch.undo()
    unreachable = replace(config, trainer=replace(config.trainer, ray_address="127.0.0.1:9"))
    with pytest.raises(ConfigError, match="127.0.0.1:9: no Ray head answers there"):
        Trainer.start(unreachable, run)
    policy, drafter = world
    code = run_cli(monkeypatch, ["train", "--out", str(run), "--model", str(policy), "--drafter", str(drafter),
                                 "--set", "trainer.backend=ray", "--set", "trainer.ray_address=127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no Ray head answers" in err[0]
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"] and not ray.is_initialized()


def test_interleaved_runs_share_a_local_ray_in_turn(world):
    """The experiment's configurations hold their placement groups together but step one at a time: the local
    Ray it starts has the CPUs they ask together, and stops after them."""
    from respec.cluster.ray_cluster import time_shared

    configs = [on_ray(ray_config(world), workers=2), on_ray(ray_config(world), workers=1, mode="async")]
    with time_shared(configs):
        assert ray.cluster_resources()["CPU"] == max(2 + 1 + 1, os.cpu_count())
    assert not ray.is_initialized()


def test_more_workers_than_cpus_is_one_line(world, tmp_path, cluster):
    with pytest.raises(ConfigError, match=r"rollout.workers=3 x 1 CPU = 3 CPUs, but the Ray cluster has 2"):
        Trainer.start(on_ray(ray_config(world), workers=3), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"2 x 1 CPU \+ 1 for the learner actor = 3 CPUs"):
        Trainer.start(on_ray(ray_config(world), workers=2, mode="async"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- the same run, and a worker killed mid-rollout ---------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


def test_local_and_ray_give_the_same_run_and_a_killed_worker_loses_nothing(world, tmp_path, cluster):
    config = ray_config(world)
    local = Trainer.start(config, tmp_path / "local", reward_fn=digit_share)
    expected, local_rows = [], []
    for _ in range(STEPS):
        local_rows.append(local.step())
        expected.append(rollout_rows(local))
    trainer = Trainer.start(on_ray(config), tmp_path / "ray", reward_fn=digit_share)
    try:
        got, rows = [], []
        for _ in range(2):
            rows.append(trainer.step())
            got.append(rollout_rows(trainer))
        same = sum(a == b for x, y in zip(expected[:2], got, strict=True) for a, b in zip(x, y, strict=True))
        total = sum(len(x) for x in got)
        print(f"identical rollouts, local vs 2 ray workers: {same}/{total}")
        assert same >= 0.9 * total  # fp32, batch shapes differ per shard: rare flips, never systematic ones
        for ours, theirs in zip(rows, local_rows, strict=False):
            for key in ("critic/score/mean", "response_length/mean", "actor/pg_loss", "actor/grad_norm"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-5), key
        assert rows[-1]["rollout/workers_live"] == 2 and rows[-1]["timing/ray_overhead_s"] >= 0
        assert {s["niceness"] for s in trainer.workers.status()} == {os.nice(0)}  # not 15 behind the driver

        # Step 3: one worker's process is killed by a signal while it generates.
        pool = trainer.workers
        done = threading.Event()
        step3 = threading.Thread(target=lambda: (rows.append(trainer.step()), done.set()))
        step3.start()
        victim = None
        while victim is None and not done.is_set():
            for status in pool.status():
                if status is not None and status["generating"] and status["decode_steps"] >= 2:
                    victim = status["pid"]
                    break
        assert victim is not None, "the rollout ended before a worker could be killed"
        os.kill(victim, signal.SIGKILL)
        step3.join(120)
        row = rows[-1]
        assert row["step"] == 3 and row["rollout/redispatched"] == 1
        # the restarted worker may have loaded the weights and rejoined by the time the step's metrics are taken
        assert row["rollout/workers_live"] in (1, 2)
        tokens = rollout_rows(trainer)
        assert len(tokens) == len(expected[2])  # every row once
        assert sum(a == b for a, b in zip(tokens, expected[2], strict=True)) >= 0.9 * len(tokens)

        # The restarted worker joins once it has loaded the current policy (and drafter).
        wait_until(lambda: (pool._admit_rejoined(block=False), len(pool.live) == 2)[1], "the worker to rejoin")
        # `status` runs in the workers' control group, beside their queued tasks: it may answer before the newest
        # `load` has run (a rollout is queued behind it; the next step's rows, equal to the local run's, show it).
        wait_until(lambda: {(s["policy_version"], s["drafter_version"]) for s in pool.status()} == {(pool.policy[0], 0)},
                   "every worker to hold the current policy", timeout=60, poll_s=0.2)
        assert victim not in {s["pid"] for s in pool.status()}
        row = trainer.step()
        assert row["rollout/workers_live"] == 2
        assert sum(a == b for a, b in zip(rollout_rows(trainer), expected[3], strict=True)) >= 0.9 * len(tokens)
    finally:
        trainer.close()
        local.close()


# -- the learner actor -----------------------------------------------------------------------------------------

def test_a_dead_learner_actor_leaves_rollouts_on_the_last_drafter(world, tmp_path, cluster):
    config = on_ray(ray_config(world, trainer=dict(steps=8)), workers=1, mode="async", steps_per_rollout=4,
                    publish_every=1, batch_size=8)
    trainer = Trainer.start(config, tmp_path / "run", reward_fn=digit_share)
    messages = []
    try:
        trainer.begin(lambda message, fraction=None: messages.append(message))
        for _ in range(2):
            trainer.advance(8)
        learner = trainer.learner
        assert learner.wait_idle(60)
        trainer.advance(8)  # checkpoints the learner's state (save_every=1): what a restart resumes from
        wait_until(lambda: learner.version >= 1, "a publication to reach the engine and the worker", 60)
        saved_steps = learner.last_state["counters"]["steps"]
        pid = ray.get(learner.actor.pid.remote())
        os.kill(pid, signal.SIGKILL)
        version = trainer.engine.drafter_version
        row = trainer.advance(8)  # rollouts go on, with the last published drafter, and so do checkpoints
        assert row["learner/alive"] == 0 and not learner.alive
        assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == row["step"]
        assert (tmp_path / "run" / "checkpoint" / "learner.pt").is_file()  # the state it restarts from
        assert trainer.engine.drafter_version == version and row["drafter/version"] == version
        assert any("learner actor died" in m for m in messages), messages
        wait_until(lambda: learner._ready(), "the learner actor to restart", 90)
        assert any("restarted from its last saved state" in m for m in messages), messages
        row = trainer.step()
        assert row["learner/alive"] == 1 and row["learner/steps"] >= saved_steps
    finally:
        trainer.close()


def test_each_workers_tuner_evidence_is_checkpointed_and_resumed(world, tmp_path, cluster):
    config = on_ray(ray_config(world, trainer=dict(steps=1), rollout=dict(max_new_tokens=24, spec="adaptive")))
    trainer = Trainer.start(config, tmp_path / "run", reward_fn=digit_share)
    try:
        trainer.train()  # one step; checkpoints at its end
        states = trainer.workers.tuner_states()
    finally:
        trainer.close()
    saved = json.loads((tmp_path / "run" / "checkpoint" / "rollout.json").read_text())["tuners"]
    assert len(saved) == 2 and all(s is not None and sum(s["tried"]) > 0 for s in saved)
    assert saved == json.loads(json.dumps(states)) and saved[0] != saved[1]  # each worker's own shards
    resumed = Trainer.resume(tmp_path / "run")
    try:
        assert resumed.workers.tuner_states() == states
    finally:
        resumed.close()


# -- a killed driver -------------------------------------------------------------------------------------------

def test_a_killed_driver_resumes_as_the_local_backend_does(world, tmp_path, cluster):
    policy, drafter = world
    run, steps = tmp_path / "run", 6
    env = {**os.environ, "RESPEC_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    sets = {"trainer.save_every": 1, "trainer.eval_every": 0, "data.prompts_per_step": 4, "rollout.group_size": 4,
            "rollout.max_new_tokens": 8, "algorithm.ppo_mini_batch_size": 2, "data.eval_problems": 4,
            "trainer.backend": "ray", "trainer.ray_address": cluster, "rollout.workers": 2}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "respec.cli", "train", "--out", str(run), "--steps", str(steps),
                                 "--model", str(policy), "--drafter", str(drafter), "--spec", "static", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    state = run / "checkpoint" / "state.json"
    wait_until(lambda: state.exists() or proc.poll() is not None, "the driver's first checkpoint", timeout=180)
    assert proc.poll() is None, log.read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 1 <= killed_at < steps
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= 2, "the killed driver's workers to go", 60)
    trainer = Trainer.resume(run)
    try:
        assert trainer.global_step == killed_at and trainer.config.trainer.backend == "ray"
        trainer.train()
    finally:
        trainer.close()
    assert [r["step"] for r in read_metrics(run)] == list(range(steps + 1))  # step 0: the evaluation
    assert json.loads(state.read_text())["step"] == steps


# -- the benchmark ---------------------------------------------------------------------------------------------

def test_bench_ray_measures_both_backends_and_both_learners(world, tmp_path, cluster):
    from respec.bench.ray import bench_config, bench_learner, bench_scale
    from respec.bench.report import _ray

    policy, drafter = world
    config = bench_config(str(policy), str(drafter), prompts=4, group=4, max_new_tokens=8, k=2)
    scale = bench_scale(config, tmp_path, steps=2, workers=2)
    assert [len(v) for v in scale["per_step"].values()] == [2, 2] and scale["rows"] == 16
    assert scale["rollout_speedup"] > 0 and 0 <= scale["ray_overhead_share"] < 1
    assert len(scale["identical_rows"]) == 2 and scale["identical_rows"][0] >= 14  # of 16 rows
    assert all(r["ray_overhead_s"] == 0 for r in scale["per_step"]["local"])
    bound = scale["shard_bound"]  # the full rollout against each of its 2 shards of whole groups alone
    assert len(bound["shard_s"]) == 2 and bound["speedup"] == pytest.approx(bound["full_s"] / max(bound["shard_s"]))
    together = bound["concurrent_shard_s"]  # the same shards at the same time, a plain process each
    assert len(together) == 3 and all(len(r) == 2 and min(r) > 0 for r in together)
    learner = bench_learner(config, tmp_path, repeats=1)
    assert {"thread", "actor"} <= set(learner) and all(len(learner[s]["seconds"]["busy"]) == 1 for s in
                                                       ("thread", "actor"))
    (tmp_path / "ray.json").write_text(json.dumps({"scale": scale, "learner": learner, "command": "respec bench ray",
                                                   "config": {"prompts": 4, "samples": 4}}))
    text = _ray(tmp_path)
    assert "Rollout" in text and "as a Ray actor" in text and "| ray |" in text and "identical token ids" in text
    assert "could be at most" in text and "this machine's cores allow" in text
