"""lineside: few-shot image classification for factory inspection stations.

The core package is torch-free: it holds the input spec, image reading,
dataset scanning and metrics that training, export and the edge runtime share.
"""

__version__ = "0.1.0"
