"""The online learner in a child process (`learner.mode=process`): the same `Learner`, with its own interpreter.

Why. Isolation. A rollout is a chain of small torch ops, each taking the GIL back after its kernel; a learner
thread in the trainer's process runs Python between its own ops and could keep the rollout waiting for the GIL.
In a process the learner competes only for cores, caches and memory, and a learner that dies (out of memory, a
crash in native code) cannot take the trainer with it. The thread stays the default where a process is no
faster: `benchmarks/learner_overhead.py` measures both on the machine at hand (docs/results.md).

How. `LearnerProcess` has the interface the trainer, the checkpoint and `respec experiment` use (`submit`,
`metrics`, `pause`/`resume`/`paused`, `hold`/`release`, `grant`, `wait_idle`, `state_dict`/`load_state_dict`, `close`, `version`,
`trained_through`, `alive`, `draft_ids`, `log`, `publish_fn`). It starts a spawned child that runs a
`Learner(mode="async")` on an fp32 copy of the drafter, with `threads` torch threads. Requests go over a pipe, one
at a time, each answered; tensors travel as `torch.save` bytes (one step's rollouts are ~15 MB for the embedded
policy: a few milliseconds). The child's publications and log lines come back on a queue, which a listener thread
in the trainer's process turns into a drafter in the engine's dtype and hands to `publish` (`Engine.set_drafter`,
between decode steps), as the thread learner does.

Failure. A crash inside a learner step is the `Learner`'s (logged, restarted from the last published weights).
If the child process itself dies (killed, out of memory), the trainer goes on with the last published drafter:
the death is logged once, `alive` turns false, and every later call is a no-op.

A script that builds a trainer with this mode must guard its entry point (`if __name__ == "__main__":`), as for
any spawned process.
"""

from __future__ import annotations

import contextlib
import copy
import io
import multiprocessing as mp
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from respec.engine.drafter import DrafterConfig, Eagle3Drafter, inv_freq_fp32
from respec.rl.config import LearnerConfig
from respec.rl.learner import Learner, StepRollouts

Publish = Callable[[Eagle3Drafter, int], None]
START_TIMEOUT_S = 300.0  # the child imports torch and builds its drafter before its first answer


def _pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


class LearnerProcess:
    """The trainer's handle on a learner running in a child process (see the module docstring)."""

    def __init__(self, config: LearnerConfig, drafter: Eagle3Drafter, publish: Publish, seed: int = 0,
                 log: Callable[[str], None] | None = None, threads: int = 1):
        self.config, self.publish_fn, self.log = config, publish, log
        cfg = drafter.config
        self.draft_ids = None if cfg.draft_vocab_size == cfg.vocab_size else drafter.draft_ids_in_target()
        self.version = 0
        self.trained_through = 0
        self.steps = 0
        self.alive = True
        self._template = copy.deepcopy(drafter).eval()  # the engine's dtype and device: published weights land here
        self._closing = False
        self._lock = threading.Lock()  # one request in flight
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._events = ctx.Queue()
        state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                 for k, v in drafter.state_dict().items()}
        embed = drafter.embed_tokens.weight.detach().cpu().float()
        self._proc = ctx.Process(
            target=_child_main, name="respec-learner", daemon=True,
            args=(replace(config, mode="async"), cfg, _pack({"state": state, "embed": embed}),
                  str(drafter.fc.weight.device), seed, threads, child_conn, self._events))
        self._proc.start()
        child_conn.close()
        self._call("ready", timeout=START_TIMEOUT_S)
        self._listener = threading.Thread(target=self._listen, name="respec-learner-events", daemon=True)
        self._listener.start()

    # -- requests ---------------------------------------------------------------------------------------------
    def _call(self, command: str, payload: Any = None, timeout: float | None = None) -> Any:
        """Sends one request and returns the child's answer; None once the child is gone."""
        with self._lock:
            if not self.alive:
                return None
            try:
                self._conn.send((command, payload))
                if timeout is not None and not self._conn.poll(timeout):
                    raise TimeoutError(f"no answer to {command!r} in {timeout:.0f} s")
                ok, answer = self._conn.recv()
            except (EOFError, OSError, TimeoutError) as e:
                self._gone(f"{type(e).__name__}: {e}")
                return None
        if not ok:
            raise RuntimeError(f"learner process: {command} failed: {answer}")
        return answer

    def _gone(self, why: str) -> None:
        """Marks the child dead (once) and says so; training goes on with the last published drafter."""
        was_alive, self.alive = self.alive, False
        if was_alive and not self._closing:
            self._emit(f"learner process stopped ({why}; exit code {self._proc.exitcode}); training goes on with "
                       f"drafter version {self.version}")

    def _emit(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    # -- the trainer's side (the interface of Learner) ---------------------------------------------------------
    def submit(self, rollouts: StepRollouts) -> None:
        self._call("submit", _pack(vars(rollouts)))

    def grant(self, steps: int) -> None:
        self._call("grant", steps)

    def metrics(self) -> dict:
        answer = self._call("metrics")
        if answer is None:  # the child is gone: report it so, with the counters last seen
            return {"learner/steps": self.steps, "learner/version": self.version, "learner/alive": 0}
        self.steps = answer["learner/steps"]
        return answer

    def pause(self) -> None:
        self._call("pause")

    def resume(self) -> None:
        self._call("resume")

    def hold(self) -> None:
        self._call("hold")

    def release(self) -> None:
        self._call("release")

    def wait_idle(self, timeout: float | None = None) -> bool:
        """`Learner.wait_idle` in the child (a child that is gone is idle)."""
        return self._call("wait_idle", timeout) is not False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Holds the learner (after its step in flight) for the duration of the block."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def state_dict(self) -> dict:
        answer = self._call("state_dict")
        if answer is None:
            raise RuntimeError("learner process is gone: its state cannot be saved")
        return _unpack(answer)

    def load_state_dict(self, state: dict) -> None:
        self._call("load_state_dict", _pack(state))
        c = state["counters"]
        self.version, self.trained_through, self.steps = c["version"], c["trained_through"], c["steps"]

    def close(self, timeout: float = 30.0) -> None:
        self._closing = True
        self._call("close", timeout=timeout)
        self.alive = False
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._events.put(None)  # ends the listener
        self._listener.join(timeout)

    # -- publications and log lines from the child ------------------------------------------------------------
    def _listen(self) -> None:
        while True:
            try:
                event = self._events.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive() and not self._closing:
                    with self._lock:
                        self._gone("the process died")
                    return
                continue
            except (EOFError, OSError):
                return
            if event is None:
                return
            kind, *rest = event
            if kind == "log":
                self._emit(rest[0])
            elif kind == "publish":
                version, trained_through, data = rest
                try:
                    drafter = copy.deepcopy(self._template)
                    drafter.load_state_dict(_unpack(data))  # cast to the engine's dtype
                    drafter.inv_freq = inv_freq_fp32(drafter)
                    self.publish_fn(drafter, version)
                except Exception as e:  # noqa: BLE001 - the engine keeps its drafter; training goes on
                    self._emit(f"learner process: publishing drafter version {version} failed ({e}); the engine "
                               f"keeps version {self.version}")
                    continue
                self.version, self.trained_through = version, trained_through


def _child_main(config: LearnerConfig, drafter_config: DrafterConfig, init: bytes, device: str, seed: int,
                threads: int, conn, events) -> None:
    """The child: builds the drafter and a `Learner`, then answers requests until "close" or a closed pipe."""
    torch.set_num_threads(threads)
    data = _unpack(init)
    embed = nn.Embedding(*data["embed"].shape, device=device)
    embed.weight.data.copy_(data["embed"])
    drafter = Eagle3Drafter(drafter_config, embed).to(device)
    drafter.load_state_dict(data["state"])
    drafter.inv_freq = inv_freq_fp32(drafter)

    def publish(out: Eagle3Drafter, version: int) -> None:
        state = {k: v.detach().cpu() for k, v in out.state_dict().items()}
        events.put(("publish", version, learner.trained_through, _pack(state)))

    learner = Learner(config, drafter, publish, seed=seed, log=lambda message: events.put(("log", message)))
    handlers = {
        "ready": lambda _: True,
        "submit": lambda p: learner.submit(StepRollouts(**_unpack(p))),
        "grant": learner.grant,
        "metrics": lambda _: learner.metrics(),
        "pause": lambda _: learner.pause(),
        "resume": lambda _: learner.resume(),
        "hold": lambda _: learner.hold(),
        "release": lambda _: learner.release(),
        "wait_idle": learner.wait_idle,
        "state_dict": lambda _: _pack(learner.state_dict()),
        "load_state_dict": lambda p: learner.load_state_dict(_unpack(p)),
    }
    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            break
        if command == "close":
            learner.close()
            conn.send((True, None))
            break
        try:
            conn.send((True, handlers[command](payload)))
        except Exception as e:  # noqa: BLE001 - reported to the trainer, which raises it there
            conn.send((False, f"{type(e).__name__}: {e}"))
    learner.close()
    events.put(None)
