"""anomaly-scores: the manifold likelihood of Smidl, Bim and Pevny (2019) as a product.

Packages, each importing only those listed after it (tests/test_layering.py enforces this):
  api     the FastAPI service: routes, parsing, auth, body limits, JSON, metrics, logs
  engine  the scorers behind one interface, the served model's lifecycle and the scheduler
  train   fitting, grids, selection, the training pipeline, data readers, the paper's evaluation
  bundle  the model bundle format, calibration (thresholds, p-values) and the scaler
  model   networks, priors, geometry, the scores and their ONNX emission
cli.py is the command line over all of them; docs/architecture.md has the picture.
"""
