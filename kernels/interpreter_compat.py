"""Lets Triton 3.6's CPU interpreter (TRITON_INTERPRET=1, used by the tests) run with NumPy >= 2.4.

The interpreter keeps a scalar as a one-element 1-D NumPy array and turns it into a Python int with
`int(array)`, which NumPy 2.4 no longer allows ("only 0-dimensional arrays can be converted to Python scalars"):
every kernel whose loop bound is a runtime value fails. Upstream Triton converts with `int(data.squeeze())`;
this applies the same conversion. Nothing changes on a GPU, where kernels are compiled.
"""
from __future__ import annotations


def apply() -> None:
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_kogpt_index_fix", False):
        return  # another Triton layout (nothing to patch), or already patched

    def patch_with_scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_with_scalar_index._kogpt_index_fix = True
    interpreter._patch_lang_tensor = patch_with_scalar_index
