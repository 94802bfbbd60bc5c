"""`perceptio build`: tiny checkpoints in each real on-disk format -> a flat folder that loads for Hub users."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_export import run_isolated_script
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config, Sam2Model

from perceptio import PerceptioDepthTokenizer, PerceptioForConditionalGeneration, PerceptioProcessor
from perceptio.cli import main
from perceptio.hub_cards.build_perceptio import build_perceptio
from perceptio.hub_cards.export_perceptio import export_pretrained
from perceptio.hub_cards.publish import load_in_isolation
from perceptio.models.perceptio.pipeline_perceptio import PIPELINE_TASK
from perceptio.models.perceptio.spatial_vocabulary_perceptio import spatial_tokens
from perceptio.tiny_models import tiny_depth_tokenizer_config, tiny_sam2_config, train_tiny_tokenizer


INTERNVL_IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]
# The InternVL3-hf template shape, with a system line of its own so a test can tell it apart from Perceptio's default.
BASE_CHAT_TEMPLATE = (
    "{{ '<|im_start|>system\nYou are a tiny base model.<|im_end|>\n' }}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_NUM_DEPTH_TOKENS = 16
# Shrinks Meta's sam2.1 hiera-large hydra config to the tiny SAM2 of perceptio.tiny_models (SAM heads stay as SAM2Base builds them).
TINY_SAM2_CONFIG_NAME = "configs/sam2.1/sam2.1_hiera_l.yaml"
TINY_SAM2_OVERRIDES = (
    "++model.image_size=128",
    "++model.image_encoder.trunk.embed_dim=12",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,2,7,2]",
    "++model.image_encoder.trunk.global_att_blocks=[5,7,9]",
    "++model.image_encoder.trunk.window_spec=[8,4,14,7]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.backbone_channel_list=[96,48,24,12]",
    "++model.memory_attention.d_model=32",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.fuser.layer.dim=32",
    "++model.memory_encoder.fuser.num_layers=1",
)


def write_tiny_internvl(folder: Path, seed: int = 0) -> InternVLForConditionalGeneration:
    """A tiny InternVLForConditionalGeneration + real BPE tokenizer saved as an InternVL3-hf folder is."""
    tokenizer = train_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": INTERNVL_IMAGE_TOKENS})
    tokenizer.chat_template = BASE_CHAT_TEMPLATE
    config = InternVLConfig(
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 64,
            "patch_size": 4,
        },
        image_seq_length=64,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def write_tiny_original_sam2(path: Path, seed: int = 0) -> Path:
    """An original-format SAM2 `.pt` ({"model": state dict}) from the sam2 package's model, random weights."""
    from perceptio.hub_cards.convert_sam2_original import build_original_sam2

    model = build_original_sam2(TINY_SAM2_CONFIG_NAME, TINY_SAM2_OVERRIDES)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            # Random everywhere (SAM2 starts several tensors at zero), so a misplaced weight changes the output.
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny base (InternVL folder), SAM2 (transformers folder) and depth tokenizer folder."""
    root = tmp_path_factory.mktemp("parts")
    base = write_tiny_internvl(root / "base")
    torch.manual_seed(1)
    Sam2Model(tiny_sam2_config()).save_pretrained(root / "sam2")
    PerceptioDepthTokenizer(tiny_depth_tokenizer_config()).save_pretrained(root / "depth")
    return {"root": root, "base_model": base, "base": root / "base", "sam2": root / "sam2", "depth": root / "depth"}


@pytest.fixture(scope="module")
def built(parts):
    """The folder `perceptio build` writes from the tiny parts (float32)."""
    output = parts["root"] / "built"
    code = main(
        [
            "build",
            "--base",
            str(parts["base"]),
            "--sam2",
            str(parts["sam2"]),
            "--depth-tokenizer",
            str(parts["depth"]),
            "--output-dir",
            str(output),
            "--dtype",
            "float32",
            "--num-depth-tokens",
            str(TINY_NUM_DEPTH_TOKENS),
        ]
    )
    assert code == 0
    return output


def test_built_folder_loads_without_the_package_and_keeps_the_base_logits(parts, built):
    report = load_in_isolation(built, prompt="Where is the red cube?")
    assert report.model_class.startswith("transformers_modules.")
    base_model = parts["base_model"]
    base_vocab = base_model.config.text_config.vocab_size
    with torch.no_grad():
        base_logits = base_model(input_ids=report.input_ids).logits
    num_codes = tiny_depth_tokenizer_config().num_codes
    assert report.logits.shape[-1] == base_vocab + len(spatial_tokens(num_codes)) - len(INTERNVL_IMAGE_TOKENS)
    # The new tokens only add columns: every base column is the base model's, bit for bit.
    assert torch.equal(report.logits[..., :base_vocab], base_logits)


def test_build_adds_spatial_tokens_at_the_mean_and_carries_the_chat_template(parts, built):
    model = PerceptioForConditionalGeneration.from_pretrained(built)
    processor = PerceptioProcessor.from_pretrained(built)
    base_model = parts["base_model"]
    base_vocab = base_model.config.text_config.vocab_size
    ids = processor.spatial_vocabulary
    assert ids.image_context == base_model.config.image_token_id == model.config.image_token_id
    assert min(ids.seg, ids.depth_start, ids.depth_end, ids.depth_code_offset) >= base_vocab
    assert model.config.num_depth_tokens == TINY_NUM_DEPTH_TOKENS
    assert ids == model.config.spatial_vocabulary
    for built_matrix, base_matrix in (
        (model.get_input_embeddings().weight, base_model.get_input_embeddings().weight),
        (model.get_output_embeddings().weight, base_model.get_output_embeddings().weight),
    ):
        assert torch.equal(built_matrix[:base_vocab], base_matrix)
        expected = base_matrix.mean(0).expand(built_matrix.shape[0] - base_vocab, -1)
        torch.testing.assert_close(built_matrix[base_vocab:], expected)
    assert processor.chat_template == BASE_CHAT_TEMPLATE
    assert "You are a tiny base model." in processor.format_prompt("hi", num_images=0)
    fcs = [parameter for parameter in model.text_hidden_fcs.parameters()]
    assert all(torch.isfinite(parameter).all() and parameter.abs().sum() > 0 for parameter in fcs)


def test_build_writes_a_model_card_with_hub_metadata(built):
    card = (built / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: image-text-to-text" in card
    assert f'model_id = "{built.resolve()}"' in card


@pytest.fixture(scope="module")
def built_bf16(parts):
    """The folder a bfloat16 build (the 8B path's dtype) writes from the tiny parts."""
    output = parts["root"] / "built-bf16"
    build_perceptio(
        parts["base"],
        parts["sam2"],
        parts["depth"],
        output,
        dtype="bfloat16",
        num_depth_tokens=TINY_NUM_DEPTH_TOKENS,
    )
    return output


def float_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in tensors.items() if tensor.is_floating_point()}


def test_bfloat16_build_saves_bfloat16_weights_and_a_float32_depth_tokenizer(parts, built_bf16):
    with safe_open(built_bf16 / "model.safetensors", "pt") as weights:
        stored = {key: weights.get_tensor(key) for key in weights.keys()}
    depth = {
        key.removeprefix("depth_tokenizer."): tensor
        for key, tensor in stored.items()
        if key.startswith("depth_tokenizer.")
    }
    others = {key: tensor for key, tensor in stored.items() if not key.startswith("depth_tokenizer.")}
    assert {tensor.dtype for tensor in float_tensors(others).values()} == {torch.bfloat16}
    assert {tensor.dtype for tensor in float_tensors(depth).values()} == {torch.float32}
    # The trained tokenizer's values, bit for bit: they never went through bf16.
    trained = load_file(parts["depth"] / "model.safetensors")
    assert depth.keys() == trained.keys()
    assert all(
        torch.equal(depth[name], tensor) and depth[name].dtype == tensor.dtype for name, tensor in trained.items()
    )


def bias_to_seg_then_depth(model: PerceptioForConditionalGeneration) -> None:
    """Bias generation to one [SEG] and then a depth block (the grammar completes the block)."""
    seg, start = model.config.seg_token_id, model.config.depth_start_token_id
    model.generation_config.sequence_bias = [[[seg], 100.0], [[seg, seg], -200.0], [[start], 50.0]]


@pytest.mark.usefixtures("single_torch_thread")
def test_a_bfloat16_load_keeps_the_depth_tokenizer_in_float32_and_predicts_depth(
    parts, built_bf16, rgb_image, tmp_path
):
    model = PerceptioForConditionalGeneration.from_pretrained(built_bf16, dtype=torch.bfloat16).eval()
    processor = PerceptioProcessor.from_pretrained(built_bf16)
    assert model.dtype == model.grounding_encoder.dtype == model.text_hidden_fcs[0].weight.dtype == torch.bfloat16
    state = model.depth_tokenizer.state_dict()
    trained = load_file(parts["depth"] / "model.safetensors")
    assert {tensor.dtype for tensor in float_tensors(state).values()} == {torch.float32}
    # Its trained values, and its integer code counters stay integers.
    assert all(
        torch.equal(state[name], tensor) and state[name].dtype == tensor.dtype for name, tensor in trained.items()
    )
    bias_to_seg_then_depth(model)
    prompt = "Segment the cube."
    (local,) = model.predict([rgb_image], [prompt], processor=processor, max_new_tokens=22)
    assert len(local.masks) == 1 and local.depth is not None and local.depth.dtype == np.float32
    assert local.depth.shape == rgb_image.shape[:2]
    # The bf16 model's depth is the float32 tokenizer's decoding of its codes.
    reference = PerceptioDepthTokenizer.from_pretrained(parts["depth"], dtype=torch.float32).eval()
    codes = torch.tensor([local.depth_codes])
    assert torch.equal(model.depth_tokenizer.decode(codes), reference.decode(codes))

    # Saving the bf16-loaded model keeps the tokenizer in float32, and a Hub user's AutoModel load in bf16 (no
    # perceptio package) keeps it so too and predicts the same.
    folder = export_pretrained(model, processor, tmp_path / "export")
    with safe_open(folder / "model.safetensors", "pt") as weights:
        saved = {weights.get_slice(key).get_dtype() for key in weights.keys() if key.startswith("depth_tokenizer.")}
    assert saved == {"F32", "I64"}
    request = {"image": rgb_image, "prompt": prompt}
    remote = run_isolated_script("isolated_hub_predict.py", folder, request, tmp_path, PIPELINE_TASK, "bfloat16")
    assert remote["model_dtype"] == "torch.bfloat16" and remote["depth_tokenizer_dtypes"] == {"torch.float32"}
    for result in (remote["predict"], remote["pipeline"]):
        assert result["token_ids"] == local.token_ids and result["depth_codes"] == local.depth_codes
        assert np.array_equal(result["depth"], local.depth)
        assert len(result["masks"]) == 1


def test_build_converts_an_original_sam2_checkpoint(parts, tmp_path):
    from perceptio.hub_cards.convert_sam2_original import convert_original_sam2

    checkpoint = write_tiny_original_sam2(tmp_path / "tiny_sam2.pt")
    arguments = ["--sam2-config", TINY_SAM2_CONFIG_NAME]
    for override in TINY_SAM2_OVERRIDES:
        arguments += ["--sam2-override", override]
    code = main(
        [
            "build",
            "--base",
            str(parts["base"]),
            "--sam2",
            str(checkpoint),
            "--depth-tokenizer",
            str(parts["depth"]),
            "--output-dir",
            str(tmp_path / "out"),
            "--dtype",
            "float32",
            "--num-depth-tokens",
            "16",
            *arguments,
        ]
    )
    assert code == 0
    model = PerceptioForConditionalGeneration.from_pretrained(tmp_path / "out")
    converted = convert_original_sam2(checkpoint, TINY_SAM2_CONFIG_NAME, TINY_SAM2_OVERRIDES)
    assert model.config.sam2_config.mask_decoder_config.mlp_dim == converted.config.mask_decoder_config.mlp_dim
    for key, value in converted.state_dict().items():
        assert torch.equal(model.grounding_encoder.state_dict()[key], value), key


def test_a_base_that_is_not_internvl_is_rejected_naming_its_config(parts, tmp_path):
    llm = Qwen2Config(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    llm.save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match=r"llm/config\.json has model_type 'qwen2'.*expected an InternVL"):
        build_perceptio(tmp_path / "llm", parts["sam2"], parts["depth"], tmp_path / "out", num_depth_tokens=16)


def test_an_original_internvl_release_gets_a_conversion_hint(parts, tmp_path):
    folder = tmp_path / "internvl_chat"
    folder.mkdir()
    original = {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"]}
    (folder / "config.json").write_text(json.dumps(original))
    with pytest.raises(ValueError, match="InternLM2.*convert_internvl_weights_to_hf"):
        build_perceptio(folder, parts["sam2"], parts["depth"], tmp_path / "out", num_depth_tokens=16)


def test_a_sam2_folder_with_missing_weights_is_rejected(parts, tmp_path):
    folder = tmp_path / "sam2_incomplete"
    Sam2Model(tiny_sam2_config()).save_pretrained(folder)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        kept = {key: weights.get_tensor(key) for key in weights.keys() if not key.startswith("mask_decoder.iou")}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"sam2_incomplete lacks \d+ weights of Sam2Model.*mask_decoder\.iou"):
        build_perceptio(parts["base"], folder, parts["depth"], tmp_path / "out", num_depth_tokens=16)


def test_an_original_sam2_checkpoint_with_missing_keys_is_rejected(parts, tmp_path):
    checkpoint = write_tiny_original_sam2(tmp_path / "sam2.pt")
    content = torch.load(checkpoint, weights_only=True)
    del content["model"]["sam_mask_decoder.iou_token.weight"]
    torch.save(content, checkpoint)
    with pytest.raises(ValueError, match=r"sam2\.pt does not match the sam2 config.*1 missing.*iou_token"):
        build_perceptio(
            parts["base"],
            checkpoint,
            parts["depth"],
            tmp_path / "out",
            num_depth_tokens=16,
            sam2_config_name=TINY_SAM2_CONFIG_NAME,
            sam2_overrides=TINY_SAM2_OVERRIDES,
        )


def test_a_depth_tokenizer_whose_grid_does_not_match_is_rejected(parts, tmp_path, capsys):
    code = main(
        [
            "build",
            "--base",
            str(parts["base"]),
            "--sam2",
            str(parts["sam2"]),
            "--depth-tokenizer",
            str(parts["depth"]),
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2
    assert "depth/config.json" in error and "4x4 = 16 codes" in error and "100 depth tokens" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"num_depth_tokens": 0}, "num_depth_tokens must be a positive integer"),
        ({"sam2_config_name": "configs/sam2.1/sam2.1_hiera_l.yaml"}, "only apply to an original .pt"),
    ],
)
def test_bad_build_arguments_raise(parts, tmp_path, overrides, message):
    arguments = {"num_depth_tokens": 16, **overrides}
    with pytest.raises(ValueError, match=message):
        build_perceptio(parts["base"], parts["sam2"], parts["depth"], tmp_path / "out", **arguments)


def test_build_refuses_a_non_empty_output_folder(parts, built):
    with pytest.raises(ValueError, match="not empty"):
        build_perceptio(parts["base"], parts["sam2"], parts["depth"], built, num_depth_tokens=16)


def test_assembly_assigns_the_loaded_tensors_without_copying(parts):
    from perceptio.hub_cards.build_perceptio import assemble_on_meta
    from perceptio.tiny_models import build_tiny_perceptio

    donor, _ = build_tiny_perceptio(seed=3)
    state = {
        "": {
            key: value
            for key, value in donor.state_dict().items()
            if not key.startswith(("grounding", "depth", "text"))
        },
        "grounding_encoder": donor.grounding_encoder.state_dict(),
        "depth_tokenizer": donor.depth_tokenizer.state_dict(),
    }
    model = assemble_on_meta(donor.config, state, torch.float32, seed=0)
    # Same storage as the loaded tensors: building never holds two copies of the base weights.
    assert model.lm_head.weight.data_ptr() == state[""]["lm_head.weight"].data_ptr()
    embedding = "model.language_model.embed_tokens.weight"
    assert model.get_input_embeddings().weight.data_ptr() == state[""][embedding].data_ptr()
    assert not any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])
    with pytest.raises(ValueError, match="do not fit"):
        assemble_on_meta(donor.config, {"": {}, "grounding_encoder": state["grounding_encoder"]}, torch.float32, 0)
