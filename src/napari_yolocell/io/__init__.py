"""Reading images and datasets: lazy TIFF, plain images, decoded-chunk cache, YOLO datasets.

The bottom layer: imports nothing else of the package.
"""
