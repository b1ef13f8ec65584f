"""Triton kernels, one op per file (installed as `kogpt_fast.kernels`).

Nothing here is imported by `import kogpt_fast`: Triton is loaded only when the triton backend is chosen.
"""
