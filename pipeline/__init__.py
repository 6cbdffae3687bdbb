"""Thin DVC stage entry points. Ray Train, Ray Tune and MLflow are used here and nowhere in ctxseg."""
