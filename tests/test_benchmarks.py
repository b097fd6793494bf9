"""The benchmark scripts that run where CI cannot (a GPU): their CPU path, on tiny shapes, so they do not rot. Each
test checks what the script computes, not only that it writes: the summaries agree with the timings they summarise,
the token counts with the configuration, the phases with the step they split, and the printed ratios with the JSON.
"""

import importlib.util
import json
import re
import statistics
import sys
import threading
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("per_test_cache")
ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def approx(x: float):
    return pytest.approx(x, rel=1e-9, abs=1e-12)


def test_gpu_train_runs_every_rollout_mode_on_a_tiny_shape(tiny_world, tmp_path, monkeypatch, capsys):
    gpu_train = load_script("gpu_train")
    policy, _ = tiny_world
    steps, prompts, group, max_new = 2, 2, 2, 6
    monkeypatch.setattr(sys, "argv", ["gpu_train.py", "--out", str(tmp_path), "--shape", "tiny", "--device", "cpu",
                                      "--tokenizer", str(policy), "--steps", str(steps), "--prompts", str(prompts),
                                      "--group", str(group), "--minibatch", "1", "--max-new-tokens", str(max_new),
                                      "--specs", "off,static"])
    gpu_train.main()
    data = json.loads((tmp_path / "gpu_train.json").read_text())
    assert data["errors"] == {} and list(data["modes"]) == ["off", "static"]
    assert data["command"].startswith("python benchmarks/gpu_train.py --out ") and "--specs off,static" in data["command"]
    # The tiny Qwen2 shape, counted by hand: tied embedding V*H; per layer q and o (H*H), k and v (H*kv, kv = KV
    # heads x head dim) with the q/k/v biases, the MLP (3*H*F) and two norms; the final norm.
    V, H, F, L, kv = 1024, 64, 128, 2, 2 * (64 // 4)
    assert data["params"] == V * H + L * (2 * H * H + 2 * H * kv + H + 2 * kv + 3 * H * F + 2 * H) + H
    assert (tmp_path / "gpu_train.png").stat().st_size > 0
    assert not (tmp_path / "models").exists()  # the random checkpoints are removed
    phases = [key.split("/")[1] for key in gpu_train.PHASES]
    for mode in data["modes"].values():
        rows = mode["rows"]
        assert mode["steps"] == len(rows) == steps and [r["step"] for r in rows] == list(range(1, steps + 1))
        for r in rows:
            # The phases split the step: they are consecutive spans of one clock.
            assert sum(r[f"timing/{p}"] for p in phases) == pytest.approx(r["timing/step_s"], rel=1e-6)
            assert all(r[f"timing/{p}"] >= 0 for p in phases)
            # A random policy runs every row to the budget: P x G x max_new tokens in the rollout's seconds.
            assert r["response_length/mean"] == r["response_length/max"] == max_new
            tokens = r["rollout/tokens_per_s"] * r["timing/rollout_s"]
            assert tokens == pytest.approx(prompts * group * max_new, rel=1e-6)
            # The trainer's recomputed logprobs equal the rollout's (fp32 on CPU), speculative or not.
            assert 0 <= r["rollout/logprob_diff_max"] <= 1e-4
        # The summary is the median over the steps after the first (the warm-up).
        timed = rows[1:]
        assert mode["step_s"] == approx(statistics.median(r["timing/step_s"] for r in timed))
        for p in phases:
            assert mode[p] == approx(statistics.median(r[f"timing/{p}"] for r in timed))
        assert mode["response_length"] == max_new
        assert mode["logprob_diff_max"] == max(r["rollout/logprob_diff_max"] for r in rows)
    off, static = data["modes"]["off"], data["modes"]["static"]
    assert off["emitted_per_step"] == 1.0 and off["k_mean"] == 0.0  # plain decoding: one token per step
    assert static["k_mean"] == 4.0 and 1.0 <= static["emitted_per_step"] <= 5.0  # k drafts + the bonus at most
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split() for line in out.splitlines()  # the summary, not the indented steps
             if line.split() and line.split()[0] in data["modes"] and not line.startswith(" ")}
    assert table["off"][-1] == "1.00x"
    assert table["static"][-1] == f"{off['step_s'] / static['step_s']:.2f}x"  # the ratio of the JSON's timings
    other = static["step_s"] - static["rollout_s"] - static["update_s"]
    assert table["static"][4] == f"{other:.2f}"


def test_update_padding_times_both_modes_on_the_tiny_world(tiny_world, tmp_path, monkeypatch, capsys):
    update_padding = load_script("update_padding")
    policy, _ = tiny_world
    out = tmp_path / "update_padding.json"
    prompts, group, minibatch, max_new, rounds = 4, 2, 2, 8, 2
    monkeypatch.setattr(sys, "argv", ["update_padding.py", "--policy", str(policy), "--prompts", str(prompts),
                                      "--group", str(group), "--minibatch", str(minibatch), "--max-new-tokens",
                                      str(max_new), "--rounds", str(rounds), "--json", str(out)])
    update_padding.main()
    data = json.loads(out.read_text())
    assert set(data["median_s"]) == {"padded", "packed"} and out.with_suffix(".png").stat().st_size > 0
    for mode, seconds in data["seconds"].items():
        assert len(seconds) == rounds and all(s > 0 for s in seconds)
        assert data["median_s"][mode] == approx(statistics.median(seconds))
    assert data["speedup"] == approx(data["median_s"]["padded"] / data["median_s"]["packed"])
    assert f"packed is {data['speedup']:.2f}x faster" in capsys.readouterr().out

    # The minibatches it timed (plain decoding with a fixed seed: the same rollouts again).
    batches, padding = update_padding.rollout_minibatches(policy, prompts, group, minibatch, max_new, seed=0)
    assert padding == data["padding_fraction"] and 0 <= padding < 1
    assert len(batches) == prompts // minibatch
    real = total = 0
    for b in batches:
        ids, lens, completion = b["ids"], b["seq_lens"], b["completion"]
        assert ids.shape == (minibatch * group, int(lens.max())) and b["advantages"].shape == (minibatch * group,)
        past_end = torch.arange(ids.shape[1])[None] >= lens[:, None]  # [n, S]
        assert not ids[past_end].any() and not completion[past_end].any()  # right-padded with 0
        assert ((completion.sum(1) >= 1) & (completion.sum(1) <= max_new)).all()  # each row's completion tokens
        real, total = real + int(lens.sum()), total + ids.numel()
    assert padding == pytest.approx(1 - real / total)
    # Both modes do the same work: the packed forward leaves the padded one's gradients.
    model = update_padding.load_model(policy).train()
    grads = []
    for packed in (False, True):
        update_padding.update_seconds(model, batches, packed=packed)
        grads.append([p.grad.clone() for p in model.parameters()])
    for padded_grad, packed_grad in zip(*grads, strict=True):
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-5, rtol=1e-4)


def test_update_contention_times_the_update_beside_a_load(tiny_world, tmp_path, monkeypatch, capsys):
    update_contention = load_script("update_contention")
    policy, _ = tiny_world
    out = tmp_path / "update_contention.json"
    rounds = 2
    monkeypatch.setattr(sys, "argv", ["update_contention.py", "--policy", str(policy), "--rows", "4",
                                      "--minibatches", "1", "--rounds", str(rounds), "--loads", "thread-small",
                                      "--json", str(out)])
    threads_before = set(threading.enumerate())
    update_contention.main()
    assert not set(threading.enumerate()) - threads_before  # every background load was stopped and joined
    data = json.loads(out.read_text())
    assert list(data["seconds"]) == ["alone", "thread-small"] and out.with_suffix(".png").stat().st_size > 0
    for load, seconds in data["seconds"].items():
        assert len(seconds) == rounds and all(s > 0 for s in seconds)
        assert data["median_s"][load] == approx(statistics.median(seconds))
        assert data["vs_alone"][load] == approx(data["median_s"][load] / data["median_s"]["alone"])
    assert data["vs_alone"]["alone"] == 1.0
    printed = capsys.readouterr().out
    for load, ratio in data["vs_alone"].items():
        assert re.search(rf"^{re.escape(load)} +{data['median_s'][load]:.3f} s per update \({ratio:.2f}x alone",
                         printed, re.M), printed
    # The minibatches it times: shaped like the rollouts it stands in for.
    vocab = 4000
    batches = update_contention.minibatches(vocab, rows=4, count=3, seed=0)
    assert len(batches) == 3
    for ids, lens in batches:
        assert lens.shape == (4,) and ids.shape == (4, int(lens.max()))
        assert ((lens >= 17) & (lens <= 81)).all() and ((ids >= 3) & (ids < vocab)).all()


def test_sd_bound_splits_each_step_and_prices_its_bound(tiny_world, tmp_path, monkeypatch, capsys):
    sd_bound = load_script("sd_bound")
    policy, drafter = tiny_world
    out = tmp_path / "sd_bound.json"
    monkeypatch.setattr(sys, "argv", ["sd_bound.py", "--policy", str(policy), "--drafter", str(drafter),
                                      "--prompts", "2", "--ks", "1,2", "--max-new-tokens", "6", "--repeats", "1",
                                      "--compile", "off", "--json", str(out)])
    sd_bound.main()
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert data["command"].startswith("python benchmarks/sd_bound.py ") and "--ks 1,2" in data["command"]
    rows = {r["mode"]: r for r in data["rows"]}
    assert list(rows) == ["plain", "k=1", "k=2"]
    plain = rows["plain"]
    assert plain["drafter_calls"] == 0 and plain["target_calls"] >= plain["steps"]
    for r in rows.values():
        # the parts split the step, and the ratios follow from the counts and seconds they summarise
        assert r["target_ms"] + r["drafter_ms"] + r["other_ms"] == pytest.approx(r["step_ms"])
        assert r["step_ms"] == approx(1e3 * r["seconds"] / r["steps"])
        assert r["tokens_per_step"] == approx(r["tokens"] / r["steps"])
        assert r["speedup"] == approx(r["tokens"] / r["seconds"] / (plain["tokens"] / plain["seconds"]))
    for k in (1, 2):
        r = rows[f"k={k}"]
        # a step with k drafts runs k drafter calls (k - 1 chained, one catch-up) and one verify; each prompt one
        # drafter prefill
        assert r["drafter_calls"] == k * r["steps"] + 2 and r["target_calls"] >= r["steps"]
        assert r["profiled_bound"] == approx(r["tokens_per_step"] / r["profiled_step_ratio"])
        assert r["free_drafter_bound"] == approx(
            r["tokens_per_step"] * plain["step_ms"] / (r["step_ms"] - r["drafter_ms"]))
    printed = capsys.readouterr().out
    assert f"{rows['k=2']['speedup']:.2f}x" in printed and "one drafter call" in printed
