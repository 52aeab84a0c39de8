"""Benchmarks of pgdpo: each module is a script that prints Markdown tables and writes JSON (see BENCHMARKS.md)."""
