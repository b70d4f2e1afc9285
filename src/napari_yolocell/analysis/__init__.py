"""Analysis of detections: counts per ROI, confidence calibration, evaluation against labels,
plots.
"""
