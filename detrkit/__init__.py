"""detrkit: end-to-end query-based object detection (DETR, Deformable DETR, SQR/DQR)."""
__version__ = "0.1.0"

from detrkit.inference import Detector, load  # noqa: E402

__all__ = ["Detector", "load", "__version__"]
