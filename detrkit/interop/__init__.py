"""Weights interop: official DETR / Deformable DETR checkpoints, HuggingFace transformers folders,
detrkit's native format; reading them safely and writing them back.

``load_model`` reads any of them (``detrkit.load`` wraps it in a ``Detector``); ``convert`` writes
the native format; ``export`` writes a transformers folder or an official ``.pth``.
"""
from detrkit.interop.load import convert, export, load_model

__all__ = ["convert", "export", "load_model"]
