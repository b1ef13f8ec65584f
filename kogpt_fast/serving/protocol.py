"""OpenAI's shapes: the /v1/completions request (pydantic, strict: unknown fields and wrong types are refused), the
error body, and the response objects (plain dicts: they are built once per streamed token).

Every refusal is an APIError carrying OpenAI's error body, {"error": {"message", "type", "param", "code"}}, and the
HTTP status; the messages name the parameter and the value.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

MAX_N = 128  # OpenAI's bound on n
MAX_LOGPROBS = 5  # the legacy completions API's bound on logprobs
MAX_STOP = 16  # stop strings per request (OpenAI: 4)
MAX_SEED = 2**63 - 1


class APIError(Exception):
    """An HTTP error with OpenAI's body. type: invalid_request_error (4xx), rate_limit_error (429), server_error."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. None means "not given" (OpenAI's clients send null for unset fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # None: 16, OpenAI's default
    temperature: float | None = None  # None: 1.0; 0: greedy
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = False
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None  # only best_of == n: ranking choices is not implemented
    logit_bias: dict[str, float] | None = None  # only empty
    suffix: str | None = None  # only empty: a base model does not insert
    user: str | None = None  # accepted, unused
    # Extensions (vLLM's names): HF's top_k and repetition_penalty, and a floor on the new tokens.
    top_k: int | None = None  # 0: off
    repetition_penalty: float | None = None
    min_tokens: int | None = None


PROMPT_TYPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """The request from its JSON body; a 400 naming the first bad field (malformed JSON, an unknown field, a wrong
    type), and then the range checks."""
    try:
        request = CompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None
    check_ranges(request)
    return request


def validation_error(e: ValidationError) -> APIError:
    error = e.errors(include_url=False)[0]
    loc = [str(part) for part in error["loc"]]
    if error["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {error['msg']}", code="invalid_json")
    if error["type"] == "model_type" and not loc:
        return bad_request(f"the request body must be a JSON object, got {error['input']!r:.80}", code="invalid_json")
    param = loc[0] if loc else None
    if error["type"] == "extra_forbidden":
        return bad_request(f"unknown parameter {'.'.join(loc)!r} (value {error['input']!r:.80})", param=param,
                           code="unknown_parameter")
    if error["type"] == "missing":
        return bad_request(f"missing required parameter {'.'.join(loc)!r}", param=param, code="missing_parameter")
    if param == "prompt":
        return bad_request(f"prompt must be {PROMPT_TYPES}, got {error['input']!r:.80}", param="prompt",
                           code="invalid_type")
    return bad_request(f"{'.'.join(loc)}: {error['msg'].lower()}, got {error['input']!r:.80}", param=param,
                       code="invalid_type")


def check_ranges(r: CompletionRequest, max_logprobs: int = MAX_LOGPROBS) -> None:
    def number(name, ok, what):
        value = getattr(r, name)
        if value is not None and (math.isnan(value) or not ok(value)):
            raise bad_request(f"{name} must be {what}, got {value!r}", param=name)

    def integer(name, low, high):
        value = getattr(r, name)
        if value is not None and not low <= value <= high:
            raise bad_request(f"{name} must be an integer in [{low}, {high}], got {value!r}", param=name)

    number("temperature", lambda t: 0 <= t <= 2, "in [0, 2] (0: greedy)")
    number("top_p", lambda p: 0 < p <= 1, "in (0, 1]")
    number("presence_penalty", lambda p: -2 <= p <= 2, "in [-2, 2]")
    number("frequency_penalty", lambda p: -2 <= p <= 2, "in [-2, 2]")
    number("repetition_penalty", lambda p: 0 < p < math.inf, "a finite number > 0 (1: off)")
    integer("n", 1, MAX_N)
    integer("max_tokens", 0, MAX_SEED)
    integer("min_tokens", 0, MAX_SEED)
    integer("logprobs", 0, max_logprobs)
    integer("top_k", 0, MAX_SEED)
    integer("seed", 0, MAX_SEED)
    if r.min_tokens is not None and r.min_tokens > max_tokens(r):
        raise bad_request(f"min_tokens ({r.min_tokens}) must not exceed max_tokens ({max_tokens(r)})",
                          param="min_tokens")
    if r.best_of is not None and r.best_of != (r.n or 1):
        raise bad_request(f"best_of={r.best_of} is not supported: only best_of equal to n ({r.n or 1})",
                          param="best_of", code="unsupported_value")
    if r.logit_bias:
        raise bad_request("logit_bias is not supported", param="logit_bias", code="unsupported_value")
    if r.suffix:
        raise bad_request("suffix is not supported: the model only continues text", param="suffix",
                          code="unsupported_value")
    stops = stop_strings(r)
    if len(stops) > MAX_STOP or not all(stops):
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings, "
                          f"got {r.stop!r:.80}", param="stop")
    if isinstance(r.prompt, list) and not r.prompt:
        raise bad_request("prompt is an empty list: give a string or token ids", param="prompt")


def max_tokens(r: CompletionRequest) -> int:
    return 16 if r.max_tokens is None else r.max_tokens


def stop_strings(r: CompletionRequest) -> list[str]:
    return [] if r.stop is None else [r.stop] if isinstance(r.stop, str) else list(r.stop)


# ---- responses ----

def completion_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_object(id: str, created: int, model: str, choices: list[dict], usage: dict | None,
                      object_type: str = "text_completion") -> dict:
    return {"id": id, "object": object_type, "created": created, "model": model, "choices": choices,
            "usage": usage, "system_fingerprint": None}


def choice_object(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def models_object(name: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [model_object(name, created, max_model_len)]}


def model_object(name: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "kogpt-fast",
            "max_model_len": max_model_len}


def now() -> int:
    return int(time.time())
