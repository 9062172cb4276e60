"""The benchmarks: one script per measured claim, run as modules from the repository root (`python -m bench.decode`).
Each prints a table with PASS / MISS against its target and writes bench/results/<name>.json; bench/common.py holds
what they share."""
