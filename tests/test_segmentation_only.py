"""A segmentation-only checkpoint (a converted Sa2VA: `[SEG]` tokens, no depth tokenizer) end to end: `perceptio
predict`, the pipeline, `perceptio export` and loading the export without the package, the RefCOCO runner, one
training step, and its model card."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from test_trainer import training_args
from transformers import LogitsProcessor, LogitsProcessorList

from perceptio import PerceptioForConditionalGeneration
from perceptio.cli import main
from perceptio.hub_cards.convert_sa2va import convert_sa2va
from perceptio.hub_cards.model_card import PerceptioCardData, write_model_card
from perceptio.models.perceptio import PerceptioProcessor
from perceptio.models.perceptio.pipeline_perceptio import PerceptioSpatialPipeline
from perceptio.trainers.collator_perceptio import PerceptioDataCollator
from perceptio.trainers.trainer_perceptio import PerceptioTrainer


FIXTURE = Path(__file__).parent / "fixtures" / "sa2va" / "qwen2"
PROMPT = "Please segment the red square."
MAX_NEW_TOKENS = 8

pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_sa2va(FIXTURE / "checkpoint", tmp_path_factory.mktemp("seg_only") / "converted").output_dir


@pytest.fixture(scope="module")
def model_and_processor(converted):
    model = PerceptioForConditionalGeneration.from_pretrained(converted).eval()
    return model, PerceptioProcessor.from_pretrained(converted)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.open(FIXTURE / "image.png").convert("RGB")


@pytest.fixture(scope="module")
def reference(model_and_processor, image):
    """What the package's model predicts for the fixture's image and prompt."""
    model, processor = model_and_processor
    (prediction,) = model.predict([image], [PROMPT], processor=processor, max_new_tokens=MAX_NEW_TOKENS)
    return prediction


def test_the_checkpoint_is_segmentation_only_and_segments(model_and_processor, reference, image):
    model, processor = model_and_processor
    assert model.depth_tokenizer is None and not processor.spatial_vocabulary.has_depth_block
    # The tiny random Sa2VA writes [SEG]s for this prompt (Sa2VA's own code does too: see the fixture's meta.json).
    assert len(reference.masks) > 0
    assert all(mask.shape == (image.height, image.width) and mask.dtype == bool for mask in reference.masks)
    assert reference.depth is None and reference.depth_codes is None


def test_predict_command_writes_the_masks_and_no_depth(converted, reference, tmp_path):
    image_path = tmp_path / "image.png"
    Image.open(FIXTURE / "image.png").save(image_path)
    argv = ["predict", "--model", str(converted), "--image", str(image_path), "--prompt", PROMPT]
    assert main([*argv, "--output-dir", str(tmp_path / "out"), "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    written = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert written["num_masks"] == len(reference.masks)
    assert written["mask_areas"] == [int(mask.sum()) for mask in reference.masks]
    assert written["depth_image"] is None and written["depth_size"] is None
    assert (tmp_path / "out" / "overlay.png").is_file() and not (tmp_path / "out" / "depth.png").exists()


def test_pipeline_gives_the_prediction(model_and_processor, reference, image):
    model, processor = model_and_processor
    pipe = PerceptioSpatialPipeline(
        model=model, processor=processor, tokenizer=processor.tokenizer, image_processor=processor.image_processor
    )
    piped = pipe(image, prompt=PROMPT, max_new_tokens=MAX_NEW_TOKENS)
    assert piped.text == reference.text and piped.depth is None
    assert len(piped.masks) == len(reference.masks)
    assert all(np.array_equal(a, b) for a, b in zip(piped.masks, reference.masks))


def test_export_loads_without_the_package_and_predicts_the_same(converted, reference, image, tmp_path):
    from test_export import run_isolated_script

    assert main(["export", "--model", str(converted), "--output-dir", str(tmp_path / "export")]) == 0
    request = {"image": image, "prompt": PROMPT}
    remote = run_isolated_script(
        "isolated_hub_predict.py", tmp_path / "export", request, tmp_path, "perceptio-spatial"
    )
    for name in ("predict", "pipeline"):
        prediction = remote[name]
        assert prediction["token_ids"][: len(reference.token_ids)] == reference.token_ids, name
        assert prediction["depth"] is None, name
        assert len(prediction["masks"]) >= len(reference.masks), name
        assert all(np.array_equal(a, b) for a, b in zip(prediction["masks"], reference.masks)), name


def _refcoco(path: Path, image: Image.Image) -> None:
    split = datasets.Dataset.from_dict(
        {
            "question_id": ["0", "1"],
            "image": [image, image],
            "answer": [["the red square"], ["the square on the left"]],
            "segmentation": [[20, 20, 70, 20, 70, 70, 20, 70], [5, 5, 40, 5, 40, 40, 5, 40]],
            "file_name": ["a.png", "a.png"],
        },
        features=datasets.Features(
            {
                "question_id": datasets.Value("string"),
                "image": datasets.Image(),
                "answer": datasets.Sequence(datasets.Value("string")),
                "segmentation": datasets.Sequence(datasets.Value("float32")),
                "file_name": datasets.Value("string"),
            }
        ),
    )
    datasets.DatasetDict({"val": split}).save_to_disk(str(path))


def test_refcoco_runner_scores_every_query(converted, image, tmp_path):
    _refcoco(tmp_path / "refcoco", image)
    argv = ["eval", "refcoco", "--model", str(converted), "--data", str(tmp_path / "refcoco")]
    argv += ["--output-dir", str(tmp_path / "eval"), "--max-new-tokens", str(MAX_NEW_TOKENS), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "eval" / "refcoco_summary.json").read_text())
    assert summary["num_samples"] == 2 and summary["num_skipped"] == 0
    assert summary["num_without_mask"] == 0
    assert 0.0 <= summary["ciou"] <= 1.0 and 0.0 <= summary["giou"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "eval" / "refcoco_samples.jsonl").read_text().splitlines()]
    assert len(records) == 2


def test_model_card_describes_segmentation_only(converted):
    card = write_model_card(
        converted,
        PerceptioCardData(model_name="Sa2VA tiny", source_kind="sa2va").with_build_sources(
            base="ByteDance/Sa2VA-4B", sam2="Sa2VA's SAM2", depth_tokenizer=None
        ),
    ).read_text()
    assert "segmentation-only" in card and "[SEG] … [SEG] answer text" in card
    assert "DEPTH" not in card and "depth-estimation" not in card and "depth tokenizer |" not in card
    assert "loss_depth" not in card and "Dice" in card
    assert "(id None)" not in card and "N = 0" not in card, "no unset depth field is printed"
    assert "ByteDance/Sa2VA-4B" in card.split("---")[1], "the Hub source is the base model"


def test_trainer_fine_tunes_it_on_a_mask_sample(converted, tmp_path):
    model = PerceptioForConditionalGeneration.from_pretrained(converted)
    processor = PerceptioProcessor.from_pretrained(converted)
    mask = np.zeros((96, 96), dtype=np.uint8)
    mask[20:70, 20:70] = 255
    sample = {
        "image": Image.open(FIXTURE / "image.png").convert("RGB"),
        "prompt": PROMPT,
        "answer": "Here it is.",
        "masks": [mask],
        "depth": None,
        "use_depth_block": False,
        "task": "referring",
    }
    collator = PerceptioDataCollator(processor, depth_tokenizer=None, max_num_tiles=1)
    arguments = training_args(tmp_path)
    before = model.grounding_encoder.mask_decoder.iou_prediction_head.proj_out.weight.detach().clone()
    trainer = PerceptioTrainer(
        model=model, args=arguments, train_dataset=datasets.Dataset.from_list([sample]), data_collator=collator
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss_lm"] > 0 and logged["loss_mask"] > 0
    assert logged["loss_marker"] == logged["loss_token"] == logged["loss_depth_recon"] == 0
    after = model.grounding_encoder.mask_decoder.iou_prediction_head.proj_out.weight.detach()
    assert not torch.equal(after, before)


class ForcedScript(LogitsProcessor):
    """Forces the generated tokens to be `script`, one per step (its last token repeated after it)."""

    def __init__(self, script: list[int]):
        self.script = script
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.prompt_length, len(self.script) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[step]] = 0
        return forced


def test_predict_stops_at_the_checkpoints_stop_words(tmp_path):
    """Sa2VA's InternLM2 models end their turn with `<|im_end|>`, which is not the tokenizer's EOS (`</s>`); the
    converted generation_config.json lists both, and `generate` stops at either. `predict` must too: text after the
    end of the turn is not part of the answer."""
    folder = convert_sa2va(FIXTURE.parent / "internlm2" / "checkpoint", tmp_path / "converted").output_dir
    model = PerceptioForConditionalGeneration.from_pretrained(folder).eval()
    processor = PerceptioProcessor.from_pretrained(folder)
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in model.generation_config.eos_token_id
    assert end_of_turn != processor.tokenizer.eos_token_id
    after_the_turn = processor.tokenizer("model", add_special_tokens=False)["input_ids"]
    script = [model.config.seg_token_id, end_of_turn, *after_the_turn * 3]
    image = Image.open(FIXTURE.parent / "internlm2" / "image.png").convert("RGB")
    inputs = processor(images=[image], text=[processor.format_prompt(PROMPT)])
    generated = model.generate(
        **{key: value for key, value in inputs.items() if key != "sam_pixel_values"},
        max_new_tokens=6,
        logits_processor=LogitsProcessorList([ForcedScript(script)]),
    )
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == script[:2]
    (prediction,) = model.predict(
        [image],
        [PROMPT],
        processor=processor,
        max_new_tokens=6,
        logits_processor=LogitsProcessorList([ForcedScript(script)]),
    )
    # Generation stopped at <|im_end|>, and the answer ends there: the stop word is not part of it.
    assert prediction.token_ids == script[:1], "predict generated or read past <|im_end|>"
    assert prediction.text == "" and len(prediction.masks) == 1
