"""Ray Serve deployments that score batches of rows with one ONNX model version each."""
