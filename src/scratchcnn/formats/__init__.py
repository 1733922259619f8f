"""File formats: scratchcnn checkpoints (.npz), and ONNX and safetensors for exchanging models
with other frameworks. Below the harness and the CLI; loading never executes code."""
