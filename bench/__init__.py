"""Benchmarks: run from the repository root as `python -m bench.<name>`, never as a script path
(bench/tokenize.py would shadow the standard library's tokenize module)."""
