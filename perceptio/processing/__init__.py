"""Perceptio pre- and post-processing. Every module here ships flat to the Hub, so it imports only same-folder modules."""

from .image_processing_perceptio import PerceptioImageProcessor
from .processing_perceptio import PerceptioProcessor


__all__ = ["PerceptioImageProcessor", "PerceptioProcessor"]
