"""Scoring whole tables: one function from a batch of rows to the output columns (app.batch.core),
and the distributed engines built on it (app.batch.on_ray, app.batch.on_spark; optional extras)."""
