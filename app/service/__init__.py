"""The HTTP scoring service: a thin FastAPI layer over the bundle and the scorer."""
