"""The detection engine: tiling, normalisation, nucleus size, tile merging, detection of one
image and of many (batch).
"""
