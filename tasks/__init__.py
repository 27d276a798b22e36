"""Prefect tasks over engine stages: `tasks.stage.run_stage` runs any stage with caching by
fingerprint, a lease, cluster submission, MLflow tracking and a Prefect artifact
(docs/orchestration.md)."""
