"""PerceptioConfig: validation with clear errors, and save/load round trips."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from perceptio import PerceptioConfig, PerceptioDepthTokenizerConfig
from perceptio.tiny_models import tiny_depth_tokenizer_config


def test_tiny_config_round_trips(tiny_pair, tmp_path):
    config = tiny_pair[0].config
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PerceptioConfig)
    assert isinstance(loaded.depth_tokenizer_config, PerceptioDepthTokenizerConfig)
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}
    assert loaded.spatial_vocabulary == config.spatial_vocabulary


def test_default_config_has_no_depth_tokenizer():
    config = PerceptioConfig()
    assert not config.has_depth_tokenizer
    assert config.sam2_config.model_type == "sam2"
    assert config.spatial_vocabulary is None  # no token ids before a tokenizer gives them


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_depth_codes": 0}, "num_depth_codes"),
        ({"num_depth_tokens": -3}, "num_depth_tokens"),
        ({"num_depth_tokens": 15, "depth_tokenizer_config": tiny_depth_tokenizer_config()}, "num_depth_tokens"),
        (
            {"num_depth_codes": 31, "num_depth_tokens": 16, "depth_tokenizer_config": tiny_depth_tokenizer_config()},
            "num_depth_codes",
        ),
        ({"seg_token_id": 10**9}, "seg_token_id"),
        ({"depth_start_token_id": -1}, "depth_start_token_id"),
        ({"depth_code_token_offset": 151_900, "num_depth_codes": 128}, "depth_code_token_offset"),
        ({"seg_token_id": 5, "depth_end_token_id": 5}, "share the id"),
        ({"seg_token_id": 12, "depth_code_token_offset": 10, "num_depth_codes": 4}, "falls inside"),
        ({"num_depth_codes": 4, "num_depth_tokens": 0}, "num_depth_tokens"),
        ({"seg_token_id": 5}, "missing: \\['depth_start', 'depth_end', 'depth_code_offset'\\]"),
        (
            {"num_depth_codes": 0, "num_depth_tokens": 0, "seg_token_id": 5, "depth_start_token_id": 6},
            "segmentation-only vocabulary .* \\['depth_start'\\] are set",
        ),
        ({"mask_loss_weight": -1.0}, "mask_loss_weight"),
        ({"depth_soft_merge_temperature": 0.0}, "depth_soft_merge_temperature"),
        ({"seg_attribute_classes": []}, "seg_attribute_classes"),
        ({"seg_attribute_classes": [9, 1]}, "seg_attribute_classes"),
        ({"seg_attribute_classes": "colour"}, "seg_attribute_classes"),
        ({"seg_attribute_loss_weight": -0.5}, "seg_attribute_loss_weight"),
    ],
)
def test_invalid_fields_raise_value_error_naming_them(overrides, field):
    with pytest.raises(ValueError, match=field):
        PerceptioConfig(**overrides)


def test_depth_code_ids_are_contiguous(tiny_pair):
    config = tiny_pair[0].config
    ids = list(config.spatial_vocabulary.depth_code_ids)
    assert ids == list(range(ids[0], ids[0] + config.num_depth_codes))
    assert ids[-1] < config.text_config.vocab_size


def test_a_segmentation_only_config_round_trips(tmp_path):
    config = PerceptioConfig(seg_token_id=5, image_token_id=6, num_depth_codes=0, num_depth_tokens=0)
    vocabulary = config.spatial_vocabulary
    assert not vocabulary.has_depth_block and vocabulary.seg == 5 and vocabulary.depth_start is None
    assert list(vocabulary.depth_code_ids) == [] and vocabulary.spatial_token_ids == [5]
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).spatial_vocabulary == vocabulary
