"""Bundling: a dataset or a user's ONNX model in, a verified, servable bundle out (defender's classifiers,
calibration, quality gate, ONNX export, manifest)."""
