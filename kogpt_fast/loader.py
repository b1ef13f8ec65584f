"""Checkpoint loading: a HF GPT-J model directory -> KoGPTForCausalLM, tensor by tensor.

Accepted layouts (looked for in this order): model.safetensors; sharded safetensors with
model.safetensors.index.json; pytorch_model.bin; sharded pytorch_model.bin.index.json. `.bin` files are read with
`torch.load(weights_only=True)` (memory-mapped when the format allows), so a pickle that is more than tensors is
refused. Each tensor goes to the target device and dtype as soon as it is read: loading a 6B model in fp16 never
holds an fp32 copy of it in RAM.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import re
import sys
import time
import zipfile
from pathlib import Path

import torch
from torch import nn

from . import quant
from .config import ConfigError, GPTJConfig

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Buffers that old GPT-J checkpoints carry (a causal mask and its fill value): not weights.
IGNORED_KEY = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights disagree with its config."""


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported (float32, float16 or bfloat16)")
        return None if dtype in (None, "auto") else dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (float32, float16 or bfloat16)")
    return DTYPES[name]


def model_dir(path, *, revision=None, cache_dir=None, subfolder=None) -> Path:
    """The checkpoint directory for `path`: a local directory, a hub id in the local HF cache, or None (the demo)."""
    from .hub import checkpoint_dir

    directory = checkpoint_dir(path, revision=revision, cache_dir=cache_dir, subfolder=subfolder)
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory: pass the checkpoint directory holding config.json")
    return directory


def check_checkpoint(directory: Path) -> None:
    """What from_pretrained reads first, checked without loading a tensor: config.json, then the weights' files."""
    GPTJConfig.from_json_file(directory / "config.json")
    weight_files(directory)


def weight_names(use_safetensors: bool | None = None, variant: str | None = None) -> tuple[str, ...]:
    """The weight files looked for, in order. use_safetensors (HF's): True only safetensors, False only .bin.
    variant (HF's, e.g. "fp16"): model.fp16.safetensors, model.safetensors.index.fp16.json, pytorch_model.fp16.bin."""
    names = [n for n in WEIGHT_FILES if use_safetensors is None or n.startswith("model.") == use_safetensors]
    if variant:
        names = [".".join(n.split(".")[:-1] + [variant, n.split(".")[-1]]) for n in names]  # HF's _add_variant
    return tuple(names)


def weight_files(directory: Path, names: tuple[str, ...] = WEIGHT_FILES) -> tuple[str, dict[str, Path]]:
    """(layout, {tensor name -> file}) for the first weight layout of `names` present in `directory`."""
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return name, {"*": path}
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is not a valid shard index (needs a 'weight_map' object): {e}") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}: 'weight_map' must map tensor names to file names")
        files = {}
        for tensor, file in weight_map.items():
            shard = directory / str(file)
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard} listed in {path} for {tensor!r} is missing")
            files[tensor] = shard
        return name, files
    raise FileNotFoundError(f"no weights in {directory}: looked for {', '.join(names)}")


class CheckpointReader(contextlib.ExitStack):
    """Reads named tensors from a checkpoint's files, opening each file once. Use as a context manager."""

    def __init__(self, directory: Path, names: tuple[str, ...] = WEIGHT_FILES):
        super().__init__()
        self.layout, self._files = weight_files(directory, names)
        self._open: dict[Path, object] = {}
        self.names: dict[str, Path] = {}
        for file in dict.fromkeys(self._files.values()):
            for name in self._handle(file).keys():
                self.names[name] = file

    def _handle(self, file: Path):
        if file not in self._open:
            self._open[file] = self._open_safetensors(file) if file.suffix == ".safetensors" else self._open_bin(file)
        return self._open[file]

    def _open_safetensors(self, file: Path):
        from safetensors import safe_open

        try:
            return self.enter_context(safe_open(str(file), framework="pt", device="cpu"))
        except Exception as e:  # safetensors raises its own SafetensorError for damaged files
            raise CheckpointError(f"cannot read {file}: damaged or not a safetensors file ({e})") from e

    @staticmethod
    def _open_bin(file: Path) -> dict:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{file} is not a plain weights file: weights_only loading refused it ({str(e).splitlines()[0]})"
            ) from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {file}: damaged or not a PyTorch checkpoint ({e})") from e
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise CheckpointError(f"{file} does not hold a state dict of tensors")
        return state

    def get(self, name: str) -> torch.Tensor:
        file = self.names[name]
        handle = self._handle(file)
        if isinstance(handle, dict):
            return handle[name]
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: damaged file ({e})") from e

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the file's header (safetensors) without loading the tensor."""
        handle = self._handle(self.names[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in dict.fromkeys(self.names.values()))


class Progress:
    """A one-line progress bar on stderr for long loads."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled, self.done = total, label, enabled, 0
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.done == self.total):
            self._last = now
            frac = self.done / max(self.total, 1)
            bar = "#" * int(30 * frac)
            end = "\n" if self.done == self.total else ""
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total}{end}")
            sys.stderr.flush()


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def load_model(cls, path, *, device=None, dtype=None, backend="auto", device_map=None, revision=None, cache_dir=None,
               subfolder=None, use_safetensors=None, variant=None, generation_config=None, progress=None,
               overrides=None, quantize=None):
    """KoGPTForCausalLM.from_pretrained (see there). `overrides`: config fields and HF's inert arguments."""
    from . import backends, hf_compat

    overrides = dict(overrides or {})
    hf_compat.pop_hf_arguments("from_pretrained()", overrides, hf_compat.MODEL_INERT, hf_compat.MODEL_REFUSED)
    directory = model_dir(path, revision=revision, cache_dir=cache_dir, subfolder=subfolder)
    config = with_overrides(GPTJConfig.from_json_file(directory / "config.json"), overrides)
    device = target_device(device, device_map)
    dtype = parse_dtype(dtype) or default_dtype(config, device)
    stored, scheme = quantization_scheme(config, directory, quantize)
    quant.check_runnable(scheme, backends.resolve(backend, device), device)  # before the load, as an explicit backend

    with torch.device("meta"):
        model = cls(config, backend=backend)
        if stored:  # the checkpoint holds the quantized data and scales: the model has their parameters
            quant.make_quantized(model, stored)
    expected = dict(model.named_parameters())
    tied = config.tie_word_embeddings
    with CheckpointReader(directory, weight_names(use_safetensors, variant)) as reader:
        present = {n for n in reader.names if not IGNORED_KEY.match(n)}
        problems = mismatches(expected, {n: reader.shape(n) for n in present}, tied, "the checkpoint")
        if problems:
            raise CheckpointError(f"checkpoint {directory} does not match its config.json:\n  " + "\n  ".join(problems))
        names = [n for n in expected if n in present and not (tied and n == "lm_head.weight")]
        quantizer = None
        if scheme and not stored:  # quantized here, each weight as it is read (GPT-J's pairs sharing scales)
            quant.make_quantized(model, scheme)
            quantizer = quant.Quantizer(scheme, dtype)
        to_quantize = set(quant.quantized_names(config.n_layer, tied)) if scheme else set()
        bar = Progress(len(names), "loading weights", progress if progress is not None else reader.nbytes() > 2**30)
        for name in names:
            tensor = reader.get(name)
            if stored and name in to_quantize:  # quantized data, as stored
                _set_tensor(model, name, _quantized_data(name, tensor, stored).to(device=device, copy=True))
            elif not tensor.is_floating_point():
                raise CheckpointError(f"{name} has dtype {tensor.dtype}; weights must be floating point")
            elif quantizer is not None and name in to_quantize:
                for done, qweight in quantizer.add(name, tensor.to(device=device)):
                    model.get_submodule(done.removesuffix(".weight")).weight = qweight
            else:
                _set_tensor(model, name, tensor.to(device=device, dtype=dtype, copy=True))
            bar.update()
        if quantizer is not None:
            quantizer.finish()
    if stored:
        check_shared_scales(model, directory)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    model.generation_config = generation_defaults(config, generation_config, directory)
    model.name_or_path = str(directory)
    return model.eval()


def quantization_scheme(config: GPTJConfig, directory: Path, quantize) -> tuple[str | None, str | None]:
    """(the checkpoint's scheme, from config.json's quantization_config, or None; the scheme the model will hold:
    the checkpoint's, or `quantize` for a dense checkpoint). A quantized checkpoint asked for another scheme is
    refused by name."""
    quantize = quant.check_scheme(quantize)
    stored = quant.checkpoint_scheme(config.extra, str(directory / "config.json"))
    if stored is not None and quantize not in (None, stored):
        raise ValueError(f"{directory} holds {stored} weights (its config.json's quantization_config): it loads as "
                         f"{stored!r}, not as quantize={quantize!r}. Re-quantizing quantized weights would add both "
                         "errors: quantize the original checkpoint instead")
    return stored, stored or quantize


def _quantized_data(name: str, tensor: torch.Tensor, scheme: str) -> torch.Tensor:
    """A quantized checkpoint's data tensor as the QuantizedLinear stores it (fp8 as its bytes)."""
    if tensor.dtype != quant.STORAGE_DTYPES[scheme]:
        raise CheckpointError(f"{name} has dtype {tensor.dtype}; a {scheme} checkpoint stores "
                              f"{quant.STORAGE_DTYPES[scheme]} weights")
    return tensor.view(torch.uint8) if scheme == "fp8" else tensor


def check_shared_scales(model, directory) -> None:
    """GPT-J's fused out_proj + fc_out GEMM applies one scale a row: a checkpoint must give both the same."""
    for i, block in enumerate(model.transformer.h):
        if not torch.equal(block.attn.out_proj.weight.scale, block.mlp.fc_out.weight.scale):
            raise CheckpointError(f"checkpoint {directory}: transformer.h.{i}.attn.out_proj.weight_scale and "
                                  f"transformer.h.{i}.mlp.fc_out.weight_scale differ; they must be one scale per "
                                  "row over both (kogpt-fast convert --quantize writes them so)")


def target_device(device, device_map) -> torch.device:
    """`device`, or the one device HF's `device_map` names; default cuda when available. Checked to exist here."""
    from . import backends, hf_compat

    mapped = hf_compat.device_from_map(device_map)
    if device is not None and mapped is not None and torch.device(device) != mapped:
        raise ValueError(f"device={str(device)!r} and device_map={device_map!r} name different devices: pass one")
    device = device if device is not None else mapped
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return backends.require_device(device)


def model_from_hf(cls, hf_model, backend: str = "auto"):
    """KoGPTForCausalLM.from_hf: a model over a loaded transformers GPTJForCausalLM's own tensors (no copy)."""
    from .generation import GenerationConfig

    config = GPTJConfig.from_dict(hf_model.config.to_dict())
    # named_parameters() names a tied lm_head.weight once (as the embedding); buffers (embed_positions) are not weights
    model = model_from_state_dict(cls, config, dict(hf_model.named_parameters()), backend=backend)
    model.generation_config = GenerationConfig.from_any(getattr(hf_model, "generation_config", None))
    model.name_or_path = getattr(hf_model, "name_or_path", None) or type(hf_model).__name__
    return model


def model_from_state_dict(cls, config: GPTJConfig, state_dict: dict, backend: str = "auto"):
    """A model over existing tensors (no copy; device and dtype are theirs), checked like a checkpoint."""
    with torch.device("meta"):
        model = cls(config, backend=backend)
    expected = dict(model.named_parameters())
    present = {n for n in state_dict if not IGNORED_KEY.match(n)}
    shapes = {n: tuple(state_dict[n].shape) for n in present}
    problems = mismatches(expected, shapes, config.tie_word_embeddings, "the state dict")
    if problems:
        raise CheckpointError("state dict does not match the config:\n  " + "\n  ".join(problems))
    for name in expected:
        if name in present:
            _set_tensor(model, name, state_dict[name])
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def with_overrides(config: GPTJConfig, overrides: dict) -> GPTJConfig:
    """Config fields given to from_pretrained by keyword, as HF allows (e.g. pad_token_id=...)."""
    fields = set(GPTJConfig.__dataclass_fields__) - {"extra"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"from_pretrained() got unsupported arguments: {', '.join(unknown)}")
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in fields})


def mismatches(expected: dict, shapes: dict[str, tuple[int, ...]], tied: bool, source: str) -> list[str]:
    """Every way the tensors present (name -> shape) differ from the model's parameters, one line each."""
    missing = sorted(set(expected) - set(shapes) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(shapes) - set(expected))
    problems = [f"missing tensor {n}" for n in missing]
    problems += [f"unexpected tensor {n} (not part of a GPT-J with this config)" for n in unexpected]
    problems += [
        f"{n}: shape {shapes[n]} in {source}, {tuple(expected[n].shape)} expected from the config"
        for n in sorted(set(shapes) & set(expected)) if shapes[n] != tuple(expected[n].shape)
    ]
    return problems


def default_dtype(config: GPTJConfig, device: torch.device) -> torch.dtype:
    """float32 on the CPU; on a GPU float16, or bfloat16 for a bfloat16 checkpoint."""
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if config.torch_dtype == "bfloat16" else torch.float16


def generation_defaults(config: GPTJConfig, given, directory: Path):
    """The model's generation_config: HF's or ours if given, else generation_config.json, else HF's defaults with
    the config's token ids (as HF builds one from config.json)."""
    from .generation import GenerationConfig

    if given is not None:
        return GenerationConfig.from_any(given)
    found = read_generation_config(directory)
    if found is not None:
        return found
    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id)


def read_generation_config(directory: Path):
    """generation_config.json, when the checkpoint has one (its known fields; the rest is kept in `extra`)."""
    from .generation import GenerationConfig

    path = directory / "generation_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    known = {f for f in GenerationConfig.__dataclass_fields__ if f != "extra"}
    return GenerationConfig(**{k: v for k, v in data.items() if k in known},
                            extra={k: v for k, v in data.items() if k not in known})
