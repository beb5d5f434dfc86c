"""Training: fitting, grids, selection, the pipeline from a table to a bundle, data readers, evaluation."""
