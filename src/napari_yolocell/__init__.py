"""napari-yolocell: count cell nuclei with tiled YOLOv5 / YOLOv6 detection."""

__version__ = "0.1.0"
