"""lineside.export: trained run -> ONNX / OpenVINO IR bundles (FP32 and INT8)."""
