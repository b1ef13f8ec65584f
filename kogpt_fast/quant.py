"""Weight-only quantization: int8 or fp8 (E4M3) weights with one scale per output channel.

A QuantizedWeight stands for a linear layer's dense weight W [N, K] (torch's Linear layout) as

    W[n, k] ~= data[n, k] * scale[n]        data [N, K] int8 or torch.float8_e4m3fn, scale [N] in the activation dtype

and it is a property of the GEMM ops (DESIGN.md): every linear-family op of every backend takes a QuantizedWeight
where it takes a dense weight; the model code does not branch on it.

Quantizing, symmetric and per output row (`quantize`, `quantize_joint`):
    amax[n]  = max_k |W[n, k]|, in fp32 from the weight as read (a float32 checkpoint is quantized from float32)
    scale[n] = amax[n] / QMAX rounded to the scale dtype, raised by one ulp where that rounding fell below
               amax / QMAX, so that no |W / scale| exceeds QMAX (nothing is clipped); a zero row gets scale 1
    int8:  data = round_half_even(W / scale), in [-127, 127]
    fp8:   data = (W / scale).to(float8_e4m3fn) (round to nearest even), |data| <= 448
GPT-J's fused weights are quantized as fused: [Wo | W_fc_out] gets one scale per row over both pieces' K (the fused
out_proj + fc_out GEMM applies one scale a row), so out_proj and fc_out hold equal scales. Rows of q, k, v and fc_in
are independent: quantizing [Wq; Wk; Wv; W_in] or each alone gives the same data and scales.

What the ops compute:
- the torch backend (reference.linear): W' = (data.float() * scale.float()).to(activation dtype), then the dense op;
  one rounding per weight element.
- the kernels (Triton, CUDA): out = epilogue(scale[n] * sum_k float(data[n, k]) * float(x[m, k])). The weight is
  decoded exactly (every int8 and E4M3 value is exact in fp16), products and sums run in fp32, the scale multiplies
  the fp32 accumulator before bias, GELU and residual, and the store rounds once. The dequantized weight is never
  rounded, so the kernels are at least as close to the exact result as the reference; the tests hold them to twice
  the reference's own error (tests/tolerance.py).

fp8 runs on the kernel backends only on GPUs of compute capability 8.9+ (Ada, Hopper): below that int8 reads the same
bytes at better accuracy, and the CPU has no kernel backend. The torch backend runs fp8 anywhere (it dequantizes
every call: the oracle, the CPU path, and what `python -m kogpt_fast.quality` measures on the CPU).
"""
from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("int8", "fp8")
QMAX = {"int8": 127.0, "fp8": 448.0}
STORAGE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
FP8_MIN_CAPABILITY = (8, 9)
QUANT_METHOD = "kogpt-fast"  # config.json's quantization_config.quant_method for checkpoints written by convert


def check_scheme(scheme) -> str | None:
    """None (no quantization) or one of SCHEMES, else a ValueError naming the value."""
    if scheme is None or (isinstance(scheme, str) and scheme in SCHEMES):
        return scheme
    raise ValueError(f"quantize={scheme!r} is not supported: use one of {', '.join(map(repr, SCHEMES))} or None")


def scheme_of(data: torch.Tensor) -> str:
    for scheme, dtype in STORAGE_DTYPES.items():
        if data.dtype == dtype:
            return scheme
    raise ValueError(f"quantized data must be int8 or float8_e4m3fn, got {data.dtype}")


class QuantizedWeight:
    """W ~= data * scale[:, None] (module docstring). `shape`, `dtype` and `device` are those of the dense weight it
    stands for (dtype: the scales', the activation dtype), so code that only reads them needs no change.

    It supports what the model does to its weights (model._fuse / _unfuse): torch.cat along the rows (data and
    scales joined) or along K (pieces that share their scales), row and column slices, contiguous() and clone().
    """

    __slots__ = ("data", "scale")

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        scheme_of(data)
        if data.dim() != 2 or scale.shape != (data.shape[0],):
            raise ValueError(f"a quantized weight needs data [N, K] and scale [N], got {tuple(data.shape)} and "
                             f"{tuple(scale.shape)}")
        if not scale.is_floating_point() or scale.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"scale must be float32, float16 or bfloat16, got {scale.dtype}")
        if scale.device != data.device:
            raise ValueError(f"data is on {data.device}, scale on {scale.device}")
        self.data, self.scale = data, scale

    scheme = property(lambda self: scheme_of(self.data))
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.scale.dtype)
    device = property(lambda self: self.data.device)
    is_cuda = property(lambda self: self.data.is_cuda)

    def dim(self) -> int:
        return 2

    def stride(self, dim: int | None = None):
        return self.data.stride() if dim is None else self.data.stride(dim)

    def is_contiguous(self) -> bool:
        return self.data.is_contiguous() and self.scale.is_contiguous()

    def data_ptr(self) -> int:
        return self.data.data_ptr()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [N, K]: data.float() * scale.float(), rounded once to dtype (default: the scales').

        Computed as data.to(dtype) * scale.to(dtype), the same bits at half the traffic: the data converts exactly,
        and the product of an int8 / E4M3 value and a float32 / float16 / bfloat16 scale is exact in fp32, which both
        forms round once to dtype."""
        dtype = dtype or self.dtype
        return self.data.to(dtype) * self.scale.to(dtype)[:, None]

    def __getitem__(self, index) -> "QuantizedWeight":
        """w[rows] or w[rows, cols] with slices: rows take their scales along, columns share them."""
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        if not (isinstance(rows, slice) and isinstance(cols, slice)):
            raise TypeError("a QuantizedWeight is indexed with slices only: w[a:b] or w[:, a:b]")
        return QuantizedWeight(self.data[rows, cols], self.scale[rows])

    def contiguous(self) -> "QuantizedWeight":
        return QuantizedWeight(self.data.contiguous(), self.scale.contiguous())

    def clone(self) -> "QuantizedWeight":
        return QuantizedWeight(self.data.clone(), self.scale.clone())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "QuantizedWeight":
        """On another device; dtype converts the scales (the activation dtype), never the data."""
        return QuantizedWeight(self.data.to(device), self.scale.to(device=device, dtype=dtype))

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.scheme}, shape={tuple(self.shape)}, scale {self.dtype}, {self.device})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.cat:
            return _cat(*args, **(kwargs or {}))
        raise TypeError(f"{func.__name__} does not take a QuantizedWeight: the kogpt_fast ops do "
                        "(reference.linear and the kernels), or call .dequantize() for a dense weight")


def _cat(weights, dim: int = 0) -> QuantizedWeight:
    """Join along the rows (dim 0: data and scales concatenated) or along K (dim 1: the pieces must share scales,
    as GPT-J's out_proj and fc_out do when quantized together)."""
    if not all(isinstance(w, QuantizedWeight) for w in weights) or len({w.scheme for w in weights}) != 1:
        raise TypeError("torch.cat joins QuantizedWeights of one scheme only")
    if dim == 0:
        return QuantizedWeight(torch.cat([w.data for w in weights]), torch.cat([w.scale for w in weights]))
    if dim in (1, -1):
        first = weights[0].scale
        if not all(torch.equal(w.scale, first) for w in weights[1:]):
            raise ValueError("quantized weights with different per-row scales cannot be joined along K: quantize "
                             "them together (kogpt_fast.quant.quantize_joint)")
        return QuantizedWeight(torch.cat([w.data for w in weights], dim=1), first)
    raise ValueError(f"a QuantizedWeight is 2-D: torch.cat along dim {dim}")


def as_weight(weight):
    """What a module's `weight` is set to: nn.Parameter for a dense tensor, a QuantizedWeight as it is (its
    QuantizedLinear stores the data and scales as parameters)."""
    return weight if isinstance(weight, QuantizedWeight) else nn.Parameter(weight, requires_grad=False)


def dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """weight itself when dense; a QuantizedWeight dequantized to dtype (the reference's rounding)."""
    return weight.dequantize(dtype) if isinstance(weight, QuantizedWeight) else weight


def _scales(amax: torch.Tensor, scheme: str, dtype: torch.dtype) -> torch.Tensor:
    """scale [N] in dtype with amax / scale <= QMAX: the nearest value of dtype, or the next one up."""
    qmax = QMAX[scheme]
    scale = (amax / qmax).to(dtype)
    low = scale.double() * qmax < amax.double()  # exact in fp64
    scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def _encode(weight: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    scaled = weight.float() / scale.float()[:, None]
    if scheme == "int8":
        return torch.round(scaled).clamp_(-127, 127).to(torch.int8)
    return scaled.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)


def quantize_joint(pieces: list[torch.Tensor], scheme: str, scale_dtype: torch.dtype | None = None,
                   names: list[str] | None = None) -> list[QuantizedWeight]:
    """Quantize weights [N, K_i] that a GEMM reads as one [N, sum K_i] (GPT-J's [Wo | W_fc_out]): one scale per row
    over every piece's K. scale_dtype: default the first piece's dtype. Non-finite weights raise a ValueError."""
    check_scheme(scheme)
    names = names or [f"weight {i}" for i in range(len(pieces))]
    rows = pieces[0].shape[0]
    for name, w in zip(names, pieces):
        if w.dim() != 2 or w.shape[0] != rows or not w.is_floating_point():
            raise ValueError(f"{name}: quantize_joint takes floating-point [N, K] weights with one N, got "
                             f"{w.dtype} {tuple(w.shape)}")
    amax = torch.stack([w.detach().abs().amax(dim=1).float() for w in pieces]).amax(dim=0)
    if not torch.isfinite(amax).all():
        bad = [name for name, w in zip(names, pieces) if not torch.isfinite(w).all()]
        raise ValueError(f"cannot quantize {', '.join(bad)}: it holds inf or NaN")
    scale = _scales(amax, scheme, scale_dtype or pieces[0].dtype)
    return [QuantizedWeight(_encode(w.detach(), scale, scheme), scale) for w in pieces]


def quantize(weight: torch.Tensor, scheme: str, scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """One weight [N, K], per-row scales (module docstring)."""
    return quantize_joint([weight], scheme, scale_dtype)[0]


# ---- which weights of a GPT-J are quantized, and which share their scales ----

def quantized_names(n_layer: int, tied: bool) -> list[str]:
    """HF names of the weights a quantized GPT-J holds quantized: every projection, and the lm_head unless it is
    tied to the embedding (which stays dense: its rows are gathered, not multiplied)."""
    names = []
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        names += [p + f"attn.{n}_proj.weight" for n in ("q", "k", "v", "out")]
        names += [p + "mlp.fc_in.weight", p + "mlp.fc_out.weight"]
    return names if tied else names + ["lm_head.weight"]


def joint_group(name: str) -> tuple[str, ...]:
    """The weights quantized together with `name` (their scales are shared along K), in K order."""
    if name.endswith(("attn.out_proj.weight", "mlp.fc_out.weight")):
        layer = name.rsplit(".", 3)[0]  # transformer.h.N
        return (f"{layer}.attn.out_proj.weight", f"{layer}.mlp.fc_out.weight")
    return (name,)


class Quantizer:
    """Quantizes a checkpoint's weights as they are read, one at a time: `add(name, tensor)` returns the
    (name, QuantizedWeight) pairs that are complete. A joint group (out_proj with fc_out) waits for its last piece,
    so at most one layer's out_proj is held dense."""

    def __init__(self, scheme: str, scale_dtype: torch.dtype | None = None):
        self.scheme, self.scale_dtype = check_scheme(scheme), scale_dtype
        self._pending: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[str, QuantizedWeight]]:
        group = joint_group(name)
        self._pending[name] = tensor
        if not all(n in self._pending for n in group):
            return []
        pieces = [self._pending.pop(n) for n in group]
        return list(zip(group, quantize_joint(pieces, self.scheme, self.scale_dtype, list(group))))

    def finish(self) -> None:
        if self._pending:
            raise ValueError(f"weights quantized together were not all given: {', '.join(sorted(self._pending))} "
                             "without the rest of its group")


# ---- the module that holds a quantized weight ----

class QuantizedLinear(nn.Module):
    """nn.Linear's place in a quantized model. Parameters (what state_dict() and checkpoints hold): `weight`, the
    data [out, in] (int8; fp8 as its raw bytes in uint8, so that model.to(dtype) never casts it), `weight_scale`
    [out] and `bias`. The attribute `weight` reads as the QuantizedWeight pairing data and scales (what the ops
    take), and assigning a QuantizedWeight to it stores both."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, check_scheme(scheme)
        data = torch.zeros(out_features, in_features, dtype=STORAGE_DTYPES[scheme], device=device)
        self.weight = QuantizedWeight(data, torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @property
    def weight(self) -> QuantizedWeight:
        data = self._parameters["weight"]
        return QuantizedWeight(data.view(torch.float8_e4m3fn) if self.scheme == "fp8" else data,
                               self._parameters["weight_scale"])

    def __setattr__(self, name, value):
        if name == "weight" and isinstance(value, QuantizedWeight):
            if value.scheme != self.scheme:
                raise ValueError(f"this layer holds {self.scheme} weights, got {value.scheme}")
            data = value.data.view(torch.uint8) if self.scheme == "fp8" else value.data
            self._parameters["weight"] = nn.Parameter(data, requires_grad=False)
            self._parameters["weight_scale"] = nn.Parameter(value.scale, requires_grad=False)
            return
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"scheme={self.scheme}"


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{HF weight name: the module holding it} for every weight a quantized model quantizes."""
    tied = model.config.tie_word_embeddings
    return {name: model.get_submodule(name.removesuffix(".weight"))
            for name in quantized_names(model.config.n_layer, tied)}


def make_quantized(model: nn.Module, scheme: str) -> None:
    """Swap every quantized layer's nn.Linear for an empty QuantizedLinear of the same shape, device and dtype
    (the loader fills them; meta-device models stay on meta)."""
    for name, module in linear_modules(model).items():
        if isinstance(module, QuantizedLinear):
            continue
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        w = module.weight
        q = QuantizedLinear(module.in_features, module.out_features, module.bias is not None, scheme,
                            dtype=w.dtype, device=w.device)
        if module.bias is not None:
            q.bias = module.bias
        setattr(model.get_submodule(parent), attr, q)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize a dense KoGPTForCausalLM in place (every projection and the lm_head; the embedding stays): each
    dense weight is freed as soon as its QuantizedWeight exists. Scales take the model's dtype."""
    check_scheme(scheme)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("the model is quantized already")
    check_runnable(scheme, model.backend(), model.device)
    model._unfuse()  # each module's weight its own tensor again: the fused copies are rebuilt from the new ones
    dense_weights = {name: module.weight for name, module in linear_modules(model).items()}
    quantizer = Quantizer(scheme, model.dtype)
    make_quantized(model, scheme)
    modules = linear_modules(model)
    for name in list(dense_weights):
        for done, qweight in quantizer.add(name, dense_weights.pop(name)):
            modules[done].weight = qweight
    quantizer.finish()
    model.drop_cache()
    return model


def model_scheme(model: nn.Module) -> str | None:
    """The scheme a model's weights are quantized with, None for a dense model."""
    return next((m.scheme for m in model.modules() if isinstance(m, QuantizedLinear)), None)


# ---- where each scheme runs ----

def unavailable_reason(scheme: str | None, backend: str, device: torch.device) -> str | None:
    """None when a model quantized with `scheme` runs on `backend` (resolved) and `device`, else why not."""
    if scheme != "fp8" or backend == "torch":
        return None
    if device.type != "cuda":
        return (f"fp8 weights run on the {backend} backend only on a GPU of compute capability "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+, not on {device.type}: use quantize='int8', or "
                "backend='torch' (which dequantizes each weight at every call)")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        return (f"fp8 weights need compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+ (Ada, "
                f"Hopper) on the {backend} backend; {torch.cuda.get_device_name(device)} is "
                f"{capability[0]}.{capability[1]}: use quantize='int8' (the same bytes, more accurate here)")
    return None


def check_runnable(scheme: str | None, backend: str, device: torch.device) -> None:
    from .backends import BackendUnavailable

    reason = unavailable_reason(scheme, backend, device)
    if reason is not None:
        raise BackendUnavailable(reason)


# ---- checkpoints ----

def quantization_config(scheme: str, scale_dtype: torch.dtype, tied: bool) -> dict:
    """config.json's quantization_config entry for a checkpoint written by `kogpt-fast convert --quantize`."""
    return {
        "quant_method": QUANT_METHOD, "scheme": scheme, "weight_dtype": str(STORAGE_DTYPES[scheme]).removeprefix(
            "torch."), "granularity": "per-output-channel", "symmetric": True,
        "scale_dtype": str(scale_dtype).removeprefix("torch."),
        "not_quantized": ["transformer.wte"] + (["lm_head (tied to transformer.wte)"] if tied else []),
    }


def checkpoint_scheme(extra: dict, source: str) -> str | None:
    """The scheme of a checkpoint from its config's fields (GPTJConfig.extra), None for a dense one. A
    quantization_config this runtime did not write (GPTQ, AWQ, bitsandbytes, ...) is a ConfigError naming it."""
    from .config import ConfigError

    qc = extra.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        raise ConfigError(f"{source}: quantization_config with quant_method={method!r} is not supported: kogpt-fast "
                          f"reads its own {QUANT_METHOD!r} checkpoints (int8, fp8), written by `kogpt-fast convert "
                          "--quantize`; convert the original (unquantized) checkpoint")
    scheme = qc.get("scheme")
    if scheme not in SCHEMES:
        raise ConfigError(f"{source}: quantization_config.scheme={scheme!r} is not one of {', '.join(SCHEMES)}")
    return scheme


# ---- memory ----

def resident_bytes(config, scheme: str | None, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of a model's weights on the device, from its shapes: {"embedding", "layers", "lm_head", "total",
    "read_per_token"} (read_per_token: what a batch-1 decode step reads, all but the embedding table).
    Dense tensors are in dtype; a quantized weight is one byte an element plus one scale (dtype) a row."""
    check_scheme(scheme)
    elt = dtype.itemsize
    d, ff, vocab = config.n_embd, config.n_inner, config.vocab_size

    def weight(rows: int, cols: int) -> int:
        return rows * cols * elt if scheme is None else rows * cols + rows * elt

    block = (weight(d, d) * 4 + weight(ff, d) + weight(d, ff)  # q, k, v, out; fc_in; fc_out
             + (ff + d) * elt + 2 * d * elt)  # fc_in and fc_out biases; ln_1
    embedding = vocab * d * elt
    tied = config.tie_word_embeddings
    lm_head = vocab * elt + (0 if tied else weight(vocab, d))  # bias, and the weight unless it is the embedding's
    ln_f = 2 * d * elt
    total = embedding + config.n_layer * block + lm_head + ln_f
    read = total - embedding + (embedding if tied else 0)
    return {"embedding": embedding, "layers": config.n_layer * block, "lm_head": lm_head, "total": total,
            "read_per_token": read}
