import os
import sys

# The tests import their helpers (hf_reference, ...) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

# The Triton GEMV measures its tiles on the card at the first call of each shape (kernels/gemm.py). The tests run
# hundreds of shapes, each tuning would compile and time every candidate: they use the default tiles, and the
# tuner has its own tests (tests/test_gemm.py), which turn it on.
os.environ.setdefault("KOGPT_GEMV_TUNE", "0")
