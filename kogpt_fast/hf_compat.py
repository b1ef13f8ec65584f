"""HF transformers' arguments (5.17) that kogpt-fast takes without acting on them, and those it refuses.

Code written for transformers passes arguments that make no difference here (`trust_remote_code=True` for a
model transformers has built in, `token=` when nothing is downloaded, `use_cache=True` when there is always a
cache). Those are *inert*: accepted, and the README says why each changes nothing. Arguments asking for what
kogpt-fast does not do (beam search, offloading, a quantization config, ...) are *refused*: NotImplementedError
naming them, unless given their "not used" value (None, or HF's default that turns the feature off), which is
accepted as HF accepts it. Every other argument is either honoured by the function itself or unknown (a typo:
TypeError). The README's argument table lists the same names; tests/test_hf_arguments.py checks both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Refused:
    why: str
    off: tuple = ()  # values besides None that mean "not used" (HF's defaults): accepted


NEVER_DOWNLOADS = "kogpt-fast reads local files and the HF cache only"

MODEL_INERT = {
    "local_files_only": "always local: nothing is ever downloaded",
    "token": "authenticates downloads, and nothing is downloaded",
    "proxies": "configures downloads, and nothing is downloaded",
    "trust_remote_code": "GPT-J is built in: there is no remote code to run",
    "low_cpu_mem_usage": "loading is always tensor by tensor",
    "attn_implementation": "selects HF's attention code; kogpt-fast's own kernels run (backend=)",
    "disable_mmap": "safetensors are read through their memory map, tensor by tensor",
    "tqdm_class": "kogpt-fast draws its own progress bar (progress=)",
}
MODEL_REFUSED = {
    "force_download": Refused(NEVER_DOWNLOADS, off=(False,)),
    "weights_only": Refused("a .bin is always read with torch.load(weights_only=True)", off=(True,)),
    "config": Refused("the config is read from the checkpoint's config.json (config fields may be overridden by "
                      "keyword)"),
    "state_dict": Refused("use KoGPTForCausalLM.from_state_dict(config, state_dict)"),
    "output_loading_info": Refused("a mismatch raises CheckpointError instead", off=(False,)),
    "ignore_mismatched_sizes": Refused("a mismatch always raises CheckpointError", off=(False,)),
    "quantization_config": Refused("no HF quantization backends (kogpt-fast's own int8 / fp8 weights: quantize=)"),
    "max_memory": Refused("the whole model goes to one device"),
    "offload_folder": Refused("no offloading: the whole model goes to one device"),
    "offload_buffers": Refused("no offloading: the whole model goes to one device", off=(False,)),
    "offload_state_dict": Refused("no offloading: the whole model goes to one device", off=(False,)),
    "tp_plan": Refused("no tensor parallelism: the whole model goes to one device"),
    "tp_size": Refused("no tensor parallelism: the whole model goes to one device"),
    "device_mesh": Refused("no tensor parallelism: the whole model goes to one device"),
    "distributed_config": Refused("no tensor parallelism: the whole model goes to one device"),
    "key_mapping": Refused("the checkpoint must use HF GPT-J's tensor names"),
    "gguf_file": Refused("no GGUF reader: convert the checkpoint to safetensors"),
    "adapter_name": Refused("no PEFT adapters"),
    "adapter_kwargs": Refused("no PEFT adapters"),
    "use_kernels": Refused("HF's kernel hub is not used: kogpt-fast brings its own kernels", off=(False,)),
    "kernel_config": Refused("HF's kernel hub is not used: kogpt-fast brings its own kernels"),
    "allow_all_kernels": Refused("HF's kernel hub is not used: kogpt-fast brings its own kernels", off=(False,)),
    "experts_implementation": Refused("GPT-J has no experts"),
    "fusion_config": Refused("kogpt-fast fuses GPT-J's GEMMs itself (model.fuse_projections)"),
}
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

TOKENIZER_INERT = {
    "local_files_only": MODEL_INERT["local_files_only"],
    "token": MODEL_INERT["token"],
    "proxies": MODEL_INERT["proxies"],
    "trust_remote_code": "the tokenizer is tokenizer.json or tokenizer.model: there is no remote code to run",
    "use_fast": "there is one implementation: tokenizers (tokenizer.json) or sentencepiece (tokenizer.model)",
    "verbose": "kogpt-fast's tokenizer does not log",
    "code_revision": "the revision of remote code, and there is none",
    "config": "picks HF's tokenizer class; the files decide here",
}
TOKENIZER_REFUSED = {
    "force_download": Refused(NEVER_DOWNLOADS, off=(False,)),
    "tokenizer_type": Refused("the tokenizer is read from tokenizer.json or tokenizer.model"),
    "gguf_file": Refused("no GGUF reader"),
    "truncation_side": Refused("truncation keeps the first tokens (HF's default 'right')", off=("right",)),
    "split_special_tokens": Refused("special tokens in the text are always recognised", off=(False,)),
    "model_input_names": Refused("the tokenizer returns input_ids and attention_mask"),
    "chat_template": Refused("no chat templates (apply_chat_template)"),
    "add_prefix_space": Refused("the pre-tokenizer in tokenizer.json decides"),
    "mistral_format": Refused("no mistral-common tokenizers", off=(False,)),
}

GENERATE_INERT = {
    "use_cache": "there is always a KV cache; the tokens are the same either way",
    "synced_gpus": "for DeepSpeed ZeRO-3 across GPUs; one device runs the whole model here",
    "use_model_defaults": "the checkpoint's generation_config.json always supplies the defaults",
    "decoder_start_token_id": "encoder-decoder models only",
    "is_assistant": "HF's assisted decoding only",
    "cache_implementation": "HF's choice of KV cache class; the paged cache gives the same tokens",
    "cache_config": "HF's choice of KV cache class; the paged cache gives the same tokens",
    "max_cache_len": "HF's static cache size; the paged cache sizes itself (model.max_cache_tokens)",
    "compile_config": "HF's torch.compile settings; kogpt-fast's decode step replays as a CUDA graph instead",
    "disable_compile": "HF's torch.compile settings; kogpt-fast's decode step replays as a CUDA graph instead",
    "prefill_chunk_size": "HF's chunked prefill gives the same tokens as one prefill",
    "continuous_batching_config": "HF's generate_batch() only",
    "low_memory": "HF's sequential beam or contrastive search only",
    "length_penalty": "used by beam search only, as in HF",
    "early_stopping": "used by beam search only, as in HF",
}
_BEAMS = "beam search is not supported (num_beams=1 only)"
_SPECULATION = "no assisted or speculative decoding in generate()"
GENERATE_REFUSED = {
    "output_attentions": Refused("attention weights are never materialised (the kernels fuse softmax)", off=(False,)),
    "output_hidden_states": Refused("hidden states are not returned", off=(False,)),
    "num_beam_groups": Refused(_BEAMS, off=(1,)),
    "diversity_penalty": Refused(_BEAMS, off=(0.0,)),
    "constraints": Refused(_BEAMS),
    "force_words_ids": Refused(_BEAMS),
    "penalty_alpha": Refused("no contrastive search"),
    "dola_layers": Refused("no DoLa decoding"),
    "typical_p": Refused("no typical sampling", off=(1.0,)),
    "epsilon_cutoff": Refused("no epsilon sampling", off=(0.0,)),
    "eta_cutoff": Refused("no eta sampling", off=(0.0,)),
    "min_p": Refused("no min-p sampling"),
    "top_h": Refused("no top-H sampling"),
    "no_repeat_ngram_size": Refused("no n-gram blocking", off=(0,)),
    "encoder_no_repeat_ngram_size": Refused("encoder-decoder models only", off=(0,)),
    "encoder_repetition_penalty": Refused("encoder-decoder models only", off=(1.0,)),
    "bad_words_ids": Refused("no banned words: pass a logits_processor"),
    "sequence_bias": Refused("no sequence bias: pass a logits_processor"),
    "suppress_tokens": Refused("no token suppression: pass a logits_processor"),
    "begin_suppress_tokens": Refused("no token suppression: pass a logits_processor"),
    "forced_bos_token_id": Refused("no forced tokens: pass a logits_processor"),
    "forced_eos_token_id": Refused("no forced tokens: pass a logits_processor"),
    "renormalize_logits": Refused("scores are not renormalised", off=(False,)),
    "remove_invalid_values": Refused("NaN/inf logits are not replaced", off=(False,)),
    "exponential_decay_length_penalty": Refused("no length penalty"),
    "token_healing": Refused("no token healing", off=(False,)),
    "guidance_scale": Refused("no classifier-free guidance", off=(1.0,)),
    "watermarking_config": Refused("no watermarking"),
    "max_time": Refused("no time limit: pass a stopping_criteria"),
    "prefix_allowed_tokens_fn": Refused("no constrained decoding: pass a logits_processor"),
    "assistant_model": Refused(_SPECULATION),
    "num_assistant_tokens": Refused(_SPECULATION),
    "num_assistant_tokens_schedule": Refused(_SPECULATION),
    "assistant_confidence_threshold": Refused(_SPECULATION),
    "assistant_early_exit": Refused(_SPECULATION),
    "assistant_lookbehind": Refused(_SPECULATION),
    "target_lookbehind": Refused(_SPECULATION),
    "assistant_ensemble_weight": Refused(_SPECULATION),
    "prompt_lookup_num_tokens": Refused(_SPECULATION),
    "max_matching_ngram_size": Refused(_SPECULATION),
    "speculation_type": Refused(_SPECULATION),
    "use_mtp": Refused(_SPECULATION, off=(False,)),
    "negative_prompt_ids": Refused("no classifier-free guidance"),
    "negative_prompt_attention_mask": Refused("no classifier-free guidance"),
    "custom_generate": Refused("generate() runs kogpt-fast's own decoding loop"),
    "token_type_ids": Refused("HF's GPT-J adds wte(token_type_ids) to every input embedding; kogpt-fast does not "
                              "(its tokenizer returns none)"),
}


def pop_hf_arguments(function: str, kwargs: dict, inert: dict, refused: dict) -> None:
    """Remove from `kwargs` (in place) the HF arguments that need no action; refuse those that ask for more."""
    for name in [n for n in kwargs if n in inert or n in refused]:
        value = kwargs.pop(name)
        if name == "attn_implementation" and value is not None and value not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={value!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if name in refused and value is not None and not _is_off(value, refused[name].off):
            raise NotImplementedError(f"{function}: {name}={_short(value)} is not supported: {refused[name].why}")


def _is_off(value, off: tuple) -> bool:
    return any(type(value) is type(o) and value == o for o in off) or (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and any(isinstance(o, (int, float)) and not isinstance(o, bool) and value == o for o in off)
    )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def device_from_map(device_map) -> torch.device | None:
    """HF's device_map when it puts the whole model on one device: that device; None when not given.

    "auto" (as accelerate on one device): the first GPU, else the CPU. A dict whose values all name one device
    ({"": 0}, {"transformer": "cuda:1", "lm_head": "cuda:1"}) is that device. Anything that would split the
    model, offload it, or balance it across GPUs raises NotImplementedError.
    """
    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        devices = {_device(v, device_map) for v in device_map.values()}
        if len(devices) != 1:
            raise NotImplementedError(
                f"device_map={_short(device_map)} splits the model across {len(devices) or 'no'} devices; "
                "kogpt-fast runs the whole model on one device (device_map='auto', 'cuda', 'cuda:N', 'cpu' or {'': N})"
            )
        return devices.pop()
    return _device(device_map, device_map)


def _device(value, device_map) -> torch.device:
    if isinstance(value, str) and value in ("disk", "meta", "balanced", "balanced_low_0", "sequential"):
        raise NotImplementedError(
            f"device_map={_short(device_map)}: {value!r} is not supported; kogpt-fast runs the whole model on one "
            "device (device_map='auto', 'cuda', 'cuda:N', 'cpu' or {'': N})"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device_map={_short(device_map)}: {value!r} is not a device ({e})") from None
