"""`generate()` with HF transformers' semantics, over the paged KV cache.

Code written for `AutoModelForCausalLM.from_pretrained(...).generate(...)` runs unchanged: the same arguments,
the same defaults (max_length 20, top_k 50 when sampling), the same order of logits processing (repetition
penalty, then temperature, top-k, top-p), the same handling of left padding (positions from the attention mask),
eos (finished rows are padded with pad_token_id) and streamers (put(prompt), put(new tokens) per step, end()).
What apps read back is HF's too: return_dict_in_generate=True with output_scores / output_logits returns a
GenerateDecoderOnlyOutput; stop_strings (with tokenizer=) and stopping_criteria stop rows as HF's criteria do
(kogpt_fast.stopping); logits_processor callables run after HF's own processors and before its warpers, as in HF.
HF's arguments that change nothing here are accepted, those asking for more are refused (kogpt_fast.hf_compat).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field

import torch

STOP_CHECK_EVERY = 8  # decode steps between host reads of the stop flag (extra steps are cut from the output)


@dataclass
class GenerationConfig:
    """The decoding parameters, with HF's defaults. Unset (None) token ids fall back to the model config's."""

    max_length: int = 20  # prompt + new tokens
    max_new_tokens: int | None = None  # wins over max_length
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    num_beams: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None  # needs generate(tokenizer=...)
    return_dict_in_generate: bool = False  # a GenerateDecoderOnlyOutput instead of the sequences
    output_scores: bool = False  # with return_dict_in_generate: the processed scores of each step
    output_logits: bool = False  # with return_dict_in_generate: the raw logits of each step
    extra: dict = field(default_factory=dict, repr=False)

    def update(self, **kwargs) -> "GenerationConfig":
        """A copy with the given fields replaced; unknown names raise TypeError (a typo must not pass silently).

        None means "not given", as in HF 5 (whose defaults fill every field left None).
        """
        from .hf_compat import GENERATE_INERT, GENERATE_REFUSED, pop_hf_arguments

        kwargs = dict(kwargs)
        pop_hf_arguments("generate()", kwargs, GENERATE_INERT, GENERATE_REFUSED)
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"generate() got unsupported arguments: {', '.join(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in kwargs.items() if k in names and v is not None})

    @classmethod
    def from_any(cls, config) -> "GenerationConfig":
        """Ours, or a duck-typed HF `transformers.GenerationConfig` (its set fields are read by name)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return dataclasses.replace(config)
        from .hf_compat import GENERATE_INERT, GENERATE_REFUSED, pop_hf_arguments

        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {name: getattr(config, name) for name in names if getattr(config, name, None) is not None}
        others = {k: v for k, v in getattr(config, "to_dict", dict)().items() if k not in names and v is not None}
        pop_hf_arguments("generation_config", others, GENERATE_INERT, GENERATE_REFUSED)  # HF's own, unknown: ignored
        return cls(**values)


def _validate(cfg: GenerationConfig, vocab_size: int) -> None:
    def positive_int(name, value, allow_zero=False):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
            raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")

    positive_int("max_length", cfg.max_length)
    if cfg.max_new_tokens is not None:
        positive_int("max_new_tokens", cfg.max_new_tokens, allow_zero=True)
    positive_int("min_length", cfg.min_length, allow_zero=True)
    if cfg.min_new_tokens is not None:
        positive_int("min_new_tokens", cfg.min_new_tokens, allow_zero=True)
    positive_int("num_return_sequences", cfg.num_return_sequences)
    if cfg.num_beams != 1:
        raise NotImplementedError(f"beam search is not supported (num_beams={cfg.num_beams}); use num_beams=1")
    if cfg.do_sample:
        if not isinstance(cfg.temperature, (int, float)) or not 0 < cfg.temperature < float("inf"):
            raise ValueError(f"temperature must be a positive finite number when sampling, got {cfg.temperature!r}")
        if cfg.top_k is not None:
            positive_int("top_k", cfg.top_k, allow_zero=True)
        if not isinstance(cfg.top_p, (int, float)) or not 0 < cfg.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {cfg.top_p!r}")
    elif cfg.num_return_sequences != 1:
        raise ValueError(
            f"num_return_sequences={cfg.num_return_sequences} needs do_sample=True: greedy decoding gives one "
            "sequence per prompt"
        )
    if not isinstance(cfg.repetition_penalty, (int, float)) or not cfg.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be a positive number, got {cfg.repetition_penalty!r}")
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(cfg, name)
        if value is not None and not (isinstance(value, int) and 0 <= value < vocab_size):
            raise ValueError(f"{name}={value!r} is not a token id in [0, {vocab_size})")
    for name in ("return_dict_in_generate", "output_scores", "output_logits"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}")
    for eos in _as_list(cfg.eos_token_id):
        if not (isinstance(eos, int) and 0 <= eos < vocab_size):
            raise ValueError(f"eos_token_id={eos!r} is not a token id in [0, {vocab_size})")


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return ids.flatten().tolist()
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def process_logits(cfg: GenerationConfig, sequences: torch.Tensor, logits: torch.Tensor, new_tokens: int,
                   logits_processor=()) -> torch.Tensor:
    """HF's logits processors and warpers, in HF's order. sequences [B, T] (padding included), logits [B, V] fp32.
    `logits_processor`: the caller's HF-style callables (input_ids, scores) -> scores, after HF's processors and
    before the sampling warpers (temperature, top-k, top-p), where HF puts them."""
    eos = _as_list(cfg.eos_token_id)
    if cfg.repetition_penalty != 1.0:
        score = torch.gather(logits, 1, sequences)
        score = torch.where(score < 0, score * cfg.repetition_penalty, score / cfg.repetition_penalty)
        logits = logits.scatter(1, sequences, score)
    too_short = sequences.shape[1] < cfg.min_length or (
        cfg.min_new_tokens is not None and new_tokens < cfg.min_new_tokens
    )
    if eos and too_short:
        logits = logits.clone()
        logits[:, eos] = -float("inf")
    for processor in logits_processor or ():
        logits = processor(sequences, logits)
    if not cfg.do_sample:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        top_k = min(cfg.top_k, logits.shape[-1])
        logits = logits.masked_fill(logits < torch.topk(logits, top_k)[0][..., -1, None], -float("inf"))
    if cfg.top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - cfg.top_p)
        remove[..., -1:] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    return logits


def choose_tokens(cfg: GenerationConfig, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] processed logits -> [B] next tokens: argmax, or a draw from softmax when sampling."""
    if not cfg.do_sample:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def too_long(prompt_tokens: int, new_tokens: int, width: int, n_positions: int) -> str:
    """Why a request does not fit, in a user's terms. Every token but the last new one is fed to the model (as in
    HF), so a prompt of p tokens leaves room for n_positions + 1 - p new ones."""
    room = n_positions + 1 - prompt_tokens
    if room < 1:
        return f"the prompt has {prompt_tokens} tokens, more than this model's context of n_positions={n_positions}"
    fits = "1 new token fits" if room == 1 else f"{room} new tokens fit"
    prompt = "1 token" if prompt_tokens == 1 else f"{prompt_tokens} tokens"
    return (f"a prompt of {prompt} and {new_tokens} new tokens do not fit in this model's context "
            f"(n_positions={n_positions}): at most {fits} after this prompt (max_new_tokens={room}, "
            f"or max_length={width + room})")


@dataclass
class GenerateDecoderOnlyOutput:
    """generate(return_dict_in_generate=True)'s result, as HF's class of this name: `sequences` [B, T + new];
    `scores` (processed) and `logits` (raw), each a tuple of fp32 [B, vocab] per new token when asked for, else
    None. Read by attribute, by key (a field that is None is absent, as in HF's ModelOutput) or by index."""

    sequences: torch.LongTensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: None = None
    hidden_states: None = None
    past_key_values: None = None

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())


class StepOutputs:
    """What generate() keeps of each step for return_dict_in_generate (copies: a CUDA-graph decode step reuses its
    output buffer)."""

    def __init__(self, cfg: GenerationConfig):
        wanted = cfg.return_dict_in_generate
        self.scores = [] if wanted and cfg.output_scores else None
        self.logits = [] if wanted and cfg.output_logits else None

    def add(self, logits: torch.Tensor, scores: torch.Tensor) -> None:
        if self.logits is not None:
            self.logits.append(logits.clone())
        if self.scores is not None:
            self.scores.append(scores.clone())

    def scores_so_far(self) -> tuple | None:
        """What HF hands stopping criteria as `scores`: the processed scores so far if they are kept, else None."""
        return None if self.scores is None else tuple(self.scores)

    def result(self, sequences: torch.Tensor, steps: int) -> GenerateDecoderOnlyOutput:
        def kept(values):
            return None if values is None else tuple(values[:steps])

        return GenerateDecoderOnlyOutput(sequences=sequences, scores=kept(self.scores), logits=kept(self.logits))


def default_attention_mask(input_ids: torch.Tensor, pad_token_id: int | None, eos: list[int]) -> torch.Tensor:
    """HF's inference: padding is masked only when pad_token_id occurs in the input and is not an eos id."""
    ones = torch.ones_like(input_ids)
    if pad_token_id is None or pad_token_id in eos or not bool((input_ids == pad_token_id).any()):
        return ones
    return (input_ids != pad_token_id).long()


def ends_streamer_on_error(generate):
    """A generate() that raises still ends its streamer, so that a consumer waiting on it (a TextIteratorStreamer
    read in another thread, as HF's docs show) is freed instead of waiting forever."""
    signature = inspect.signature(generate)

    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        try:
            return generate(*args, **kwargs)
        except BaseException:
            streamer = signature.bind(*args, **kwargs).arguments.get("streamer")
            if streamer is not None:
                streamer.end()
            raise

    return wrapper


class GenerationMixin:
    """Adds `generate()` to a model that has `config`, `device`, `cache_for()` and `forward_step()`."""

    def _generation_defaults(self, source=None) -> GenerationConfig:
        """`source` (ours or HF's; default the checkpoint's generation_config.json); token ids it leaves unset come
        from the checkpoint's generation_config.json, then from config.json."""
        checkpoint = getattr(self, "generation_config", None)
        cfg = GenerationConfig.from_any(source if source is not None else checkpoint)
        for fallback in (checkpoint, self.config):
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(cfg, name) is None and getattr(fallback, name, None) is not None:
                    cfg = dataclasses.replace(cfg, **{name: getattr(fallback, name)})
        return cfg

    def _prefill(self, cache, input_ids, attention_mask, lengths, capacity=None) -> torch.Tensor:
        """Run and cache the prompts (blocks for capacity[b] tokens of row b, if given); fp32 logits [B, vocab] of
        each row's next token.

        Only the real (unmasked) tokens are run and cached, and their positions count them from 0, so a
        left-padded row computes exactly what it would alone (HF: positions from attention_mask.cumsum(-1) - 1).
        """
        keep = attention_mask.bool()
        positions = (attention_mask.cumsum(-1) - 1)[keep]
        cache.start(lengths, capacity)
        return self.forward_step(input_ids[keep], cache.plan(lengths, positions, is_prefill=True), cache)

    @torch.inference_mode()
    def next_token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [B, vocab] for the token after each (left-padded) row of input_ids [B, T]: one prefill."""
        from .validation import check_generate_inputs

        input_ids, attention_mask = check_generate_inputs(input_ids, attention_mask, self.config.vocab_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.shape[1] > self.config.n_positions:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the model's n_positions={self.config.n_positions}")
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        lengths = attention_mask.sum(dim=1).tolist()
        cache = self.cache_for(lengths)
        try:
            return self._prefill(cache, input_ids, attention_mask, lengths)
        finally:
            cache.release()

    @torch.inference_mode()
    @ends_streamer_on_error
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        logits_processor=None,
        stopping_criteria=None,
        prefix_allowed_tokens_fn=None,
        synced_gpus=None,
        assistant_model=None,
        streamer=None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        tokenizer=None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        **kwargs,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        """Generate continuations of input_ids [B, T] (left-padded batches with attention_mask).

        The positional order is HF's. Returns a LongTensor [B * num_return_sequences, T + new] on the model's
        device, as HF does (a GenerateDecoderOnlyOutput with return_dict_in_generate=True). Sampling draws from
        `generator`, or from a new generator seeded with `seed`, or from torch's global RNG.
        """
        from .stopping import Stopping
        from .validation import check_generate_inputs

        if inputs is not None and input_ids is not None:
            raise ValueError("pass the prompt once: either `inputs` or `input_ids`, not both")
        input_ids = inputs if input_ids is None else input_ids
        kwargs.update(prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, synced_gpus=synced_gpus,
                      assistant_model=assistant_model)  # HF's positional slots: checked with the keywords
        cfg = self._generation_defaults(generation_config).update(**kwargs)
        _validate(cfg, self.config.vocab_size)
        eos = _as_list(cfg.eos_token_id)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else None)
        input_ids, attention_mask = check_generate_inputs(input_ids, attention_mask, self.config.vocab_size)
        if attention_mask is None:
            attention_mask = default_attention_mask(input_ids, pad, eos)
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if cfg.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(cfg.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(cfg.num_return_sequences, dim=0)

        prompt_len = input_ids.shape[1]
        max_length = cfg.max_length if cfg.max_new_tokens is None else prompt_len + cfg.max_new_tokens
        lengths = attention_mask.sum(dim=1).tolist()  # real tokens per row
        new_tokens = max(max_length - prompt_len, 0)
        # Every token but the last new one is fed to the model and needs a position (as in HF).
        fed = max(lengths) + max(new_tokens - 1, 0)
        if fed > self.config.n_positions:
            raise ValueError(too_long(max(lengths), new_tokens, prompt_len, self.config.n_positions))
        if seed is not None and generator is None:
            generator = torch.Generator(device=device).manual_seed(seed)
        first_token = [prompt_len - n for n in lengths]  # where each row's real tokens start (left padding)
        stopping = Stopping.build(cfg.stop_strings, tokenizer, stopping_criteria, first_token)
        record = StepOutputs(cfg)

        if streamer is not None:
            streamer.put(input_ids.cpu())
        if new_tokens == 0:
            if streamer is not None:
                streamer.end()
            return record.result(input_ids, 0) if cfg.return_dict_in_generate else input_ids

        batch = input_ids.shape[0]
        sequences = torch.full((batch, max_length), pad if pad is not None else 0, dtype=torch.long, device=device)
        sequences[:, :prompt_len] = input_ids
        length = prompt_len
        cache = self.cache_for([n + new_tokens for n in lengths])
        stops_early = bool(eos) or stopping is not None
        try:
            # Blocks for every token that will be fed back, so decoding never allocates.
            logits = self._prefill(cache, input_ids, attention_mask, lengths, [n + new_tokens - 1 for n in lengths])
            if new_tokens > 1:
                decode = self.decode_step(cache)
            unfinished = torch.ones(batch, dtype=torch.bool, device=device)
            eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
            # The step at which every row had finished (-1: not yet), kept on the device: the host looks only every
            # STOP_CHECK_EVERY steps (or every step with a streamer), so it can queue steps ahead of the GPU.
            all_done_at = torch.full((), -1, dtype=torch.long, device=device)
            for step in range(new_tokens):
                scores = process_logits(cfg, sequences[:, :length], logits, step, logits_processor)
                record.add(logits, scores)
                tokens = choose_tokens(cfg, scores, generator)
                if eos:  # as HF: rows that are done are padded (only when there is an eos criterion)
                    tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
                sequences[:, length] = tokens
                length += 1
                if streamer is not None:
                    streamer.put(tokens.cpu())
                if eos:
                    unfinished &= ~torch.isin(tokens, eos_ids)
                if stopping is not None:
                    unfinished &= ~stopping(sequences[:, :length], record.scores_so_far())
                if stops_early:
                    all_done_at = torch.where((all_done_at < 0) & ~unfinished.any(), step, all_done_at)
                    every_step = streamer is not None or stopping is not None
                    if (every_step or step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1) and int(all_done_at) >= 0:
                        break
                if step == new_tokens - 1:
                    break
                logits = decode(tokens)
        finally:
            cache.release()
        if stops_early and int(all_done_at) >= 0:  # HF stops at the step where the last row finished
            length = prompt_len + int(all_done_at) + 1
        if streamer is not None:
            streamer.end()
        sequences = sequences[:, :length].contiguous()
        return record.result(sequences, length - prompt_len) if cfg.return_dict_in_generate else sequences

