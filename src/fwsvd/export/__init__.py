"""Deployment formats: ONNX export of dense and compressed models (float32 or dynamic int8) and onnxruntime scoring of exported folders."""
