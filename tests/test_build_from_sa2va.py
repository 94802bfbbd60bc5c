"""`perceptio build --from-sa2va`: a converted (segmentation-only) Sa2VA gets depth tokens and a depth tokenizer.

The sources are the tiny Sa2VA checkpoints of `tests/fixtures/sa2va/` converted with `convert_sa2va` (Qwen2 with tied
embeddings, InternLM2 with an untied LM head) and a tiny random depth tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_trainer import training_args
from transformers import LogitsProcessor, LogitsProcessorList

from perceptio import PerceptioForConditionalGeneration
from perceptio.cli import main
from perceptio.hub_cards.build_from_sa2va import add_depth_tokens
from perceptio.hub_cards.convert_sa2va import convert_sa2va
from perceptio.hub_cards.planning import get_preset, plan_build
from perceptio.hub_cards.planning_sa2va import plan_from_sa2va
from perceptio.models.perceptio import PerceptioDepthTokenizer, PerceptioProcessor
from perceptio.tiny_models import tiny_depth_tokenizer_config
from perceptio.trainers.collator_perceptio import PerceptioDataCollator
from perceptio.trainers.trainer_perceptio import PerceptioTrainer


FIXTURES = Path(__file__).parent / "fixtures"
SA2VA_CONFIGS = FIXTURES / "sa2va_configs"
VARIANTS = ("qwen2", "internlm2")
DEPTH_TOKENS = ("<DEPTH_START>", "<DEPTH_END>", "<DEPTH_0>")


@pytest.fixture(scope="module")
def depth_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("depth") / "depth_tokenizer"
    torch.manual_seed(0)
    PerceptioDepthTokenizer(tiny_depth_tokenizer_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, depth_tokenizer_dir) -> dict[str, tuple[Path, Path]]:
    """Per variant: the converted folder and the folder `perceptio build --from-sa2va` wrote from it."""
    root = tmp_path_factory.mktemp("sa2va_depth")
    folders = {}
    for variant in VARIANTS:
        converted = convert_sa2va(FIXTURES / "sa2va" / variant / "checkpoint", root / f"{variant}-converted")
        output = root / f"{variant}-depth"
        argv = ["build", "--from-sa2va", str(converted.output_dir), "--depth-tokenizer", str(depth_tokenizer_dir)]
        assert main([*argv, "--output-dir", str(output)]) == 0
        folders[variant] = (converted.output_dir, output)
    return folders


def stored_float_dtypes(folder: Path, depth_tokenizer: bool = False) -> set[str]:
    """The safetensors dtypes of the floating-point weights in `folder`: the depth tokenizer's when
    `depth_tokenizer`, else every other one."""
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names = [name for name in handle.keys() if name.startswith("depth_tokenizer.") == depth_tokenizer]
            dtypes |= {handle.get_slice(name).get_dtype() for name in names}
    return dtypes & {"F32", "BF16", "F16"}


def saved_state(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of the checkpoint in `folder` as the model names them (a tied LM head left out)."""
    model = PerceptioForConditionalGeneration.from_pretrained(folder)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


@pytest.mark.parametrize("variant", VARIANTS)
def test_old_weights_are_unchanged_and_new_rows_are_the_mean(built, depth_tokenizer_dir, variant):
    source, output = built[variant]
    before, after = saved_state(source), saved_state(output)
    source_tokenizer = PerceptioProcessor.from_pretrained(source).tokenizer
    processor = PerceptioProcessor.from_pretrained(output)
    vocabulary = processor.tokenizer.get_vocab()
    old_ids = sorted(source_tokenizer.get_vocab().values())
    new_ids = sorted(vocabulary[token] for token in set(vocabulary) - set(source_tokenizer.get_vocab()))
    depth_config = tiny_depth_tokenizer_config()
    assert len(new_ids) == 2 + depth_config.num_codes
    # The old tokens keep their ids, so their rows can be compared id for id.
    assert all(vocabulary[token] == index for token, index in source_tokenizer.get_vocab().items())
    matrices = ["model.language_model.embed_tokens.weight"]
    if "lm_head.weight" in before:
        matrices.append("lm_head.weight")
    else:
        assert "lm_head.weight" not in after, "a tied checkpoint stays tied"
    for name in matrices:
        old_rows, new_rows = before[name], after[name]
        assert torch.equal(new_rows[old_ids], old_rows[old_ids]), name
        assert new_rows.shape[0] >= old_rows.shape[0] and new_rows.shape[0] >= max(new_ids) + 1
        not_new = torch.ones(new_rows.shape[0], dtype=torch.bool)
        not_new[new_ids] = False
        expected = new_rows[not_new].float().mean(0)
        for row in new_ids:
            torch.testing.assert_close(new_rows[row].float(), expected, atol=1e-2, rtol=0)
    for name, tensor in before.items():
        if name not in matrices:
            assert torch.equal(after[name], tensor), name
    depth_weights = load_file(depth_tokenizer_dir / "model.safetensors")
    for name, tensor in depth_weights.items():
        # The depth tokenizer stays float32 in the bfloat16 build and its bfloat16 load: bit-equal to the trained one.
        built_tensor = after[f"depth_tokenizer.{name}"]
        assert built_tensor.dtype == tensor.dtype and torch.equal(built_tensor, tensor), name
    assert set(after) == set(before) | {f"depth_tokenizer.{name}" for name in depth_weights}


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_and_processor_carry_the_depth_vocabulary(built, variant):
    source, output = built[variant]
    config = json.loads((output / "config.json").read_text())
    source_config = json.loads((source / "config.json").read_text())
    processor = PerceptioProcessor.from_pretrained(output)
    vocabulary = processor.tokenizer.get_vocab()
    depth_config = tiny_depth_tokenizer_config()
    assert config["num_depth_codes"] == depth_config.num_codes
    assert config["num_depth_tokens"] == depth_config.num_tokens
    assert config["depth_tokenizer_config"]["num_codes"] == depth_config.num_codes
    assert config["depth_start_token_id"] == vocabulary["<DEPTH_START>"]
    assert config["depth_end_token_id"] == vocabulary["<DEPTH_END>"]
    assert config["depth_code_token_offset"] == vocabulary["<DEPTH_0>"]
    assert config["seg_token_id"] == source_config["seg_token_id"] == vocabulary["[SEG]"]
    assert processor.spatial_vocabulary.num_depth_tokens == depth_config.num_tokens
    # Sa2VA's preprocessing and stop words carry over.
    exported = {key: value for key, value in processor.image_processor.to_dict().items() if key != "auto_map"}
    assert exported == PerceptioProcessor.from_pretrained(source).image_processor.to_dict()
    before = json.loads((source / "generation_config.json").read_text())
    after = json.loads((output / "generation_config.json").read_text())
    assert after["eos_token_id"] == before["eos_token_id"]
    # Sa2VA's weights are bfloat16; the build keeps them so (a float32 copy would double an 8B model's size), and
    # adds the depth tokenizer in float32 (a few MB).
    assert stored_float_dtypes(output) == stored_float_dtypes(source) == {"BF16"}
    assert stored_float_dtypes(output, depth_tokenizer=True) == {"F32"}
    card = (output / "README.md").read_text()
    assert "<DEPTH_START>" in card and "Sa2VA's, converted" in card


class PreferScript(LogitsProcessor):
    """Adds a large bonus to the scripted token of each step (then EOS); the grammar still masks what it forbids."""

    def __init__(self, script: list[int], eos: int):
        self.script = [*script, eos]
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.prompt_length, len(self.script) - 1)
        scores = scores.clone()
        scores[:, self.script[step]] += 1e4
        return scores


def test_built_model_generates_segs_a_depth_block_and_text_under_the_grammar(built):
    _, output = built["qwen2"]
    model = PerceptioForConditionalGeneration.from_pretrained(output, dtype=torch.float32).eval()
    processor = PerceptioProcessor.from_pretrained(output)
    config = model.config
    codes = [
        config.depth_code_token_offset + index % config.num_depth_codes for index in range(config.num_depth_tokens)
    ]
    text_ids = processor.tokenizer("a square", add_special_tokens=False)["input_ids"]
    # A [SEG] after the depth block breaks the format: the grammar must refuse it and the text must follow instead.
    script = [config.seg_token_id] * 2 + [config.depth_start_token_id, *codes, config.depth_end_token_id]
    script += [config.seg_token_id, *text_ids]
    image = Image.open(FIXTURES / "sa2va" / "qwen2" / "image.png").convert("RGB")
    (prediction,) = model.predict(
        [image],
        ["Please segment the red square."],
        processor=processor,
        max_new_tokens=len(script) + 2,
        logits_processor=LogitsProcessorList([PreferScript(script, processor.tokenizer.eos_token_id)]),
    )
    ids = prediction.token_ids
    block_end = ids.index(config.depth_end_token_id)
    assert ids[: block_end + 1] == script[: block_end + 1], "[SEG]s, then a complete depth block"
    assert config.seg_token_id not in ids[block_end:], "the grammar refused the [SEG] after the block"
    assert len(prediction.masks) == 2
    assert prediction.masks[0].shape == (image.height, image.width)
    assert prediction.depth is not None and prediction.depth.shape == (image.height, image.width)
    assert prediction.text.strip()
    assert "[SEG]" not in prediction.text and "DEPTH" not in prediction.text


def test_built_folder_trains_one_step_on_a_depth_sample(built, tmp_path):
    _, output = built["internlm2"]
    model = PerceptioForConditionalGeneration.from_pretrained(output, dtype=torch.float32)
    processor = PerceptioProcessor.from_pretrained(output)
    rng = np.random.default_rng(0)
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[8:30, 10:36] = 255
    sample = {
        "image": Image.fromarray(rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)),
        "prompt": "Segment the box and describe the scene.",
        "answer": "A box.",
        "masks": [mask],
        "depth": rng.uniform(1.0, 6.0, size=(48, 48)).astype(np.float32),
        "use_depth_block": True,
        "task": "referring",
    }
    collator = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer, max_num_tiles=1)
    batch = collator([sample])
    block = processor.spatial_vocabulary.find_depth_blocks(batch["labels"])
    assert len(block) == 1
    arguments = training_args(tmp_path)
    before = model.text_hidden_fcs[0].weight.detach().clone()
    trainer = PerceptioTrainer(
        model=model, args=arguments, train_dataset=Dataset.from_list([sample]), data_collator=collator
    )
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    assert not torch.equal(model.text_hidden_fcs[0].weight.detach(), before)
    logged = trainer.state.log_history[0]
    for name in ("loss_lm", "loss_mask", "loss_marker", "loss_token", "loss_count", "loss_depth_recon"):
        assert name in logged and np.isfinite(logged[name]) and logged[name] > 0, (name, logged)


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_an_unconverted_sa2va_is_refused_naming_config_and_model_type(depth_tokenizer_dir, tmp_path):
    source = FIXTURES / "sa2va" / "qwen2" / "checkpoint"
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'sa2va_chat'.*convert-sa2va"):
        add_depth_tokens(source, depth_tokenizer_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_source_is_never_overwritten(built, depth_tokenizer_dir):
    source, _ = built["qwen2"]
    with pytest.raises(ValueError, match="is the source"):
        add_depth_tokens(source, depth_tokenizer_dir, source, overwrite=True)
    assert json.loads((source / "config.json").read_text())["num_depth_codes"] == 0


def test_a_checkpoint_with_depth_is_refused(built, depth_tokenizer_dir, tmp_path):
    _, output = built["qwen2"]
    with pytest.raises(
        ValueError, match=r"config\.json: num_depth_codes is \d+; the source must be segmentation-only"
    ):
        add_depth_tokens(output, depth_tokenizer_dir, tmp_path / "out")


def test_missing_or_invalid_depth_tokenizer_is_refused(built, tmp_path):
    source, _ = built["qwen2"]
    with pytest.raises(ValueError, match="depth tokenizer folder .*does not exist"):
        add_depth_tokens(source, tmp_path / "no_such_folder", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty/config\.json does not exist"):
        add_depth_tokens(source, empty, tmp_path / "out")
    # A folder of another model: its config.json and model_type are named.
    with pytest.raises(
        ValueError, match=r"config\.json has model_type 'perceptio'; expected a PerceptioDepthTokenizer"
    ):
        add_depth_tokens(source, source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokens_already_present_are_refused_naming_the_tokenizer_file(built, depth_tokenizer_dir, tmp_path):
    source, _ = built["qwen2"]
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    processor = PerceptioProcessor.from_pretrained(copy)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<DEPTH_START>"]})
    processor.tokenizer.save_pretrained(copy)
    with pytest.raises(ValueError, match=r"tokenizer\.json: the tokenizer already has \['<DEPTH_START>'\]"):
        add_depth_tokens(copy, depth_tokenizer_dir, tmp_path / "out")


def test_cli_reports_bad_input_in_one_line(depth_tokenizer_dir, tmp_path, capsys):
    argv = ["build", "--from-sa2va", str(FIXTURES / "sa2va" / "qwen2" / "checkpoint")]
    status = main([*argv, "--depth-tokenizer", str(depth_tokenizer_dir), "--output-dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in error and "model_type is 'sa2va_chat'" in error
    assert main([*argv, "--base", "x", "--depth-tokenizer", "d", "--output-dir", "o"]) == 2
    assert "drop --base" in capsys.readouterr().err


# ---- dry run -----------------------------------------------------------------------------------------------------


def decoder_parameters(llm: dict, vocab_size: int) -> int:
    """Parameters of a Llama/Qwen2-style decoder and its untied head, from the config's fields."""
    hidden, heads, kv_heads = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"]
    head_dim = hidden // heads
    qkv_bias = (heads + 2 * kv_heads) * head_dim if llm["architectures"] == ["Qwen2ForCausalLM"] else 0
    attention = hidden * (heads + 2 * kv_heads) * head_dim + qkv_bias + heads * head_dim * hidden
    mlp = 3 * hidden * llm["intermediate_size"]
    layer = attention + mlp + 2 * hidden
    return vocab_size * hidden + llm["num_hidden_layers"] * layer + hidden


@pytest.mark.parametrize("name", ["Sa2VA-8B", "Sa2VA-InternVL3-8B"])
def test_dry_run_plans_from_the_sa2va_config_alone(name, capsys):
    source = SA2VA_CONFIGS / name
    llm = json.loads((source / "config.json").read_text())["llm_config"]
    planned = plan_from_sa2va(source)
    config, plan = planned.config, planned.plan
    assert planned.sam2_source.startswith("SAM2-L")
    grown = llm["vocab_size"] + 2 + config.num_depth_codes
    assert config.text_config.vocab_size == grown
    language = plan.component_parameters["language_model"] + plan.component_parameters["lm_head"]
    assert language == decoder_parameters(llm, grown) + grown * llm["hidden_size"]
    # The other components are those of the 8B preset, whose vision tower and SAM2 are the same.
    preset = plan_build(get_preset("perceptio-8b").config())
    for component in ("vision_tower", "grounding_encoder (SAM2)", "depth_tokenizer"):
        assert plan.component_parameters[component] == preset.component_parameters[component], component
    assert main(["build", "--from-sa2va", str(source), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"{plan.total_parameters:,}" in printed and "LoRA fine-tuning" in printed


def test_dry_run_of_a_converted_folder_matches_the_build(built, depth_tokenizer_dir, capsys):
    source, output = built["internlm2"]
    plan = plan_from_sa2va(source, PerceptioDepthTokenizer.from_pretrained(depth_tokenizer_dir).config).plan
    model = PerceptioForConditionalGeneration.from_pretrained(output)
    assert plan.total_parameters == sum(parameter.numel() for parameter in model.parameters())
    argv = ["build", "--from-sa2va", str(source), "--depth-tokenizer", str(depth_tokenizer_dir), "--dry-run"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{plan.total_parameters:,}" in printed and "SAM2: the SAM2 of" in printed
