import os
import sys

# The tests import their helpers (hf_reference, ...) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
