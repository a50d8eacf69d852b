"""detrkit: end-to-end query-based object detection (DETR, Deformable DETR, SQR/DQR)."""
__version__ = "0.1.0"
