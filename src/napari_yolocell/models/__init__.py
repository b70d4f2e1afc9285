"""Models: what a model is (spec, registry), its integrity, the detector interface, the
runtimes (PyTorch, ONNX Runtime, OpenVINO), the classical baseline, exports and loading.

Imports only :mod:`napari_yolocell.io` below it.
"""
