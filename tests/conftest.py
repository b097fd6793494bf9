"""Shared test fixtures."""

import pytest
import torch

from respec.engine.model import ModelConfig, init_model

# The modules that take longest (compiling, Ray, the CLI's demo run), longest first. `make test` runs the suite on
# pytest-xdist workers a module at a time (--dist loadfile), taking modules in collection order: starting the
# longest first keeps one of them from being the last thing a worker runs while the others idle.
LONGEST_FIRST = ("test_compile.py", "test_cluster.py", "test_cli.py", "test_bench_rollout.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _sharp_target(vocab: int, seed: int = 0, max_positions: int = 256, layers: int = 4):
    """Returns a tiny random Qwen2-shaped target (4 layers, hidden 32) whose weight matrices are scaled by 15,
    so its next-token distributions are far from uniform (peaky enough for acceptance and chi-square tests)."""
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    model = init_model(cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(15)
    return model.eval()


# A tiny embedded world: a 2-layer width-32 policy (40 SFT steps: it writes near-random text) and its drafter.
TINY_POLICY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, steps=40,
                   warmup=2, batch_size=16, num_train_problems=400, eval_problems=4, eval_max_new_tokens=8,
                   max_seq_len=128)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(policy dir, drafter dir) of the tiny world, built once per test session (~3 s)."""
    from respec.world.distill import DistillConfig, build_drafter
    from respec.world.pretrain import PretrainConfig, pretrain

    draft = DistillConfig(num_rollouts=8, max_new_tokens=8, steps=3, batch_size=4, warmup_steps=1, ttt_steps=2,
                          eval_prompts=2, eval_max_new_tokens=4, eval_ks=(1,))
    root = tmp_path_factory.mktemp("tiny-world")
    policy = pretrain(PretrainConfig(**TINY_POLICY), out=root / "policy", log=None)
    return policy, build_drafter(policy, draft, out=root / "drafter", log=None)


@pytest.fixture(scope="session")
def sharp_target():
    """The factory `sharp_target(vocab, seed=0, max_positions=256, layers=4)` of tiny peaky random targets."""
    return _sharp_target


@pytest.fixture(scope="module")
def target(sharp_target):
    """A tiny peaky target over 8 tokens (the engine tests' exact joints of 3 tokens have 512 cells); modules
    with a target of their own define this fixture themselves."""
    return sharp_target(8, max_positions=128)


@pytest.fixture(scope="module")
def drafter(target):
    """A random drafter for `target`: a deliberately poor one."""
    from respec.engine.drafter import init_drafter

    return init_drafter(target, seed=1)


@pytest.fixture(scope="module")
def drafter2(target):
    from respec.engine.drafter import init_drafter

    return init_drafter(target, seed=2)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Points $RESPEC_CACHE at a session directory: tests never read or write the user's artifact cache."""
    import os

    before = os.environ.get("RESPEC_CACHE")
    os.environ["RESPEC_CACHE"] = str(tmp_path_factory.mktemp("respec-cache"))
    yield
    if before is None:
        os.environ.pop("RESPEC_CACHE", None)
    else:
        os.environ["RESPEC_CACHE"] = before


@pytest.fixture
def per_test_cache(tmp_path, monkeypatch):
    """Points $RESPEC_CACHE at this test's directory (the tuner's cost profiles too): modules that train use it
    with `pytestmark = pytest.mark.usefixtures("per_test_cache")`."""
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Runs the suite on one torch thread: the tiny test models gain nothing from more, and on a shared 2-core
    machine threads waiting on each other made engine tests 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
