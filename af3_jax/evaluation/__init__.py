"""Benchmark evaluation behind `eval.py`: benchmark files read into prompts (`tasks`), answers kept per
process and merged (`journal`), the benchmarks' own scoring rules (`scoring`), and a run's folder, its
one call into the inference path and its files (`runner`)."""
