"""File formats for exchanging models with other frameworks: ONNX and safetensors."""
