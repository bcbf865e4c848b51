"""lineside: few-shot image classification for factory inspection stations.

The core package is torch-free: it holds the input spec, image reading,
dataset scanning and metrics that training, export and the edge runtime share.
"""

__version__ = "0.1.0"

import sys as _sys

# OpenVINO's model converter and NNCF send usage statistics to Google Analytics unless the
# user has opted out (the openvino_telemetry package comes with openvino), and write a
# client id under ~/intel. lineside runs offline in plants and sends nothing: both fall
# back to their no-op stubs when that package cannot be imported.
if "openvino_telemetry" not in _sys.modules:
    _sys.modules["openvino_telemetry"] = None
