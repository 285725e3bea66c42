"""Export: ONNX (fp32 / int8 Q/DQ) with simplification, ORT offline optimization and parity checks; TensorRT."""
