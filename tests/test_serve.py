"""Tests of respec/serve (the HTTP rollout server): SGLang's /generate and OpenAI's /v1/completions over a real
loopback socket, seeded tokens equal the engine's own, concurrent clients join a running batch, malformed
requests are 4xx and leave the server serving, the API key, disconnects free slots, weight updates."""

import asyncio
import contextlib
import json
import random
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from respec.engine.checkpoint import save_model
from respec.engine.drafter import init_drafter, save_drafter
from respec.engine.generate import Engine, SpecConfig
from respec.engine.outputs import RequestOutput
from respec.engine.sampling import SamplingParams
from respec.serve.protocol import ServeLimits
from respec.serve.server import ServeConfig, create_app, outputs

V = 48
MAX_LEN = 96
KEY = "secret-key"


@pytest.fixture(scope="module")
def target(sharp_target):
    return sharp_target(V, seed=3, max_positions=128)


@pytest.fixture(scope="module")
def drafter(target):
    return init_drafter(target, seed=1)


def _engine(target, drafter):
    return Engine(target, drafter, spec=SpecConfig(mode="static", k=3), max_running=8, max_model_len=MAX_LEN)


@contextlib.contextmanager
def serving(engine, encode=None, decode=None, **config):
    """Runs the app on a free loopback port in a background thread; yields (base url, app); stops it after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config.setdefault("limits", ServeLimits(max_pending=64))
    app = create_app(engine, ServeConfig(port=port, model_name="tiny", **config), encode, decode)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(target, drafter):
    engine = _engine(target, drafter)
    with serving(engine) as (url, app):
        yield url, engine, app


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], timeout=30) as c:
        yield c


def engine_tokens(target, drafter, prompt, params):
    """Returns (tokens, logprobs, finish) of one request driven through add_request/step on a fresh engine."""
    engine = _engine(target, drafter)
    engine.add_request("x", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out.token_ids, out.logprobs, out.finish_reason
    raise AssertionError("no output")


def test_generate_seeded_equals_engine(client, target, drafter):
    prompt = [1, 5, 9, 2]
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9,
                                                     "sampling_seed": 7, "min_p": 0.0},
            "return_logprob": True}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    tokens, logprobs, finish = engine_tokens(target, drafter, prompt,
                                             SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7))
    assert out["output_ids"] == tokens
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": finish}
    assert meta["prompt_tokens"] == 4 and meta["completion_tokens"] == len(tokens)
    assert [t for _, t, _ in meta["output_token_logprobs"]] == tokens
    assert all(x is None for _, _, x in meta["output_token_logprobs"])
    assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(logprobs, abs=1e-5)
    assert meta["spec_verify_ct"] >= 1 and meta["drafter_version"] == 0


def test_generate_batched_and_stream(client, target, drafter):
    body = {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 6, "sampling_seed": 3}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    items = r.json()
    assert len(items) == 2 and all(it["meta_info"]["completion_tokens"] >= 1 for it in items)
    # a shared seed s seeds item i with s + i
    alone = client.post("/generate", json={"input_ids": [4, 5],
                                           "sampling_params": {"max_new_tokens": 6, "sampling_seed": 4}}).json()
    assert alone["output_ids"] == items[1]["output_ids"]

    chunks = []
    with client.stream("POST", "/generate", json={**body, "input_ids": [1, 2, 3], "stream": True}) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert events[-1]["meta_info"]["finish_reason"] is not None
    assert events[-1]["output_ids"] == items[0]["output_ids"]
    lengths = [len(e["output_ids"]) for e in events]
    assert lengths == sorted(lengths)  # cumulative
    info = client.get("/get_server_info").json()  # the engine thread's counters
    assert info["decode_rows"] >= info["decode_steps"] >= 1 and info["decode_seconds"] > 0
    assert 0 < info["decode_cpu_seconds"] <= info["decode_seconds"] + 0.05 and info["event_loop_cpu_seconds"] > 0


def test_outputs_merge_what_queued_behind_each_other():
    """A handler that fell behind gets each request's latest output once (each holds all its tokens so far), in
    the order the requests first advanced; the flag marks the output after which all have finished."""
    def out(rid, tokens, finished=False):
        return RequestOutput(rid, tokens, [0.0] * len(tokens), finished, "length" if finished else None)

    async def drain(items, n):
        queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        return [(i, ev.token_ids, last) async for i, ev, last in outputs(queue, n)]

    behind = [(1, out("b", [5])), (0, out("a", [1])), (1, out("b", [5, 6])), (0, out("a", [1, 2], True)),
              (1, out("b", [5, 6, 7], True))]
    assert asyncio.run(drain(behind, 2)) == [(1, [5, 6, 7], False), (0, [1, 2], True)]
    assert asyncio.run(drain(behind[:1] + behind[3:], 2)) == [(1, [5, 6, 7], False), (0, [1, 2], True)]
    with pytest.raises(ValueError):
        asyncio.run(drain([(0, out("a", [1])), (1, ValueError("boom"))], 2))


def test_openai_client(server, target, drafter):
    from openai import OpenAI

    url, _, _ = server
    c = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    prompt = [3, 1, 4, 1, 5]
    res = c.completions.create(model="tiny", prompt=[prompt], max_tokens=8, logprobs=1, seed=11, temperature=1.0,
                               extra_body={"return_token_ids": True})
    choice = res.choices[0]
    tokens, logprobs, _ = engine_tokens(target, drafter, prompt,
                                        SamplingParams(temperature=1.0, max_new_tokens=8, seed=11))
    assert choice.token_ids == tokens
    assert choice.logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-5)
    assert res.usage.completion_tokens == len(tokens) and res.usage.prompt_tokens == len(prompt)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    streamed = c.completions.create(model="tiny", prompt=prompt, max_tokens=8, seed=11, stream=True,
                                    extra_body={"return_token_ids": True})
    ids = [t for chunk in streamed for t in (chunk.choices[0].token_ids or [])]
    assert ids == tokens
    two = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, n=2, seed=1,
                               extra_body={"return_token_ids": True, "ignore_eos": True})
    assert len(two.choices) == 2 and all(len(ch.token_ids) == 4 for ch in two.choices)


def test_concurrent_clients_join_running_batch(server, target, drafter):
    url, engine, app = server
    results, errors = {}, []
    steps_before = app.state.loop.steps

    def client_thread(i):
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                time.sleep(0.01 * i)  # staggered: later ones arrive while earlier ones decode
                body = {"input_ids": [1 + i, 2, 3], "sampling_params": {"max_new_tokens": 24, "ignore_eos": True,
                                                                         "sampling_seed": i}}
                r = c.post("/generate", json=body)
                assert r.status_code == 200, r.text
                results[i] = r.json()["output_ids"]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8
    assert all(len(v) == 24 for v in results.values())
    # 8 requests of 24 tokens each, speculative: far fewer steps than 8 sequential runs would take
    assert app.state.loop.steps - steps_before < 8 * 24
    for i in (0, 5):
        tokens, _, _ = engine_tokens(target, drafter, [1 + i, 2, 3],
                                     SamplingParams(max_new_tokens=24, ignore_eos=True, seed=i))
        assert results[i] == tokens  # a seeded request's tokens do not depend on its batch


def _malformed(rng):
    """Yields (method, path, body bytes or None, headers) of malformed requests."""
    fixed = [
        b"{", b"[1, 2]", b"null", b'"text"', b"{\"input_ids\": [1, NaN]}", b"\xff\xfe", b"",
        json.dumps({}).encode(), json.dumps({"input_ids": []}).encode(), json.dumps({"input_ids": [[]]}).encode(),
        json.dumps({"input_ids": [1, 2], "text": "x"}).encode(),
        json.dumps({"input_ids": [V]}).encode(), json.dumps({"input_ids": [-1]}).encode(),
        json.dumps({"input_ids": [1.5]}).encode(), json.dumps({"input_ids": [True]}).encode(),
        json.dumps({"input_ids": "1,2"}).encode(), json.dumps({"input_ids": [1] * MAX_LEN}).encode(),
        json.dumps({"text": "hello"}).encode(),  # no tokenizer on this server
        json.dumps({"input_ids": [1], "sampling_params": {"max_new_tokens": 10 ** 12}}).encode(),
        json.dumps({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}).encode(),
        json.dumps({"input_ids": [1], "sampling_params": {"temperature": -1}}).encode(),
        json.dumps({"input_ids": [1], "sampling_params": {"top_p": 0}}).encode(),
        json.dumps({"input_ids": [1], "sampling_params": {"top_k": -5}}).encode(),
        json.dumps({"input_ids": [1], "sampling_params": {"stop_token_ids": [V + 1]}}).encode(),
        json.dumps({"input_ids": [1], "sampling_params": "hot"}).encode(),
        json.dumps({"input_ids": [1], "sampling_params": {"sampling_seed": "x"}}).encode(),
        json.dumps({"input_ids": [1], "stream": "yes"}).encode(),
        json.dumps({"input_ids": [1], "return_logprob": 1}).encode(),
        json.dumps({"input_ids": [[1], [2]], "sampling_params": [{}]}).encode(),
        json.dumps({"input_ids": [[1], [2]], "rid": ["a", "a"]}).encode(),
    ]
    for body in fixed:
        yield "POST", "/generate", body
    completions = [
        {}, {"prompt": []}, {"prompt": [V]}, {"prompt": 5}, {"prompt": [1], "n": 0}, {"prompt": [1], "n": 10 ** 6},
        {"prompt": [1], "max_tokens": -1}, {"prompt": [1], "max_tokens": 10 ** 9}, {"prompt": [1], "logprobs": -1},
        {"prompt": [1], "temperature": "hot"}, {"prompt": [1], "stop": ["\n"]}, {"prompt": [[1], []]},
        {"prompt": [1], "model": 3}, {"prompt": [1], "seed": 1.5}, {"prompt": "text without tokenizer"},
    ]
    for body in completions:
        yield "POST", "/v1/completions", json.dumps(body).encode()
    for path in ("/nope", "/v1/chat/completions", "/generate/x"):
        yield "POST", path, b"{}"
    yield "GET", "/generate", None
    yield "POST", "/abort_request", b"{}"
    yield "POST", "/update_weights_from_disk", b"{\"model_path\": 3}"
    fields = ["max_new_tokens", "temperature", "top_p", "top_k", "sampling_seed", "stop_token_ids"]
    bad_values = [-1, -1e300, 1e300, "x", None, [], {}, True, 10 ** 30, 0.5]
    while True:  # random mixes: every one holds at least one invalid value
        sp = {f: rng.choice(bad_values) for f in rng.sample(fields, rng.randint(1, 3))}
        sp["max_new_tokens"] = rng.choice([0, -3, "9", 10 ** 9, 2.5, False])
        ids = rng.choice([[1, 2], [rng.randint(V, 10 ** 6)], [], [[1], []], "abc", [1, None]])
        yield "POST", "/generate", json.dumps({"input_ids": ids, "sampling_params": sp}).encode()


def test_fuzz_malformed_requests_are_4xx(server, client):
    url, engine, _ = server
    rng = random.Random(0)
    seen = 0
    for method, path, body in _malformed(rng):
        r = client.request(method, path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and isinstance(err["type"], str)
        seen += 1
        if seen >= 220:
            break
    r = client.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3,
                                                                                  "ignore_eos": True}})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 3
    assert not engine.has_unfinished_requests()


def test_duplicate_rid_fails_that_request_only(client):
    slow = {"input_ids": [1, 2], "rid": "mine", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}
    results = {}
    assert client.post("/pause_generation").status_code == 200  # the first stays unfinished meanwhile
    first = threading.Thread(target=lambda: results.update(first=client.post("/generate", json=slow)))
    first.start()
    deadline = time.monotonic() + 10
    while client.get("/get_server_info").json()["unfinished_requests"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    dup = client.post("/generate", json={**slow, "sampling_params": {"max_new_tokens": 2}})
    assert client.post("/continue_generation").status_code == 200
    first.join(30)
    assert dup.status_code == 400 and "mine" in dup.json()["error"]["message"]
    out = results["first"].json()
    assert results["first"].status_code == 200 and out["meta_info"]["finish_reason"] == {"type": "length"}
    assert out["meta_info"]["completion_tokens"] == 40


def test_body_limit_and_overload(target, drafter):
    engine = _engine(target, drafter)
    with serving(engine, limits=ServeLimits(max_body_bytes=200, max_pending=2)) as (url, app):
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/generate", json={"input_ids": [1] * 90, "sampling_params": {"max_new_tokens": 1}})
            assert r.status_code == 413 and "error" in r.json()
            c.post("/pause_generation")  # requests queue without finishing
            rs = [c.post("/generate", json={"input_ids": [[1], [2], [3]]})]
            assert rs[0].status_code == 503
            c.post("/continue_generation")
            assert c.post("/generate", json={"input_ids": [[1], [2]],
                                             "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_api_key(target, drafter):
    engine = _engine(target, drafter)
    with serving(engine, api_key=KEY) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            for path in ("/get_model_info", "/v1/models"):
                r = c.get(path)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
                assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            r = c.post("/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 2}},
                       headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200
            assert c.post("/generate", json={"input_ids": [1]}).status_code == 401


def test_stream_disconnect_frees_slot(target, drafter):
    engine = _engine(target, drafter)
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())[1]  # slow steps: the request cannot finish on its own first
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": MAX_LEN - 4, "ignore_eos": True},
            "stream": True}
    with serving(engine) as (url, app):
        with httpx.Client(base_url=url, timeout=30) as c:
            with c.stream("POST", "/generate", json=body) as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        break  # one chunk, then hang up
            deadline = time.monotonic() + 10
            while engine.has_unfinished_requests():
                assert time.monotonic() < deadline, "the abandoned stream kept its slot"
                time.sleep(0.05)
            info = c.get("/get_server_info").json()
            assert info["aborted_requests"] == 1 and info["unfinished_requests"] == 0
            # a waiting (non-streaming) client that gives up is noticed too; one that waits gets its tokens
            with pytest.raises(httpx.ReadTimeout):
                c.post("/generate", json={**body, "stream": False}, timeout=0.3)
            deadline = time.monotonic() + 10
            while c.get("/get_server_info").json()["aborted_requests"] < 2:
                assert time.monotonic() < deadline, "the abandoned request kept its slot"
                time.sleep(0.05)
            r = c.post("/generate", json={**body, "stream": False, "sampling_params": {"max_new_tokens": 60}})
            assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 60


def test_control_routes_and_weight_updates(server, client, target, drafter, tmp_path):
    url, engine, _ = server
    assert client.get("/health_generate").status_code == 200
    info = client.get("/get_server_info").json()
    assert info["speculative"] == {"mode": "static", "k": 3, "k_max": 8} and info["max_model_len"] == MAX_LEN
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == MAX_LEN
    assert client.post("/flush_cache").json()["success"]
    r = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "missing")})
    assert r.status_code == 400 and r.json()["success"] is False
    before = [p.clone() for p in target.parameters()]
    save_model(target, tmp_path / "policy")
    r = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "policy"),
                                                      "weight_version": "v2"})
    assert r.status_code == 200 and r.json()["success"], r.text
    assert client.get("/get_weight_version").json() == {"weight_version": "v2"}
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
    save_drafter(init_drafter(target, seed=4), tmp_path / "drafter")
    r = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "drafter"),
                                                      "is_draft_model": True})
    assert r.status_code == 200, r.text
    out = client.post("/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 4}}).json()
    assert out["meta_info"]["drafter_version"] == 1
    assert client.post("/abort_request", json={"rid": "nobody"}).json()["success"]
    for route in ("/update_weights_from_distributed", "/update_weights_from_tensor", "/init_weights_update_group"):
        r = client.post(route, json={})  # in-memory transfers: a clear 501, not a 404
        assert r.status_code == 501 and "update_weights_from_disk" in r.json()["error"]["message"]
    engine.set_drafter(drafter, version=0)  # back to the drafter the other tests compare against


def test_text_prompts_through_the_tokenizer(target, drafter):
    def encode(text):  # a stand-in tokenizer: one token per character
        return [ord(c) % V for c in text]

    def decode(ids):
        return "".join(chr(97 + t % 26) for t in ids)

    engine = _engine(target, drafter)
    with serving(engine, encode, decode) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/generate", json={"text": ["ab", "cde"], "sampling_params": {"max_new_tokens": 4,
                                                                                  "sampling_seed": 2}})
        assert r.status_code == 200, r.text
        for item, text in zip(r.json(), ["ab", "cde"], strict=True):
            assert item["meta_info"]["prompt_tokens"] == len(text)
            assert item["text"] == decode(item["output_ids"])
        r = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "logprobs": 1})
        choice = r.json()["choices"][0]
        assert r.status_code == 200 and len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["token_logprobs"])
        assert c.post("/generate", json={"text": ""}).status_code == 400


def test_stop_strings_end_a_request_at_the_completing_token(target, drafter):
    def encode(text):  # a stand-in tokenizer: one token per character
        return [ord(c) % V for c in text]

    def decode(ids):
        return "".join(chr(97 + t % 26) for t in ids)

    engine = _engine(target, drafter)  # static k=3: a step emits several tokens, the cut falls inside one
    sp = {"max_new_tokens": 40, "ignore_eos": True, "sampling_seed": 5}
    with serving(engine, encode, decode) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        free = c.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": sp,
                                         "return_logprob": True}).json()
        text = free["text"]
        assert text == decode(free["output_ids"]) and len(text) == 40
        p = next(i for i in range(3, 38) if text.find(text[i:i + 2]) == i)  # a stop string first seen at p
        stop = text[p:p + 2]

        r = c.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {**sp, "stop": [stop, "@@"]},
                                      "return_logprob": True})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["output_ids"] == free["output_ids"][:p + 2]  # through the token that completed the string
        assert out["text"] == text[:p]  # the stop string itself is not returned
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert out["meta_info"]["output_token_logprobs"] == free["meta_info"]["output_token_logprobs"][:p + 2]

        body = {"prompt": [1, 2, 3], "max_tokens": 40, "ignore_eos": True, "seed": 5, "stop": stop}
        choice = c.post("/v1/completions", json=body).json()["choices"][0]
        assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (text[:p], "stop", stop)
        deltas = []
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    deltas.append(json.loads(line[6:])["choices"][0]["text"])
        assert "".join(deltas) == text[:p]  # a partial stop string is held back, never streamed
        assert all(stop not in "".join(deltas[:i + 1]) for i in range(len(deltas)))
        # a stop that is neither a string nor a list of strings: one clear 400
        assert c.post("/generate", json={"input_ids": [1], "sampling_params": {"stop": 3}}).status_code == 400
    assert not engine.has_unfinished_requests()  # the stopped requests' slots were freed
