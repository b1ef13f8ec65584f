"""kogpt-fast benchmarks: per-op microbenchmarks and end-to-end generation (run with `python bench/run.py`)."""
