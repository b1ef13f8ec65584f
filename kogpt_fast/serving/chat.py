"""POST /v1/chat/completions: OpenAI's chat API over the checkpoint's chat template, and a clear 400 without one.

KoGPT is a base model and ships no template, so its server answers chat requests with a 400 that says to use
/v1/completions. A checkpoint with a template (`chat_template.jinja`, or `chat_template` in tokenizer_config.json,
as transformers saves them) gets its messages rendered by it (jinja2's sandbox, as transformers renders it) into a
prompt, which runs as a completion; the answer comes back in the chat shapes.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from .protocol import (CompletionRequest, StreamOptions, bad_request, check_ranges, completion_id, completion_object,
                       now, usage_object, validation_error)
from .server import check_model, event_stream, finish_unless_disconnected, prepare_completion, sse, stream_events

MAX_TOP_LOGPROBS = 20  # OpenAI's chat API bound


def load_chat_template(directory) -> str | None:
    """The checkpoint's chat template, or None: chat_template.jinja, else tokenizer_config.json's chat_template (a
    string, or a list of named templates of which "default" is used)."""
    directory = Path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        return None  # the tokenizer's loader reports a broken config
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """The template compiled once (a server has one; transformers caches its own the same way)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(template: str, messages: list[ChatMessage], tokenizer) -> str:
    import jinja2

    plain = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise bad_request(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(part.text for part in content)
        plain.append({"role": m.role, "content": content or "", **({"name": m.name} if m.name else {})})
    try:
        return _compiled(template).render(
            messages=plain, add_generation_prompt=True, bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "")
    except jinja2.TemplateError as e:
        raise bad_request(f"the chat template refused the messages: {e}", param="messages") from None


def as_completion(r: ChatCompletionRequest, prompt: str) -> CompletionRequest:
    if r.logprobs is not True and r.top_logprobs is not None:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    if r.top_logprobs is not None and not 0 <= r.top_logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {r.top_logprobs}",
                          param="top_logprobs")
    completion = CompletionRequest.model_construct(
        model=r.model, prompt=prompt, max_tokens=r.max_completion_tokens if r.max_completion_tokens is not None
        else r.max_tokens, temperature=r.temperature, top_p=r.top_p, n=r.n, stop=r.stop, stream=r.stream,
        stream_options=r.stream_options, logprobs=(r.top_logprobs or 0) if r.logprobs else None, echo=False,
        seed=r.seed, presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty, best_of=None,
        logit_bias=None, suffix=None, user=r.user, top_k=r.top_k, repetition_penalty=r.repetition_penalty,
        min_tokens=r.min_tokens,
    )
    check_ranges(completion, max_logprobs=MAX_TOP_LOGPROBS)
    return completion


def chat_logprobs(legacy: dict | None, top: int) -> dict | None:
    """The legacy logprobs (tokens, token_logprobs, top_logprobs) in the chat shape: {"content": [...]}."""
    if legacy is None:
        return None

    def entry(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [
        {**entry(token, lp), "top_logprobs": [entry(t, v) for t, v in
                                              sorted(alts.items(), key=lambda kv: -kv[1])[:top]]}
        for token, lp, alts in zip(legacy["tokens"], legacy["token_logprobs"], legacy["top_logprobs"])
    ]}


async def chat_completion(state, request: Request):
    arrival = time.perf_counter()
    try:
        r = ChatCompletionRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise validation_error(e) from None
    check_model(state, r.model)
    if state.chat_template is None:
        raise bad_request(
            f"{state.model_name!r} has no chat template (a base model such as KoGPT continues text; its checkpoint "
            "ships no chat_template): use /v1/completions with a prompt", param="messages", code="no_chat_template")
    if not r.messages:
        raise bad_request("messages is empty", param="messages")
    prompt = render(state.chat_template, r.messages, state.tokenizer)
    completion = prepare_completion(state, as_completion(r, prompt), arrival)
    top = r.top_logprobs or 0
    cid, created = completion_id("chatcmpl"), now()

    def response(object_type, choices, usage):
        return completion_object(cid, created, state.model_name, choices, usage, object_type)

    def usage():
        return usage_object(completion.prompt_tokens, completion.completion_tokens)

    if not r.stream:
        await finish_unless_disconnected(request, completion)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.logprobs.since(0) if c.logprobs else None, top),
                    "finish_reason": c.finish_reason} for c in completion.choices]
        return JSONResponse(response("chat.completion", choices, usage()))

    started = set()

    def chunk(choice, text, logprobs):
        delta = {"content": text}
        if choice.index not in started:  # a choice's first chunk names the role
            started.add(choice.index)
            delta = {"role": "assistant", "content": text}
        elif not text and not (logprobs and logprobs["tokens"]) and choice.finish_reason is None:
            return None
        return sse(response("chat.completion.chunk", [{"index": choice.index, "delta": delta, "logprobs":
                                                       chat_logprobs(logprobs, top),
                                                       "finish_reason": choice.finish_reason}], None))

    return event_stream(stream_events(completion, chunk,
                                      lambda: sse(response("chat.completion.chunk", [], usage()))))
