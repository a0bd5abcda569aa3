"""The end-to-end benchmark's parts: model builders, step schedule, timing, variants, results file.

``benchmarks/bench_end_to_end.py`` is the command line that drives them."""
