"""The FastAPI service: thin routes over app.engine; settings from ANOMALY_* variables."""
