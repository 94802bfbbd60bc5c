"""`pipeline("perceptio-spatial", model=folder, trust_remote_code=True)`: image + prompt -> text, masks, depth.

The pipeline ships in the exported folder; `custom_pipelines_config()` is what the folder's config.json needs so
that transformers' `pipeline` finds it (transformers reads `config.custom_pipelines[task]["impl"]`).
"""

from __future__ import annotations

from typing import Any

from transformers import Pipeline

from .generation_perceptio import decoding_kwargs


PIPELINE_TASK = "perceptio-spatial"


def custom_pipelines_config() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry to add to an exported config.json (merge it into `config.custom_pipelines`)."""
    return {
        PIPELINE_TASK: {
            "impl": "pipeline_perceptio.PerceptioSpatialPipeline",
            "pt": ["AutoModelForImageTextToText"],
            "type": "multimodal",
        }
    }


class PerceptioSpatialPipeline(Pipeline):
    r"""
    Perceptio's answer to a question about an image: `pipe(image, prompt="Segment the red cube.")` or
    `pipe({"image": image, "prompt": "..."})` returns a `PerceptioPrediction` (text, masks, mask scores, depth,
    depth codes; masks and depth at the image's size). Generation arguments (`max_new_tokens`, `do_sample`,
    `num_beams`, `spatial_grammar`…), `mask_threshold` and the decoding mode (`static_cache=True`: transformers'
    static KV cache; `compile=True`: the decoding step under `torch.compile`, which implies the static cache) may be
    given at construction or per call.

    Example (a folder written by `perceptio export`; `image` is any PIL image):

    ```python
    from transformers import pipeline

    pipe = pipeline("perceptio-spatial", model="path/to/exported", trust_remote_code=True)
    prediction = pipe(image, prompt="Where is the cube?", max_new_tokens=64)
    print(prediction.text, len(prediction.masks), prediction.depth is None)
    ```
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self,
        prompt: str | None = None,
        mask_threshold: float | None = None,
        static_cache: bool | None = None,
        compile: bool | None = None,
        **generate_kwargs,
    ):
        preprocess_params = {} if prompt is None else {"prompt": prompt}
        forward_params = dict(generate_kwargs)
        if static_cache is not None or compile is not None:
            # `compile` implies the static cache, as `perceptio predict --compile` does.
            forward_params.update(decoding_kwargs(static_cache=bool(static_cache or compile), compile=bool(compile)))
        if mask_threshold is not None:
            forward_params["mask_threshold"] = mask_threshold
        return preprocess_params, forward_params, {}

    def preprocess(self, inputs: Any, prompt: str | None = None) -> dict[str, Any]:
        if isinstance(inputs, dict):
            unknown = set(inputs) - {"image", "prompt"}
            if unknown or "image" not in inputs:
                raise ValueError(f"A dict input needs the keys 'image' and 'prompt' only, got {sorted(inputs)}.")
            image, prompt = inputs["image"], inputs.get("prompt", prompt)
        else:
            image = inputs
        if not isinstance(prompt, str):
            raise ValueError("Give a text prompt: pipe(image, prompt='...') or pipe({'image': ..., 'prompt': '...'}).")
        model_inputs = dict(self.processor(images=[image], text=[self.processor.format_prompt(prompt)]))
        model_inputs["original_sizes"] = self.processor.image_sizes([image])
        return model_inputs

    def _forward(self, model_inputs: dict[str, Any], **forward_params) -> dict[str, Any]:
        original_sizes = model_inputs.pop("original_sizes")
        predictions = self.model.predict_from_inputs(
            model_inputs, processor=self.processor, original_sizes=original_sizes, **forward_params
        )
        return {"predictions": predictions}

    def postprocess(self, model_outputs: dict[str, Any]):
        predictions = model_outputs["predictions"]
        return predictions[0] if len(predictions) == 1 else predictions


__all__ = ["PIPELINE_TASK", "PerceptioSpatialPipeline", "custom_pipelines_config"]
