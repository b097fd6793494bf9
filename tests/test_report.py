"""`respec.bench.report` and `respec report`: the results page and the README's table come from the JSON alone."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from respec.bench.report import BEGIN, END, render_results, render_summary, write_results_page
from respec.cli import app
from respec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MACHINE = {"cpu": "Test CPU", "cpu_count": 2, "torch_threads": 1, "torch": "2.13.0", "device": "cpu",
           "device_name": "Test CPU", "load_average": [1.0, 1.0, 1.0]}


def spec_json() -> dict:
    cells = []
    for batch, speed in ((1, {2: 1.5, 4: 1.8}), (64, {2: 1.1, 4: 0.9})):
        cells.append({"batch": batch, "temperature": 1.0, "mode": "plain", "k": 0, "tokens_per_s": 100.0 * batch,
                      "speedup_vs_plain": 1.0, "mean_emitted_per_step": 1.0})
        for k, x in speed.items():
            cells.append({"batch": batch, "temperature": 1.0, "mode": "static", "k": k, "tokens_per_s": 100 * x,
                          "speedup_vs_plain": x, "mean_emitted_per_step": 1 + 0.7 * k})
        cells.append({"batch": batch, "temperature": 1.0, "mode": "adaptive", "k": 2.5, "tokens_per_s": 1.0,
                      "speedup_vs_plain": 1.25, "mean_emitted_per_step": 2.0})
    return {"command": "respec bench spec --json x", "machine": MACHINE, "cells": cells,
            "config": {"max_new_tokens": 64}, "policy": "/c/policy-abc", "drafter": "/c/drafter-def"}


def rollout_json() -> dict:
    return {"command": "respec bench rollout", "machine": MACHINE, "plain_s": 2.0, "static_s": {"1": 1.9, "2": 1.6},
            "table_s": 1.8, "bandit_s": 1.7, "adaptive_s": 1.25, "oracle_s": 1.2,
            "cpu_s": {"plain": 2.0, "static_1": 1.9, "static_2": 1.6, "table": 1.8, "bandit": 1.7, "adaptive": 1.3},
            "best_static_k": 2, "config": {"prompts": 16, "samples": 8, "temperature": 1.0, "max_new_tokens": 128,
                                           "repeats": 3},
            "ratios": {"adaptive_vs_plain": 1.6, "adaptive_vs_best_static": 1.28, "adaptive_vs_table": 1.44,
                       "adaptive_vs_bandit": 1.36, "adaptive_vs_oracle": 0.96}}


def experiment_json() -> dict:
    def run(wall, rollout, start, end):
        return {"wall_s": wall, "rollout_s": rollout, "update_s": wall - rollout, "start_accuracy": 0.2,
                "final_accuracy": 0.4, "accept_start": start, "accept_end": end, "speedup": 100 / wall,
                "rollout_speedup": 40 / rollout}

    bins = [{"steps": [1, 10], "diff": 0.01, "p": 0.2, "p_holm": 0.4, "agree": True},
            {"steps": [11, 20], "diff": -0.02, "p": 0.01, "p_holm": 0.02, "agree": False}]
    return {"command": "respec experiment", "machine": MACHINE, "steps": 20, "seeds": [0, 1, 2],
            "runs": {"no_sd": run(100, 40, 3.4, 3.3), "adaptive_frozen": run(95, 35, 3.4, 2.6),
                     "respec": run(80, 25, 3.4, 3.8)},
            "agreement": {name: {"critic/score/mean": {"bin_steps": 10, "alpha": 0.05, "bins": bins}}
                          for name in ("adaptive_frozen", "respec")}}


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    for name, data in (("spec.json", spec_json()), ("rollout.json", rollout_json()),
                       ("experiment.json", experiment_json())):
        (root / name).write_text(json.dumps(data))
    return root


def test_page_is_rendered_from_the_json_and_names_its_sources(results):
    page = render_results(results)
    assert page == render_results(results)  # deterministic
    assert "| 1 | 1 | 100 | 1.50x (2.40) | 1.80x (3.80) | **1.80x** @k=4 | 1.25x (k 2.5) |" in page
    assert "batch 1 (k = 4) and 1.10x at batch 64 (k = 2)" in page
    assert "| **adaptive (ours)** | 1.25 | 1.60x | 1.30 |" in page
    assert "Adaptive: 1.60x plain, 1.28x the best static k (k = 2)" in page
    assert "the rollout is 40% of a step, so a rollout 1.5x faster gives at most 1.15x" in page
    # The staleness line is computed from the frozen run: 3.4 -> 2.6 is -24%; respec ends at 3.8 / 2.6.
    assert "from 3.40 to 2.60 tokens per verify step (-24%)" in page and "respec 1.46x" in page
    assert "| respec | +0.010 (p 0.40) | -0.020 (p 0.02) |" in page
    assert "- command: `respec bench rollout`" in page and "Test CPU (2 cores)" in page
    assert "[docs/results/spec.json](results/spec.json)" in page
    # A section without its JSON says which command writes it.
    assert "`python benchmarks/trl_peer.py --json docs/results/trl_peer.json` writes" in page


def test_summary_table_and_readme_block(results, tmp_path):
    summary = render_summary(results)
    assert "1.80x at batch 1, 1.10x at batch 64" in summary
    assert "1.60x / 1.28x / 1.44x / 1.36x" in summary
    assert "| 3.40 -> 2.60; 3.80 |" in summary and "2 of 4 bins agree (smallest p 0.02)" in summary
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\noutro\n")
    write_results_page(results, tmp_path / "results.md", readme)
    text = readme.read_text()
    assert text == f"intro\n{BEGIN}\n{summary}{END}\noutro\n"
    write_results_page(results, tmp_path / "results.md", readme)
    assert readme.read_text() == text  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="no results block"):
        write_results_page(results, tmp_path / "fresh.md", readme)
    assert not (tmp_path / "fresh.md").exists()  # nothing is written when the README cannot take the table
    with pytest.raises(ConfigError, match="no such README"):
        write_results_page(results, tmp_path / "fresh.md", tmp_path / "missing.md")


def test_rollout_shape_tables_render_when_the_json_has_them(results):
    shares = {"97+": 0.3, "33-96": 0.1, "17-32": 0.05, "9-16": 0.15, "1-8": 0.4}
    data = rollout_json()
    data["shape"] = {"length": {"mean": 60.0, "median": 35.0, "p90": 140.0, "p99": 290.0, "max": 330.0},
                     "batch_s": shares, "batch_share": shares, "small_batch_share": 0.55}
    (results / "rollout.json").write_text(json.dumps(data))
    report = experiment_json()
    report["runs"]["no_sd"].update({"length_median": 35.0, "length_p90": 140.0, "length_p99": 290.0,
                                    "length_max": 330.0, "small_batch_share": 0.55,
                                    **{f"batch_share/{k}": v for k, v in shares.items()}})
    (results / "experiment.json").write_text(json.dumps(report))
    page = render_results(results)
    row = "| plain | 35 | 140 | 290 | 330 | 30% | 10% | 5% | 15% | 40% | **55%** |"
    assert row in page
    assert row.replace("plain", "no_sd") in page
    assert "| adaptive_frozen | 35" not in page  # runs without the metrics get no row


def test_corrupt_json_is_a_one_line_error(results):
    (results / "spec.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"spec\.json: not valid JSON"):
        render_results(results)
    with pytest.raises(ConfigError, match="no such directory"):
        render_results(results / "missing")


def test_committed_results_page_and_readme_are_what_the_committed_json_gives(tmp_path):
    """`make results` on a clean tree changes nothing: docs/results.md and the README's block are generated."""
    page = (ROOT / "docs" / "results.md").read_text()
    assert page == render_results(ROOT / "docs" / "results")
    readme = (ROOT / "README.md").read_text()
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block == "\n" + render_summary(ROOT / "docs" / "results")


def test_cli_report_writes_page(results, tmp_path):
    out = tmp_path / "page.md"
    cli = CliRunner().invoke(app, ["report", "--results", str(results), "--out", str(out), "--readme", ""])
    assert cli.exit_code == 0, cli.output
    assert out.read_text() == render_results(results)


def test_links_into_the_results_page_name_its_sections():
    import re

    from respec.bench.report import _anchor

    page = (ROOT / "docs" / "results.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", page, re.M)}
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    links = [(f.name, a) for f in files for a in re.findall(r"results\.md#([\w-]+)", f.read_text())]
    assert links and all(a in anchors for _, a in links), [x for x in links if x[1] not in anchors]


@pytest.mark.parametrize("file, data, heading, line", [
    ("rollout_arithmetic.json", rollout_json, "The same rollout on the single-turn world",
     "| **adaptive (ours)** | 1.25 | 1.60x | 1.30 |"),
    ("experiment_arithmetic.json", experiment_json, "ReSpec end to end on the single-turn world",
     "from 3.40 to 2.60 tokens per verify step (-24%)"),
], ids=["rollout", "experiment"])
def test_a_single_turn_section_renders_only_with_its_json(results, file, data, heading, line):
    assert heading not in render_results(results)
    recorded = {**data(), "command": data()["command"] + " --task arithmetic"}
    (results / file).write_text(json.dumps(recorded))
    page = render_results(results)
    at = page.index(f"## {heading}")
    assert line in page[at:] and f"- data: [docs/results/{file}](results/{file})" in page[at:]
    assert page[at:].split("\n", 2)[2].startswith("On `arithmetic`, the single-turn world")


def test_each_measured_section_names_its_world(results):
    page = render_results(results)  # the fixture's rollout and experiment name no task: the default world's
    for heading in ("A draining GRPO rollout", "ReSpec end to end: `respec experiment`"):
        assert page[page.index(f"## {heading}"):].split("\n", 2)[2].startswith("On `probe`, the default world")
    spec = {**spec_json(), "config": {"max_new_tokens": 64, "task": "arithmetic"}}
    (results / "spec.json").write_text(json.dumps(spec))
    page = render_results(results)
    assert page[page.index("## Speculative decoding"):].split("\n", 2)[2].startswith("On `arithmetic`")
    (results / "rollout.json").write_text(json.dumps({**rollout_json(), "config": {**rollout_json()["config"],
                                                                                   "task": "countdown"}}))
    assert "On `countdown`. " in render_results(results)
    (results / "experiment.json").write_text(json.dumps({**experiment_json(), "note": "Other work ran beside it."}))
    assert "(read its note)" in render_summary(results)
    assert "On `probe`, the default world ([world.md](world.md)): each row calls a tool until a draw reaches the " \
           "bar, so the environment, not the policy, sets how long a row runs. **Note:** Other work ran beside it. " \
           in render_results(results)


def test_the_batch_1_bound_renders_inside_the_spec_section_only_with_its_json(results):
    assert "What bounds it at batch 1" not in render_results(results)
    rows = [{"mode": "plain", "speedup": 1.0, "tokens_per_step": 1.0, "step_ms": 2.5, "target_ms": 2.0,
             "drafter_ms": 0.0, "other_ms": 0.5},
            {"mode": "k=4", "speedup": 1.4, "tokens_per_step": 4.0, "step_ms": 7.0, "target_ms": 4.0,
             "drafter_ms": 2.0, "other_ms": 1.0, "profiled_step_ratio": 2.1, "profiled_bound": 1.9,
             "free_drafter_bound": 2.0, "drafter_call_vs_plain_step": 0.25}]
    (results / "sd_bound.json").write_text(json.dumps({"command": "python benchmarks/sd_bound.py", "machine": MACHINE,
                                                       "rows": rows}))
    page = render_results(results)
    spec_at, bound_at = page.index("## Speculative decoding per batch size"), page.index("### What bounds it at batch 1")
    assert spec_at < bound_at < page.index("## ", bound_at)
    assert "| k=4 | 1.40x | 4.00 | 7.00 | 4.00 | 2.00 | 1.00 | 2.10 | 1.90x | 2.00x |" in page
    assert "the best bound is 1.90x (k = 4)" in page and "- data: [docs/results/sd_bound.json]" in page
