"""Prefect flows composing stage tasks: lifecycle, data_prep, train, evaluate
(docs/orchestration.md). No ML code here."""
