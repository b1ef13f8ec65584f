"""Triton kernels, one op per file (installed as `kogpt_fast.kernels`).

Nothing here is imported by `import kogpt_fast`: Triton is loaded only when the triton backend is chosen
(kogpt_fast.backends), or by the kernel tests. `ops` gathers the kernels under the reference's op names.

Files: rope (the shared RoPE device function), kv_cache_write, layer_norm, gemm, prefill_attention,
decode_attention, ops. Under TRITON_INTERPRET=1 (CPU tests) `interpreter_compat` patches a Triton 3.6
interpreter bug first.
"""
import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from . import interpreter_compat

    interpreter_compat.apply()
