"""The model configuration: a HF GPT-J `config.json` as a typed, validated dataclass."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

# Activations the runtime implements. Both are GELU with the tanh approximation; HF computes `gelu_new` as
# 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x**3))) and `gelu_pytorch_tanh` through F.gelu(approximate="tanh").
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


class ConfigError(ValueError):
    """A config.json that is malformed or describes a model this runtime cannot run."""


@dataclass(frozen=True)
class GPTJConfig:
    vocab_size: int = 64512
    n_positions: int = 2048  # the longest sequence (prompt + new tokens)
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: int = 64  # RoPE on the first rotary_dim dims of each head (interleaved pairs)
    n_inner: int = 16384  # resolved: HF's `n_inner: null` means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, if the config says
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # fields the runtime does not use

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not isinstance(self.rotary_dim, int) or isinstance(self.rotary_dim, bool):
            raise ConfigError(
                f"rotary_dim must be an integer (rotary on part of each head), got {self.rotary_dim!r}; "
                "GPT-J without rotary_dim is not supported"
            )
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(
                f"rotary_dim={self.rotary_dim} must be even and in [2, head_dim={self.head_dim}]"
            )
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"activation_function={self.activation_function!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        for name in ("bos_token_id", "pad_token_id"):
            self._check_token_id(name, getattr(self, name))
        eos = self.eos_token_id
        for token in eos if isinstance(eos, list) else [eos]:
            self._check_token_id("eos_token_id", token)

    def _check_token_id(self, name: str, value) -> None:
        if value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
            raise ConfigError(f"{name}={value!r} is not a token id in [0, vocab_size={self.vocab_size})")

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, list) else [eos]

    @classmethod
    def from_dict(cls, data: dict) -> "GPTJConfig":
        """Build from a HF GPT-J config dict (`config.json`), refusing what the runtime cannot run."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "gptj")
        if model_type != "gptj":
            raise ConfigError(f"model_type={model_type!r} is not supported: kogpt-fast runs GPT-J ('gptj') models")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "n_inner", "torch_dtype"}
        kwargs = {k: data[k] for k in known if k in data}
        n_embd = kwargs.get("n_embd", cls.n_embd)
        n_inner = data.get("n_inner")
        kwargs["n_inner"] = 4 * n_embd if n_inner is None else n_inner
        kwargs["torch_dtype"] = data.get("torch_dtype") or data.get("dtype")  # HF 5 writes "dtype"
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GPTJConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as e:  # TypeError: a field of the wrong kind that the dataclass rejects
            raise ConfigError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        """The HF `config.json` form."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "torch_dtype"):
                out[f.name] = getattr(self, f.name)
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        out["model_type"] = "gptj"
        out.setdefault("architectures", ["GPTJForCausalLM"])
        return out
