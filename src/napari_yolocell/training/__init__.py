"""Training: annotations to boxes, YOLO dataset export, ultralytics training, INT8 quantization."""
