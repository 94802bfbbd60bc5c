"""Convert an original SAM2 checkpoint (Meta's `.pt`) into transformers' `Sam2Model`.

The checkpoint is loaded into the `sam2` package's own model definition (built from its hydra config), so a file
that does not fit its config fails there, with the file named. The transformers config is read off that built
model (not guessed from the file name), and its image-path weights are renamed to transformers' layout. The video
modules (memory attention, memory encoder, object pointers) are dropped: Perceptio segments single images.

Needs the optional `sam2` package (`pip install -e ".[sam2]"`; see README for the CPU install).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import Sam2Config, Sam2Model


ORIGINAL_CHECKPOINT_SUFFIXES = (".pt", ".pth")
# Checkpoint file name -> the sam2 package's hydra config that defines it (Meta's released files).
RELEASED_CHECKPOINT_CONFIGS = {
    "sam2_hiera_tiny.pt": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small.pt": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus.pt": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large.pt": "configs/sam2/sam2_hiera_l.yaml",
    "sam2.1_hiera_tiny.pt": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small.pt": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus.pt": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large.pt": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
# Modules of SAM2Base that only video tracking uses; transformers' image-only Sam2Model has no counterpart.
VIDEO_ONLY_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
)
# Plain substring renames, applied in order (original -> transformers).
KEY_RENAMES = (
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.", "vision_encoder.neck."),
    ("sam_prompt_encoder.", "prompt_encoder."),
    ("sam_mask_decoder.", "mask_decoder."),
    ("patch_embed.proj.", "patch_embed.projection."),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("mask_downscaling.0.", "mask_embed.conv1."),
    ("mask_downscaling.1.", "mask_embed.layer_norm1."),
    ("mask_downscaling.3.", "mask_embed.conv2."),
    ("mask_downscaling.4.", "mask_embed.layer_norm2."),
    ("mask_downscaling.6.", "mask_embed.conv3."),
    ("output_upscaling.0.", "upscale_conv1."),
    ("output_upscaling.1.", "upscale_layer_norm."),
    ("output_upscaling.3.", "upscale_conv2."),
    (".out_proj.", ".o_proj."),
    ("no_mem_embed", "no_memory_embedding"),
)
# Norms: `normN` -> `layer_normN`, `norm_final_attn` -> `layer_norm_final_attn`.
NORM_PATTERN = re.compile(r"\.norm(\d|_final_attn)\.")
# Three-layer MLP heads (`layers.0/1/2`) become `proj_in`, `layers.0`, `proj_out` in transformers.
THREE_LAYER_HEADS = re.compile(
    r"(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\.layers\.(\d)\."
)
THREE_LAYER_NAMES = {"0": "proj_in", "1": "layers.0", "2": "proj_out"}
# Two-layer MLPs (Hiera blocks, two-way transformer) become `proj_in`, `proj_out`.
TWO_LAYER_MLP = re.compile(r"\.mlp\.layers\.(\d)\.")
TWO_LAYER_NAMES = {"0": "proj_in", "1": "proj_out"}
NECK_CONV = re.compile(r"(neck\.convs\.\d+)\.conv\.")
POINT_EMBEDDING = re.compile(r"prompt_encoder\.point_embeddings\.(\d+)\.weight")


def is_original_sam2_checkpoint(path: str | Path) -> bool:
    """Whether `path` names an original SAM2 checkpoint file (`.pt` / `.pth`) rather than a transformers folder."""
    return str(path).endswith(ORIGINAL_CHECKPOINT_SUFFIXES)


def default_sam2_config_name(checkpoint: str | Path) -> str:
    """The sam2 hydra config of one of Meta's released checkpoint files, or a `ValueError` asking for one."""
    name = Path(checkpoint).name
    if name not in RELEASED_CHECKPOINT_CONFIGS:
        raise ValueError(
            f"Cannot tell which sam2 config defines {checkpoint}: pass its hydra config name (e.g. "
            f"'configs/sam2.1/sam2.1_hiera_l.yaml', option --sam2-config). Known file names: "
            f"{sorted(RELEASED_CHECKPOINT_CONFIGS)}."
        )
    return RELEASED_CHECKPOINT_CONFIGS[name]


def build_original_sam2(config_name: str, overrides: Sequence[str] = ()) -> torch.nn.Module:
    """Instantiate the `sam2` package's `SAM2Base` from its hydra config (random weights)."""
    try:
        import sam2  # noqa: F401  (importing it registers its hydra config module)
        from hydra import compose
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
    except ImportError as error:
        raise ValueError(
            "Converting an original SAM2 .pt checkpoint needs the sam2 package: "
            "SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps sam2 && pip install hydra-core iopath"
        ) from error
    try:
        config = compose(config_name=config_name, overrides=list(overrides))
    except Exception as error:  # hydra raises its own exception types for unknown names and bad overrides
        raise ValueError(
            f"sam2 could not compose the config {config_name!r} with overrides {list(overrides)}: {error}"
        )
    OmegaConf.resolve(config)
    return instantiate(config.model, _recursive_=True).eval()


def load_original_sam2(
    checkpoint: str | Path, config_name: str | None = None, overrides: Sequence[str] = ()
) -> torch.nn.Module:
    """`SAM2Base` built by the sam2 package with the weights of `checkpoint` (strict: every weight must fit)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ValueError(f"SAM2 checkpoint {checkpoint} does not exist.")
    config_name = config_name or default_sam2_config_name(checkpoint)
    model = build_original_sam2(config_name, overrides)
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        found = f"keys {sorted(content)[:5]}" if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"{checkpoint} is not an original SAM2 checkpoint: expected a dict with a 'model' state dict (as Meta's "
            f"sam2*.pt files have), got {found}."
        )
    missing, unexpected = model.load_state_dict(content["model"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not match the sam2 config {config_name!r}: {len(missing)} missing weights (first: "
            f"{missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]}). Pass the config (and overrides) "
            "the checkpoint was trained with."
        )
    return model


def sam2_config_from_original(model: torch.nn.Module) -> Sam2Config:
    """The transformers `Sam2Config` equivalent to a built `SAM2Base`, read off its modules."""
    _check_supported(model)
    trunk, neck = model.image_encoder.trunk, model.image_encoder.neck
    patch = trunk.patch_embed.proj
    stage_ends = list(trunk.stage_ends)
    stage_starts = [0] + [end + 1 for end in stage_ends[:-1]]
    hidden_size = patch.out_channels
    image_size = int(model.image_size)
    first_stride = patch.stride[0]
    decoder = model.sam_mask_decoder
    two_way = decoder.transformer
    backbone_config = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": hidden_size,
        "num_attention_heads": trunk.blocks[0].attn.num_heads,
        "image_size": [image_size, image_size],
        "patch_kernel_size": list(patch.kernel_size),
        "patch_stride": list(patch.stride),
        "patch_padding": list(patch.padding),
        "query_stride": list(trunk.q_stride),
        "num_query_pool_stages": len(trunk.q_pool_blocks),
        "window_positional_embedding_background_size": list(trunk.window_pos_embed_bkg_spatial_size),
        "blocks_per_stage": [end - start + 1 for start, end in zip(stage_starts, stage_ends)],
        "embed_dim_per_stage": [trunk.blocks[end].dim_out for end in stage_ends],
        "num_attention_heads_per_stage": [trunk.blocks[end].attn.num_heads for end in stage_ends],
        "window_size_per_stage": list(trunk.window_spec),
        "global_attention_blocks": list(trunk.global_att_blocks),
        "mlp_ratio": trunk.blocks[0].mlp.layers[0].out_features / hidden_size,
    }
    vision_config = {
        "backbone_config": backbone_config,
        "backbone_channel_list": list(neck.backbone_channel_list),
        "backbone_feature_sizes": [[image_size // (first_stride * 2**level)] * 2 for level in range(3)],
        "fpn_hidden_size": neck.d_model,
        "fpn_kernel_size": neck.convs[0].conv.kernel_size[0],
        "fpn_stride": neck.convs[0].conv.stride[0],
        "fpn_padding": neck.convs[0].conv.padding[0],
        "fpn_top_down_levels": list(neck.fpn_top_down_levels),
        "num_feature_levels": model.num_feature_levels,
    }
    prompt_encoder_config = {
        "hidden_size": model.sam_prompt_embed_dim,
        "image_size": image_size,
        "patch_size": model.backbone_stride,
        "mask_input_channels": model.sam_prompt_encoder.mask_downscaling[-1].in_channels,
        "num_point_embeddings": len(model.sam_prompt_encoder.point_embeddings),
    }
    mask_decoder_config = {
        "hidden_size": decoder.transformer_dim,
        "mlp_dim": two_way.layers[0].mlp.layers[0].out_features,
        "num_hidden_layers": len(two_way.layers),
        "num_attention_heads": two_way.layers[0].self_attn.num_heads,
        "attention_downsample_rate": two_way.layers[0].cross_attn_token_to_image.embedding_dim
        // two_way.layers[0].cross_attn_token_to_image.internal_dim,
        "num_multimask_outputs": decoder.num_multimask_outputs,
        "iou_head_depth": decoder.iou_prediction_head.num_layers,
        "iou_head_hidden_dim": decoder.iou_prediction_head.layers[0].out_features,
    }
    # The dynamic-multimask fallback keeps transformers' defaults (on, 0.05, 0.98): the values sam2's own
    # `build_sam2` switches on for inference and that Meta's transformers checkpoints carry. It only acts on
    # single-mask decoding; Perceptio decodes multimask.
    return Sam2Config(
        vision_config=vision_config,
        prompt_encoder_config=prompt_encoder_config,
        mask_decoder_config=mask_decoder_config,
    )


def _check_supported(model: torch.nn.Module) -> None:
    # transformers' Sam2Model implements one variant of each of these; others would convert to wrong masks.
    neck = model.image_encoder.neck
    unsupported = {
        "image_encoder.scalp (must be 1)": model.image_encoder.scalp != 1,
        "neck.fpn_interp_model (must be 'nearest')": neck.fpn_interp_model != "nearest",
        "neck.fuse_type (must be 'sum')": neck.fuse_type != "sum",
        "use_high_res_features_in_sam (must be true)": not model.use_high_res_features_in_sam,
        "pred_obj_scores_mlp (must be true)": not model.pred_obj_scores_mlp,
        "iou_prediction_use_sigmoid (must be true)": not model.iou_prediction_use_sigmoid,
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"This SAM2 variant cannot be converted to transformers' Sam2Model: {bad}.")


def rename_original_key(key: str) -> str | None:
    """The transformers name of one original SAM2 weight, or `None` for a video-only weight that is dropped."""
    if key.startswith(VIDEO_ONLY_PREFIXES):
        return None
    for old, new in KEY_RENAMES:
        key = key.replace(old, new)
    key = NORM_PATTERN.sub(lambda match: f".layer_norm{match.group(1)}.", key)
    key = THREE_LAYER_HEADS.sub(lambda match: f"{match.group(1)}.{THREE_LAYER_NAMES[match.group(2)]}.", key)
    key = TWO_LAYER_MLP.sub(lambda match: f".mlp.{TWO_LAYER_NAMES[match.group(1)]}.", key)
    return NECK_CONV.sub(r"\1.", key)


def original_state_dict_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original SAM2 state dict to transformers' `Sam2Model` layout (video-only weights dropped)."""
    converted: dict[str, torch.Tensor] = {}
    point_embeddings: dict[int, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = rename_original_key(key)
        if new_key is None:
            continue
        point = POINT_EMBEDDING.fullmatch(new_key)
        if point:
            point_embeddings[int(point.group(1))] = value
            continue
        converted[new_key] = value
    if point_embeddings:
        # transformers keeps the point-type embeddings in one table, row i = original `point_embeddings.i`.
        converted["prompt_encoder.point_embed.weight"] = torch.cat(
            [point_embeddings[index] for index in sorted(point_embeddings)], dim=0
        )
    shared = "prompt_encoder.shared_embedding.positional_embedding"
    if shared in converted:
        # The image-wide positional encoding and the prompt encoder share one random Fourier matrix in SAM2.
        converted["shared_image_embedding.positional_embedding"] = converted[shared]
    return converted


def convert_original_sam2(
    checkpoint: str | Path,
    config_name: str | None = None,
    overrides: Sequence[str] = (),
    dtype: torch.dtype = torch.float32,
) -> Sam2Model:
    """A transformers `Sam2Model` with the weights of an original SAM2 checkpoint.

    `config_name` is the sam2 package's hydra config (inferred for Meta's released file names); `overrides` are
    hydra overrides (e.g. for a checkpoint trained with a modified config). Raises a `ValueError` naming the file
    when weights are missing or left over.
    """
    original = load_original_sam2(checkpoint, config_name, overrides)
    config = sam2_config_from_original(original)
    state_dict = original_state_dict_to_transformers(original.state_dict())
    model = Sam2Model(config).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"Converting {checkpoint}: transformers' Sam2Model lacks {len(unexpected)} converted weights (first: "
            f"{unexpected[:3]}) and {len(missing)} of its weights have no source (first: {missing[:3]})."
        )
    return model.to(dtype)


__all__ = [
    "convert_original_sam2",
    "default_sam2_config_name",
    "is_original_sam2_checkpoint",
    "load_original_sam2",
    "original_state_dict_to_transformers",
    "sam2_config_from_original",
]
