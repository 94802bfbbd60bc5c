"""Perceptio model code. Every module here ships flat to the Hub, so it imports only same-folder modules and those
of `perceptio/processing` (as `from ..processing.X import`, which the export makes a same-folder import)."""

from .configuration_perceptio import PerceptioConfig
from .configuration_perceptio_depth_tokenizer import PerceptioDepthTokenizerConfig
from .modeling_perceptio import PerceptioForConditionalGeneration
from .modeling_perceptio_depth_tokenizer import PerceptioDepthTokenizer


__all__ = [
    "PerceptioConfig",
    "PerceptioDepthTokenizerConfig",
    "PerceptioDepthTokenizer",
    "PerceptioForConditionalGeneration",
]
