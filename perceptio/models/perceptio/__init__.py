"""Perceptio configuration, model, processor and image processor. Every module here ships flat to the Hub, so it
imports only same-folder modules (as `from .X import`), torch, transformers, numpy, PIL and the standard library."""

from .configuration_perceptio import PerceptioConfig
from .configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig
from .image_processing_perceptio import PerceptioImageProcessor
from .modeling_perceptio import PerceptioForConditionalGeneration
from .modeling_perceptio_depth_tokenizer import PerceptioDepthTokenizer
from .processing_perceptio import PerceptioProcessor


__all__ = [
    "PerceptioConfig",
    "PerceptioDepthTokenizerConfig",
    "PerceptioDepthTokenizer",
    "PerceptioForConditionalGeneration",
    "PerceptioImageProcessor",
    "PerceptioProcessor",
]
