"""lineside.runtime: the torch-free edge runtime (numpy, OpenCV, onnxruntime, OpenVINO)."""
