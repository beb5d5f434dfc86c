"""The model bundle: the one place that knows how a trained model is stored, and its calibration."""
