"""Errors raised for bad user input. The CLI prints their message, never a traceback."""


class DetrkitError(Exception):
    """Base class: the message must name the file and the field or entry at fault."""


class DatasetError(DetrkitError):
    """A dataset folder, annotation file or image is missing or malformed."""


class CheckpointError(DetrkitError):
    """A checkpoint is missing, truncated, corrupt or does not fit the model."""


class TrainingError(DetrkitError):
    """Training cannot go on (e.g. a non-finite loss)."""
