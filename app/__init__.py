"""anomaly-scores: the manifold likelihood of Smidl, Bim and Pevny (2019) as a product.

Packages, each importing only those in brackets besides itself (tests/test_layering.py's ALLOWED
enforces this):
  api     the FastAPI service: routes, parsing, auth, body limits, JSON, metrics, logs
          [engine, bundle, model]
  batch   whole tables, in one process or on Ray Data and Spark [engine, train, bundle, model]
  engine  the scorers behind one interface, the served model's lifecycle and the scheduler
          [bundle, model]
  train   fitting, grids, selection, the training pipeline, data readers, the paper's evaluation
          [bundle, model]
  bundle  the model bundle format, calibration (thresholds, p-values) and the scaler [model]
  model   networks, priors, geometry, the scores and their ONNX emission [none]
cli.py (the command line), detector.py (the Python API) and report.py (the HTML report) sit above
them all; docs/architecture.md has the picture.
"""
