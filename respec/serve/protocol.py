"""The server's wire format: request bodies parsed and validated into engine requests, and engine outputs turned
into response bodies, for SGLang's native `/generate` and OpenAI's `/v1/completions`.

Every check happens here, before anything is queued, so a malformed request is one `ApiError` (a 4xx with a
message that names the field) and never reaches the engine thread. Field names are SGLang's io_struct names
(`input_ids`, `sampling_params`, `return_logprob`, `meta_info`) and vLLM's OpenAI extras (`top_k`,
`stop_token_ids`, `return_token_ids`), as RL frameworks send them.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from respec.engine.outputs import RequestOutput
from respec.engine.sampling import SamplingParams
from respec.errors import ConfigError, SamplingError


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, a message for the client, and OpenAI's error `type`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; anything beyond is a 4xx before it is queued."""

    max_body_bytes: int = 8 << 20  # a request body (a batch of 128 prompts of 4k ids is ~3 MiB of JSON)
    max_batch: int = 512  # prompts in one batched /generate or /v1/completions request
    max_n: int = 16  # /v1/completions choices per prompt
    max_new_tokens: int | None = None  # None: the engine's max_model_len (more could never fit a slot)
    max_pending: int = 4096  # requests queued or running at once; more get 503

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_batch", "max_n", "max_pending"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ServeLimits {name} must be an integer >= 1, got {value!r}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ConfigError(f"ServeLimits max_new_tokens must be an integer >= 1 or None, got {self.max_new_tokens!r}")


@dataclass(frozen=True)
class ModelLimits:
    """What the engine accepts: token ids in [0, vocab_size), prompt plus generated tokens within max_model_len."""

    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class GenRequest:
    """One engine request parsed from a body: its prompt ids, sampling parameters, and the client's id for it."""

    prompt: list[int]
    params: SamplingParams
    rid: str
    stop: tuple[str, ...] = ()  # stop strings: the output ends before the first one the text holds


@dataclass(frozen=True)
class Parsed:
    """A parsed body: its engine requests and how the response is to be shaped."""

    requests: list[GenRequest]
    batched: bool  # the body held a list of prompts: the response is a list
    stream: bool
    logprobs: bool  # /generate: return_logprob; /v1/completions: logprobs is not None
    n: int = 1  # /v1/completions: requests[i * n + j] is choice j of prompt i
    return_token_ids: bool = False
    model: str | None = None


Encoder = Callable[[str], list[int]]


# -- body and field checks -----------------------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes, limits: ServeLimits) -> dict:
    """Returns the JSON object of a request body; raises ApiError (413 too large, 400 not a JSON object)."""
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body is {len(raw)} bytes, the limit is {limits.max_body_bytes}")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)  # NaN and Infinity are not JSON
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(value, name: str, lo: int, hi: int | None = None) -> int:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ApiError(400, f"{name} must be an integer {bound}, got {value!r}"[:300])
    return value


def _number(value, name: str) -> float:
    if not _is_number(value):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}"[:300])
    return float(value)


def _bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}"[:300])
    return value


def check_ids(ids, name: str, model: ModelLimits) -> list[int]:
    """Returns a prompt's token ids after checking them: a non-empty list of ints in the vocabulary that leaves
    room for at least one generated token."""
    if not isinstance(ids, list) or not ids:
        raise ApiError(400, f"{name} must be a non-empty list of token ids")
    if not all(_is_int(t) for t in ids):
        raise ApiError(400, f"{name} must hold integers only")
    if min(ids) < 0 or max(ids) >= model.vocab_size:
        raise ApiError(400, f"{name} holds token ids outside the vocabulary [0, {model.vocab_size})")
    if len(ids) >= model.max_model_len:
        raise ApiError(400, f"{name} has {len(ids)} tokens; prompt and generated tokens must fit max_model_len "
                            f"{model.max_model_len}")
    return ids


def _encode(text, name: str, encode: Encoder | None, model: ModelLimits) -> list[int]:
    if not isinstance(text, str) or not text:
        raise ApiError(400, f"{name} must be a non-empty string")
    if encode is None:
        raise ApiError(400, "this server has no tokenizer (the model directory holds none): send token ids")
    return check_ids(encode(text), name, model)


def _stop_ids(value, name: str, model: ModelLimits) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > 64 or not all(_is_int(t) for t in value):
        raise ApiError(400, f"{name} must be a list of at most 64 token ids")
    if any(not 0 <= t < model.vocab_size for t in value):
        raise ApiError(400, f"{name} holds token ids outside the vocabulary [0, {model.vocab_size})")
    return tuple(value)


MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def stop_strings(value, name: str, decode_available: bool) -> tuple[str, ...]:
    """Returns the stop strings of a request field: a string or a list of strings (None, "" or [] for none)."""
    if value is None or value == "" or value == []:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_STOP_STRINGS or \
            not all(isinstance(x, str) and 1 <= len(x) <= MAX_STOP_CHARS for x in items):
        raise ApiError(400, f"{name} must be a string or a list of at most {MAX_STOP_STRINGS} strings of 1 to "
                            f"{MAX_STOP_CHARS} characters")
    if not decode_available:
        raise ApiError(400, f"{name}: stop strings need a tokenizer and this server has none (the model directory "
                            "holds none): send stop_token_ids")
    return tuple(dict.fromkeys(items))


def find_stop(decode: Callable[[list[int]], str], tokens: list[int], checked: int,
              stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Returns (n, s) for the first n > checked such that the text of tokens[:n] holds stop string s (the one
    that completes first; the earliest in the text on a tie), or None. The first `checked` tokens were checked."""
    before = decode(tokens[:checked]) if checked else ""
    for n in range(checked + 1, len(tokens) + 1):
        text = decode(tokens[:n])
        hits = [(pos, s) for s in stops if (pos := text.find(s, max(0, len(before) - len(s) + 1))) >= 0]
        if hits:
            return n, min(hits)[1]
        before = text
    return None


def visible_text(out: RequestOutput, decode: Callable[[list[int]], str] | None, stops: tuple[str, ...]) -> str:
    """Returns the text a client sees of a request's output so far: without the stop string that ended it, and,
    while it runs, without a tail that could still become the start of a stop string (vLLM's hold-back)."""
    if decode is None:
        return ""
    text = decode(out.token_ids)
    if out.stop_reason is not None:
        return text[:text.find(out.stop_reason)]
    if stops and not out.finished:
        return text[:max(len(text) - max(map(len, stops)) + 1, 0)]
    return text


def make_params(*, temperature, top_p, top_k, max_new_tokens, stop_token_ids, seed, ignore_eos, prefix: str,
                limits: ServeLimits, model: ModelLimits) -> SamplingParams:
    """Returns SamplingParams from request fields (None = the default), each checked with a message naming it."""
    cap = limits.max_new_tokens or model.max_model_len
    values = {
        "temperature": 1.0 if temperature is None else _number(temperature, f"{prefix}temperature"),
        "top_p": 1.0 if top_p is None else _number(top_p, f"{prefix}top_p"),
        # SGLang and vLLM write "no top-k" as -1
        "top_k": 0 if top_k is None or top_k == -1 else _int(top_k, f"{prefix}top_k", 0, model.vocab_size),
        "max_new_tokens": 128 if max_new_tokens is None else _int(max_new_tokens, f"{prefix}max_new_tokens", 1, cap),
        "stop_token_ids": _stop_ids(stop_token_ids, f"{prefix}stop_token_ids", model),
        # no seed: a fresh random stream per request, as SGLang and vLLM sample
        "seed": None if seed is None else _int(seed, f"{prefix}seed", -(2 ** 63), 2 ** 63 - 1),
        "ignore_eos": False if ignore_eos is None else _bool(ignore_eos, f"{prefix}ignore_eos"),
    }
    try:
        return SamplingParams(**values)
    except SamplingError as e:
        raise ApiError(400, f"{prefix.rstrip('.')}: {e}" if prefix else str(e)) from None


def _seeded(params: SamplingParams, offset: int) -> SamplingParams:
    """Returns params whose seed is moved by `offset` (so the items of one batch draw different streams)."""
    if params.seed is None or offset == 0:
        return params
    from dataclasses import replace

    return replace(params, seed=params.seed + offset)


def _rid(value, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise ApiError(400, f"{name} must be a string of 1 to 256 characters")
    return value


# -- SGLang's /generate --------------------------------------------------------------------------------------------

_SGLANG_KEYS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop", "stop_token_ids", "sampling_seed",
                "ignore_eos"}


def _sglang_params(sp, name: str, limits: ServeLimits, model: ModelLimits,
                   decode_available: bool) -> tuple[SamplingParams, tuple[str, ...]]:
    """Returns (SamplingParams, stop strings) of one `sampling_params` object."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise ApiError(400, f"{name} must be an object")
    get = {k: sp.get(k) for k in _SGLANG_KEYS}  # other keys (min_p, n, ...) are ignored, as documented
    params = make_params(temperature=get["temperature"], top_p=get["top_p"], top_k=get["top_k"],
                         max_new_tokens=get["max_new_tokens"], stop_token_ids=get["stop_token_ids"],
                         seed=get["sampling_seed"], ignore_eos=get["ignore_eos"], prefix=f"{name}.", limits=limits,
                         model=model)
    return params, stop_strings(get["stop"], f"{name}.stop", decode_available)


def parse_generate(body: dict, limits: ServeLimits, model: ModelLimits, encode: Encoder | None,
                   decode_available: bool = True) -> Parsed:
    """Returns the engine requests of a `/generate` body: `input_ids` (a list of ids, or a list of such lists) or
    `text` (a string or a list), `sampling_params` (an object, or one per prompt), `return_logprob`, `stream`,
    `rid`. One shared `sampling_seed` seeds item i of a batch with seed + i."""
    ids, text = body.get("input_ids"), body.get("text")
    if (ids is None) == (text is None):
        raise ApiError(400, "give exactly one of input_ids and text")
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise ApiError(400, "input_ids must be a non-empty list of token ids, or a list of such lists")
        batched = isinstance(ids[0], list)
        items = ids if batched else [ids]
        if len(items) > limits.max_batch:
            raise ApiError(400, f"a batch holds at most {limits.max_batch} prompts, got {len(items)}")
        prompts = [check_ids(p, f"input_ids[{i}]" if batched else "input_ids", model) for i, p in enumerate(items)]
    else:
        batched = isinstance(text, list)
        items = text if batched else [text]
        if not items or len(items) > limits.max_batch:
            raise ApiError(400, f"text must be a string or a list of 1 to {limits.max_batch} strings")
        prompts = [_encode(t, f"text[{i}]" if batched else "text", encode, model) for i, t in enumerate(items)]
    sp = body.get("sampling_params")
    if isinstance(sp, list):
        if not batched or len(sp) != len(prompts):
            raise ApiError(400, "a list of sampling_params needs a batched request with one per prompt")
        per = [_sglang_params(p, f"sampling_params[{i}]", limits, model, decode_available) for i, p in enumerate(sp)]
        params, stops = [p for p, _ in per], [s for _, s in per]
    else:
        shared, stop = _sglang_params(sp, "sampling_params", limits, model, decode_available)
        params, stops = [_seeded(shared, i) for i in range(len(prompts))], [stop] * len(prompts)
    rid = body.get("rid")
    if isinstance(rid, list):
        if not batched or len(rid) != len(prompts):
            raise ApiError(400, "a list of rid needs a batched request with one per prompt")
        rids = [_rid(r, f"rid[{i}]") for i, r in enumerate(rid)]
    else:
        one = _rid(rid, "rid")
        rids = [None if one is None else one if not batched else f"{one}-{i}" for i in range(len(prompts))]
    if len({r for r in rids if r is not None}) != sum(r is not None for r in rids):
        raise ApiError(400, "rid values of one batch must be distinct")
    logprob = _bool(body.get("return_logprob", False), "return_logprob")
    stream = _bool(body.get("stream", False), "stream")
    reqs = [GenRequest(p, q, r or new_rid(), s) for p, q, r, s in zip(prompts, params, rids, stops, strict=True)]
    return Parsed(reqs, batched, stream, logprob)


def new_rid() -> str:
    return uuid.uuid4().hex


def generate_item(out: RequestOutput, req: GenRequest, steps: int, drafter_version: int | None,
                  logprobs: bool, decode: Callable[[list[int]], str] | None) -> dict:
    """Returns one `/generate` response item (SGLang's shape) for a request's output so far."""
    finish = None
    if out.finished:
        finish = {"type": out.finish_reason}
        if out.stop_reason is not None:
            finish["matched"] = out.stop_reason
        elif out.finish_reason == "stop" and out.token_ids:
            finish["matched"] = out.token_ids[-1]  # a stop token or eos, as SGLang reports it
    meta = {"id": req.rid, "finish_reason": finish,
            "prompt_tokens": len(req.prompt), "completion_tokens": len(out.token_ids), "spec_verify_ct": steps,
            "drafter_version": drafter_version}
    if logprobs:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(out.logprobs, out.token_ids, strict=True)]
    return {"text": visible_text(out, decode, req.stop), "output_ids": list(out.token_ids), "meta_info": meta}


# -- OpenAI's /v1/completions --------------------------------------------------------------------------------------

def parse_completion(body: dict, limits: ServeLimits, model: ModelLimits, encode: Encoder | None,
                     decode_available: bool = True) -> Parsed:
    """Returns the engine requests of a `/v1/completions` body: `prompt` (text, ids, or a list of either),
    `max_tokens`, `temperature`, `top_p`, `top_k`, `n`, `seed`, `stop`, `stop_token_ids`, `ignore_eos`, `logprobs`,
    `return_token_ids`, `stream`. Choice j of prompt i is seeded with seed + i * n + j."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [_encode(prompt, "prompt", encode, model)]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [check_ids(prompt, "prompt", model)]
    elif isinstance(prompt, list) and prompt and len(prompt) <= limits.max_batch:
        prompts = [_encode(p, f"prompt[{i}]", encode, model) if isinstance(p, str)
                   else check_ids(p, f"prompt[{i}]", model) for i, p in enumerate(prompt)]
    else:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a list of 1 to "
                            f"{limits.max_batch} of either")
    model_name = body.get("model")
    if model_name is not None and not isinstance(model_name, str):
        raise ApiError(400, "model must be a string")
    n = _int(body.get("n", 1), "n", 1, limits.max_n)
    if len(prompts) * n > limits.max_batch:
        raise ApiError(400, f"prompts x n is {len(prompts) * n}, the limit is {limits.max_batch}")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        _int(logprobs, "logprobs", 0, 20)
    params = make_params(temperature=body.get("temperature"), top_p=body.get("top_p"), top_k=body.get("top_k"),
                         max_new_tokens=body.get("max_tokens", 16), stop_token_ids=body.get("stop_token_ids"),
                         seed=body.get("seed"), ignore_eos=body.get("ignore_eos"), prefix="", limits=limits,
                         model=model)
    stop = stop_strings(body.get("stop"), "stop", decode_available)
    reqs = [GenRequest(p, _seeded(params, i * n + j), new_rid(), stop) for i, p in enumerate(prompts)
            for j in range(n)]
    return Parsed(reqs, len(prompts) > 1, _bool(body.get("stream", False), "stream"), logprobs is not None, n,
                  _bool(body.get("return_token_ids", False), "return_token_ids"), model_name)


def _token_text(t: int, decode: Callable[[list[int]], str] | None) -> str:
    return decode([t]) if decode else f"token_id:{t}"


def completion_logprobs(tokens: list[int], logprobs: list[float], decode) -> dict:
    """Returns OpenAI's legacy logprobs object; top_logprobs holds the sampled token only (the engine returns
    the logprob of the token it sampled, the quantity RL trainers use)."""
    texts = [_token_text(t, decode) for t in tokens]
    return {"tokens": texts, "token_logprobs": list(logprobs),
            "top_logprobs": [{s: lp} for s, lp in zip(texts, logprobs, strict=True)], "text_offset": []}


def completion_choice(index: int, out: RequestOutput, parsed: Parsed, decode, start: int = 0,
                      text_start: int = 0) -> dict:
    """Returns choice `index` of a completion from a request's output, from token `start` and character
    `text_start` of its visible text on (a stream's delta)."""
    tokens, lps = out.token_ids[start:], out.logprobs[start:]
    choice = {"index": index, "text": visible_text(out, decode, parsed.requests[index].stop)[text_start:],
              "logprobs": completion_logprobs(tokens, lps, decode) if parsed.logprobs else None,
              "finish_reason": out.finish_reason if out.finished else None}
    if out.finished:  # vLLM's: the stop string or stop token id that ended it (None for eos and length)
        stop_ids = parsed.requests[index].params.stop_token_ids
        choice["stop_reason"] = out.stop_reason if out.stop_reason is not None else \
            out.token_ids[-1] if out.finish_reason == "stop" and out.token_ids and out.token_ids[-1] in stop_ids \
            else None
    if parsed.return_token_ids:
        choice["token_ids"] = list(tokens)
    return choice


def completion_body(rid: str, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    body = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body
