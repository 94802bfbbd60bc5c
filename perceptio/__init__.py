"""Perceptio: a vision-language model that writes segmentation and depth tokens before it answers.

Importing the package registers its classes with transformers' Auto classes. `PerceptioTrainer` is imported on first
use: `transformers.Trainer` pulls in datasets, pandas and accelerate, which inference does not need.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    pipelines,
)

from .models.perceptio import (
    PerceptioConfig,
    PerceptioDepthTokenizer,
    PerceptioDepthTokenizerConfig,
    PerceptioForConditionalGeneration,
    PerceptioImageProcessor,
    PerceptioProcessor,
)
from .models.perceptio.pipeline_perceptio import PerceptioSpatialPipeline
from .models.perceptio.post_processing_perceptio import PerceptioPrediction
from .models.perceptio.spatial_vocabulary_perceptio import PerceptioSpatialVocabulary


__version__ = "0.1.0"


def _register_auto_classes() -> None:
    AutoConfig.register(PerceptioConfig.model_type, PerceptioConfig, exist_ok=True)
    AutoConfig.register(PerceptioDepthTokenizerConfig.model_type, PerceptioDepthTokenizerConfig, exist_ok=True)
    AutoModel.register(PerceptioConfig, PerceptioForConditionalGeneration, exist_ok=True)
    AutoModel.register(PerceptioDepthTokenizerConfig, PerceptioDepthTokenizer, exist_ok=True)
    AutoModelForImageTextToText.register(PerceptioConfig, PerceptioForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(
        PerceptioConfig, image_processor_classes={"pil": PerceptioImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(PerceptioConfig, PerceptioProcessor, exist_ok=True)
    pipelines.PIPELINE_REGISTRY.register_pipeline(
        "perceptio-spatial", pipeline_class=PerceptioSpatialPipeline, pt_model=AutoModelForImageTextToText
    )


_register_auto_classes()


def __getattr__(name: str):
    """`from perceptio import PerceptioTrainer`, importing the trainer (and `transformers.Trainer`) only then."""
    if name == "PerceptioTrainer":
        from .trainers.trainer_perceptio import PerceptioTrainer

        return PerceptioTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PerceptioConfig",
    "PerceptioDepthTokenizer",
    "PerceptioDepthTokenizerConfig",
    "PerceptioForConditionalGeneration",
    "PerceptioImageProcessor",
    "PerceptioPrediction",
    "PerceptioProcessor",
    "PerceptioSpatialPipeline",
    "PerceptioSpatialVocabulary",
    "PerceptioTrainer",
]
