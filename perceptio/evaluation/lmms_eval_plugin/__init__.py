"""lmms-eval plugin: registers the `perceptio` model with lmms-eval through its `lmms_eval.models` entry point.

With `perceptio[eval]` and lmms-eval installed:

    lmms-eval --model perceptio --model_args pretrained=PATH --tasks mmbench_en_dev,seedbench,mme

`model_args` (comma-separated key=value): `pretrained` (checkpoint folder, required), `device` ("cuda" when one is
available, else "cpu"), `dtype` ("auto"), `batch_size` (1), `max_new_tokens` (128, when a task does not set it).
Importing this package does not import lmms-eval; the adapter class lives in `perceptio_lmms`.
"""

from __future__ import annotations


MODEL_ID = "perceptio"
ADAPTER_CLASS_PATH = "perceptio.evaluation.lmms_eval_plugin.perceptio_lmms.PerceptioLmms"


def perceptio_model_manifest():
    """The `ModelManifest` lmms-eval's registry loads from the `lmms_eval.models` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=ADAPTER_CLASS_PATH)


__all__ = ["ADAPTER_CLASS_PATH", "MODEL_ID", "perceptio_model_manifest"]
