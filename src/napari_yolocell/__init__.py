"""napari-yolocell: count cell nuclei with tiled YOLOv5 / YOLOv6 detection."""

from .ultralytics_env import block_triton_on_cpu

__version__ = "0.1.0"

# Before anything imports torchvision (see the function's docstring: a crash under Xvfb).
block_triton_on_cpu()
