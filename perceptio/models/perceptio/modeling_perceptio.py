"""PerceptioForConditionalGeneration: InternVL that prompts SAM2 with its `[SEG]` states and reads depth tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration, Sam2Model
from transformers.models.internvl.modeling_internvl import (
    InternVLCausalLMOutputWithPast,
    InternVLModel,
    InternVLPreTrainedModel,
)
from transformers.utils import ModelOutput

from .configuration_perceptio import LM_LOSS_REDUCTIONS, PerceptioConfig
from .generation_perceptio import PerceptioGenerationMixin
from .loss_perceptio import (
    LOSS_TERMS,
    UNLABELLED_SEG_ATTRIBUTE,
    PerSampleLosses,
    depth_code_logits,
    depth_code_targets,
    depth_count_loss,
    depth_marker_loss,
    depth_token_loss,
    gather_block_steps,
    loss_term_names,
    mask_iou_prediction_loss,
    next_token_losses,
    per_sample_losses,
    resize_masks_to_logits,
    seg_attribute_loss,
    seg_prompt_loss,
    segment_mean,
    segmentation_loss,
    weighted_loss_sum,
)
from .modeling_perceptio_depth_tokenizer import PerceptioDepthTokenizer
from .spatial_vocabulary_perceptio import DepthBlocks
from .vision_stem_perceptio import PerceptioConvolutionalPatchEmbeddings


# Inputs that only the training forward and the post-generation mask stage use; generation steps never need them.
POST_GENERATION_INPUTS = ("sam_pixel_values", "gt_masks", "depth_maps")


@dataclass
class PerceptioCausalLMOutputWithPast(InternVLCausalLMOutputWithPast):
    r"""
    loss_dict (`dict[str, torch.FloatTensor]`, *optional*): with labels, every term of the composite loss, keyed
        by its `LOSS_TERMS` name (with `gt_masks` alone, the mask terms); each is also an attribute
        (`output.loss_mask`, `None` when not computed):
        - `loss_lm`: next-token cross-entropy on the assistant tokens.
        - `loss_mask`: BCE + Dice of the `[SEG]` masks, each on its best candidate as in SAM's training (0 when the
          batch has none).
        - `loss_mask_iou`: MSE of SAM2's predicted IoU of each multimask candidate against its actual IoU — trains
          the head that picks the best candidate at inference.
        - `loss_marker`, `loss_token`, `loss_count`, `loss_depth_recon`: the depth-token terms.
    lm_loss_per_sample (`torch.FloatTensor` of shape `(batch,)`, *optional*): with labels and
        `return_lm_loss_per_sample=True`, each sample's mean next-token cross-entropy over its own supervised tokens
        (0 when it has none), detached; the trainer's per-task `loss_lm/<task>` logs read it.
    lm_tokens_per_sample (`torch.LongTensor` of shape `(batch,)`, *optional*): alongside, each sample's number of
        supervised tokens.
    answer_loss_per_sample (`torch.FloatTensor` of shape `(batch,)`, *optional*): alongside, the same mean over the
        supervised tokens outside the sample's depth block (its `[SEG]`s and text answer), which its depth block's
        codes would otherwise outweigh; the trainer's `loss_answer/<task>` logs read it.
    answer_tokens_per_sample (`torch.LongTensor` of shape `(batch,)`, *optional*): alongside, their number.
    pred_masks (`list[torch.FloatTensor]`, *optional*): per sample, the low-res mask logits (num_seg, h, w) of its
        `[SEG]` tokens: the best-IoU mask of SAM2's multimask output, or its single mask when
        `config.sam2_multimask_output` is False.
    pred_mask_scores (`list[torch.FloatTensor]`, *optional*): per sample, SAM2's predicted IoU of each mask.
    """

    loss_dict: dict[str, torch.FloatTensor] | None = None
    lm_loss_per_sample: torch.FloatTensor | None = None
    lm_tokens_per_sample: torch.LongTensor | None = None
    answer_loss_per_sample: torch.FloatTensor | None = None
    answer_tokens_per_sample: torch.LongTensor | None = None
    pred_masks: list[torch.FloatTensor] | None = None
    pred_mask_scores: list[torch.FloatTensor] | None = None

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: a loss term's name reads its entry of `loss_dict`, so a term added
        # to `LOSS_TERMS` needs no field here.
        if name in LOSS_TERMS:
            return (self.__dict__.get("loss_dict") or {}).get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


@dataclass
class PerceptioMaskOutput(ModelOutput):
    """Masks of one batch, per sample: the best-IoU low-res logits (num_seg, h, w) and their predicted IoU
    (num_seg,), and every multimask candidate (num_seg, M, h, w) with its predicted IoU (num_seg, M)."""

    mask_logits: list[torch.FloatTensor] | None = None
    mask_scores: list[torch.FloatTensor] | None = None
    candidate_logits: list[torch.FloatTensor] | None = None
    candidate_scores: list[torch.FloatTensor] | None = None


def distinct_images(images: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The distinct rows of `images` (B, ...) in first-seen order, and for each row the index of its distinct row."""
    firsts: list[int] = []
    image_of_row: list[int] = []
    for row in range(images.shape[0]):
        match = next((slot for slot, first in enumerate(firsts) if torch.equal(images[row], images[first])), None)
        if match is None:
            firsts.append(row)
            match = len(firsts) - 1
        image_of_row.append(match)
    if len(firsts) == images.shape[0]:
        return images, image_of_row
    return images[firsts], image_of_row


def check_sam_pixel_values(sam_pixel_values: torch.Tensor) -> None:
    """Raise a `ValueError` unless `sam_pixel_values` is a (batch, 3, size, size) batch of SAM2 views."""
    if sam_pixel_values.ndim != 4 or sam_pixel_values.shape[1] != 3:
        raise ValueError(
            f"sam_pixel_values must have shape (batch, 3, size, size), got {tuple(sam_pixel_values.shape)}."
        )


class PerceptioForConditionalGeneration(PerceptioGenerationMixin, InternVLForConditionalGeneration):
    r"""
    InternVL with three additions: `grounding_encoder` (transformers' `Sam2Model`), `text_hidden_fcs` (maps the
    LLM's last hidden state at each `[SEG]` to a SAM2 prompt embedding) and `depth_tokenizer` (the VQ-VAE whose codes
    are the depth tokens; frozen; `None` on a segmentation-only checkpoint).
    """

    config_class = PerceptioConfig
    # The composite loss is already a per-token mean; Trainer must not rescale it by the number of items.
    accepts_loss_kwargs = False
    # The depth tokenizer stays in float32 when the model is loaded in bf16 or fp16: `from_pretrained` reads the
    # tensors these patterns match straight into float32, whatever their stored dtype. It is a few MB and decodes once
    # per answer, and in bf16 its decoded depth moves by up to 0.6% of the depth range (half from rounding its
    # weights, half from computing in bf16; measured on the embedded checkpoint). Its `encode`, `decode` and
    # `decode_soft` cast their inputs to its own dtype, so they take the bf16 model's logits and return float32 depth.
    # `perceptio build` stores it in float32 whatever the build dtype, so the checkpoint holds its trained values.
    # The patterns name its floating-point parts rather than "depth_tokenizer": transformers casts every tensor a
    # pattern matches, and the quantizer's integer counters (`steps_since_used`, `initialized`) must stay int64.
    # (A later `model.to(dtype)` casts it like any other module.)
    _keep_in_fp32_modules_strict = [
        "depth_tokenizer.encoder.",
        "depth_tokenizer.decoder.",
        "depth_tokenizer.quantizer.codebook",
        "depth_tokenizer.quantizer.cluster_size",
        "depth_tokenizer.quantizer.embedding_sum",
    ]

    def __init__(self, config: PerceptioConfig):
        InternVLPreTrainedModel.__init__(self, config)
        self.model = InternVLModel(config)
        if config.vision_stem_channels:
            vision_config = config.vision_config
            self.model.vision_tower.embeddings.patch_embeddings = PerceptioConvolutionalPatchEmbeddings(
                vision_config.num_channels,
                vision_config.hidden_size,
                list(config.vision_stem_channels),
                tuple(vision_config.image_size),
            )
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.grounding_encoder = Sam2Model(config.sam2_config)
        hidden_size = config.text_config.hidden_size
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, config.sam2_config.mask_decoder_config.hidden_size),
        )
        self.seg_attribute_heads = (
            nn.ModuleList(nn.Linear(hidden_size, classes) for classes in config.seg_attribute_classes)
            if config.seg_attribute_classes
            else None
        )
        self.depth_tokenizer = (
            PerceptioDepthTokenizer(config.depth_tokenizer_config) if config.has_depth_tokenizer else None
        )
        if self.depth_tokenizer is not None:
            self.depth_tokenizer.requires_grad_(False)
        self.post_init()
        self.share_sam2_positional_encoding()
        patch_embeddings = self.model.vision_tower.embeddings.patch_embeddings
        if isinstance(patch_embeddings, PerceptioConvolutionalPatchEmbeddings):
            # The vision tower initialises its own modules (std 0.02), after which a GELU stack of convolutions would
            # start with features a few percent of the input's scale.
            patch_embeddings.reset_parameters()

    def _init_weights(self, module: nn.Module) -> None:
        # The [SEG] projection keeps PyTorch's default initialisation, as Sa2VA's does: with the text model's std of
        # 0.02 its prompts start some 20 times smaller than SAM2's own prompt embeddings, and the mask decoder learns
        # to ignore them before they can grow.
        if isinstance(module, nn.Linear) and any(module is layer for layer in self.text_hidden_fcs):
            module.reset_parameters()
            return
        super()._init_weights(module)

    def share_sam2_positional_encoding(self) -> None:
        """Give SAM2's prompt encoder the image's random Fourier basis.

        Released SAM2 checkpoints hold one Gaussian matrix for both, and a point prompt is located by comparing its
        encoding with the image's. `Sam2Model` draws the two independently, so a from-scratch SAM2 could never learn
        where a point is; loading a checkpoint overwrites both with its (equal) values.
        """
        sam = self.grounding_encoder
        with torch.no_grad():
            sam.prompt_encoder.shared_embedding.positional_embedding.copy_(
                sam.shared_image_embedding.positional_embedding
            )

    def require_depth_tokenizer(self) -> PerceptioDepthTokenizer:
        """The depth tokenizer, or a `ValueError` on a checkpoint that has none."""
        if self.depth_tokenizer is None:
            raise ValueError(
                "This checkpoint has no depth tokenizer (config.depth_tokenizer_config is None): it is "
                "segmentation-only and cannot read or write depth blocks."
            )
        return self.depth_tokenizer

    def initialize_new_token_embeddings(self, token_ids: list[int]) -> None:
        """Set the embedding (and untied LM-head) rows of newly added tokens to the mean of the other rows."""
        embeddings = self.get_input_embeddings().weight
        if not token_ids:
            raise ValueError("token_ids is empty; pass the ids of the tokens that were added.")
        if min(token_ids) < 0 or max(token_ids) >= embeddings.shape[0]:
            raise ValueError(
                f"token ids must lie in [0, {embeddings.shape[0]}), got {min(token_ids)}..{max(token_ids)}."
            )
        matrices = [embeddings]
        output_embeddings = self.get_output_embeddings().weight
        if output_embeddings.data_ptr() != embeddings.data_ptr():
            matrices.append(output_embeddings)
        new_rows = torch.zeros(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
        new_rows[torch.tensor(token_ids, device=embeddings.device)] = True
        with torch.no_grad():
            for matrix in matrices:
                matrix[new_rows] = matrix[~new_rows].mean(0, keepdim=True).to(matrix.dtype)

    def prepare_inputs_for_generation(self, *args, inputs_embeds: torch.Tensor | None = None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, inputs_embeds=inputs_embeds, **kwargs)
        for name in POST_GENERATION_INPUTS:
            model_inputs.pop(name, None)
        return model_inputs

    def sam_image_embeddings(self, sam_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """SAM2 feature pyramid (B, C, h, w) per level, with gradients (unlike `Sam2Model.get_image_embeddings`).

        The mask decoder's `conv_s0`/`conv_s1` run inside the image-feature step, so a no-grad call would freeze them.
        """
        check_sam_pixel_values(sam_pixel_values)
        sam = self.grounding_encoder
        features = sam.get_image_features(sam_pixel_values.to(self.dtype)).fpn_hidden_states
        features[-1] = features[-1] + sam.no_memory_embedding
        batch_size = sam_pixel_values.shape[0]
        return [
            feature.permute(1, 2, 0).reshape(batch_size, -1, *size)
            for feature, size in zip(features, sam.backbone_feature_sizes)
        ]

    def decode_masks(
        self, image_embeddings: list[torch.Tensor], prompt_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All `[SEG]` prompts of one image through the SAM2 mask decoder in one call.

        `image_embeddings` is one image's pyramid (each level (1, C, h, w)); `prompt_embeddings` is (n, C). Returns
        SAM2's output: candidate logits (n, M, h', w') and their predicted IoU (n, M).
        """
        sparse, dense = self.seg_prompt_embeddings(prompt_embeddings[None])
        mask_logits, iou_scores = self.run_mask_decoder(image_embeddings, sparse, dense)
        return mask_logits[0], iou_scores[0]

    def seg_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM2 prompt inputs for (B, P, C) `[SEG]`-style embeddings: each is appended to the sparse embedding of an
        empty point (label −1), as Sa2VA prompts SAM2. Returns sparse (B, P, 2, C) and dense embeddings."""
        batch_size, num_prompts = prompt_embeddings.shape[:2]
        points = torch.zeros(
            batch_size, num_prompts, 1, 2, dtype=prompt_embeddings.dtype, device=prompt_embeddings.device
        )
        labels = -torch.ones(batch_size, num_prompts, 1, dtype=torch.int32, device=prompt_embeddings.device)
        sparse, dense = self.grounding_encoder.prompt_encoder(points, labels, None, None)
        return torch.cat([sparse, prompt_embeddings.to(sparse.dtype)[:, :, None]], dim=2), dense

    def run_mask_decoder(
        self, image_embeddings: list[torch.Tensor], sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM2's mask decoder on a batch of image pyramids (each level (B, C, h, w)) and their prompt embeddings
        (sparse (B, P, n, C)): candidate logits (B, P, M, h', w') and predicted IoU (B, P, M), with M = 3 or 1 as
        `config.sam2_multimask_output` says."""
        sam = self.grounding_encoder
        batch_size = image_embeddings[-1].shape[0]
        mask_logits, iou_scores, _, _ = sam.mask_decoder(
            image_embeddings=image_embeddings[-1],
            image_positional_embeddings=sam.get_image_wide_positional_embeddings().repeat(batch_size, 1, 1, 1),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.config.sam2_multimask_output,
            high_resolution_features=image_embeddings[:-1],
        )
        return mask_logits, iou_scores

    def predict_masks(
        self, seg_hidden_states: list[torch.Tensor], sam_pixel_values: torch.Tensor
    ) -> PerceptioMaskOutput:
        """Masks for each sample's `[SEG]` hidden states (num_seg, d).

        The SAM2 image encoder runs only for samples with a `[SEG]` (a batch of answers and depth blocks costs none of
        it), once per distinct image (samples asking about the same image share it), and all of a sample's `[SEG]`s go
        through the mask decoder in one call; of each multimask output the candidate with the best predicted IoU is
        kept.
        """
        check_sam_pixel_values(sam_pixel_values)
        if len(seg_hidden_states) != sam_pixel_values.shape[0]:
            raise ValueError(
                f"Got [SEG] states for {len(seg_hidden_states)} samples but {sam_pixel_values.shape[0]} SAM2 images."
            )
        prompted = [index for index, hidden in enumerate(seg_hidden_states) if hidden.shape[0]]
        image_embeddings: list[torch.Tensor] = []
        image_of_sample: dict[int, int] = {}
        if prompted:
            distinct, image_of_prompted = distinct_images(sam_pixel_values[prompted])
            image_embeddings = self.sam_image_embeddings(distinct)
            image_of_sample = dict(zip(prompted, image_of_prompted))
        low_res = 4 * self.grounding_encoder.backbone_feature_sizes[-1][-1]
        num_candidates = (
            self.grounding_encoder.mask_decoder.num_multimask_outputs if self.config.sam2_multimask_output else 1
        )
        output = PerceptioMaskOutput(mask_logits=[], mask_scores=[], candidate_logits=[], candidate_scores=[])
        for index, hidden in enumerate(seg_hidden_states):
            if hidden.shape[0] == 0:
                candidates = hidden.new_zeros(0, num_candidates, low_res, low_res)
                scores = hidden.new_zeros(0, num_candidates)
            else:
                image = image_of_sample[index]
                sample_embeddings = [level[image : image + 1] for level in image_embeddings]
                candidates, scores = self.decode_masks(sample_embeddings, self.text_hidden_fcs(hidden))
            best = scores.argmax(-1)
            rows = torch.arange(best.shape[0], device=best.device)
            output.mask_logits.append(candidates[rows, best])
            output.mask_scores.append(scores[rows, best])
            output.candidate_logits.append(candidates)
            output.candidate_scores.append(scores)
        return output

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        sam_pixel_values: torch.FloatTensor | None = None,
        gt_masks: list[torch.Tensor] | None = None,
        depth_maps: list[torch.Tensor | None] | None = None,
        return_lm_loss_per_sample: bool = False,
        seg_attributes: list[torch.Tensor] | None = None,
        seg_prompt_targets: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> PerceptioCausalLMOutputWithPast:
        r"""
        sam_pixel_values (`torch.FloatTensor` of shape `(batch, 3, S, S)`, *optional*): the SAM2 view of the image
            each sample's `[SEG]` tokens segment (`PerceptioProcessor` makes it).
        gt_masks (`list[torch.Tensor]`, *optional*): per sample, its ground-truth masks (num_seg, H, W), one per
            `[SEG]` in order; any size (they are resized to the mask logits).
        depth_maps (`list[torch.Tensor | None]`, *optional*): per sample, the teacher's relative inverse depth (H, W)
            (larger = nearer) that its depth block encodes, the target of the soft-merged reconstruction; `None` for a
            sample uses its ground-truth codes decoded by the depth tokenizer instead.
        labels (`torch.LongTensor`, *optional*): next-token targets, -100 outside the assistant answer.
        return_lm_loss_per_sample (`bool`, defaults to False): with labels, also return `lm_loss_per_sample`,
            `lm_tokens_per_sample`, `answer_loss_per_sample` and `answer_tokens_per_sample` (free with
            `lm_loss_reduction="segment"`, which already has each token's cross-entropy; one more cross-entropy pass
            with "token").
        seg_attributes (`list[torch.LongTensor]`, *optional*): per sample, (num_seg, A) class ids of what each
            `[SEG]`'s phrase names, one column per `config.seg_attribute_classes` entry, -100 where unlabelled; the
            targets of `loss_seg_attribute` (needs `seg_attribute_heads`).
        seg_prompt_targets (`list[torch.FloatTensor]`, *optional*): per sample, (num_seg, C) target SAM2 prompts
            (C = the mask decoder's width) for what `text_hidden_fcs` makes of each `[SEG]` state, a row of NaN where
            a `[SEG]` has none; the targets of `loss_seg_prompt`.

        Generation kwargs (the cache and friends) pass through to InternVL untouched.
        """
        self._check_image_tokens(input_ids, pixel_values)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states if logits_to_keep == 0 else self._keep(hidden_states, logits_to_keep))

        masks, mask_losses = self._mask_stage(
            input_ids, hidden_states, sam_pixel_values, gt_masks, labels, seg_attributes, seg_prompt_targets
        )
        loss = per_sample = None
        # gt_masks without labels still give the mask terms (a mask-only objective, bench/training_step.py).
        loss_dict = mask_losses if gt_masks is not None else None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("Training needs logits at every position: call with labels and logits_to_keep=0.")
            loss_lm, per_sample = self.language_model_loss(logits, labels, return_lm_loss_per_sample)
            loss_dict = {
                "loss_lm": loss_lm,
                **mask_losses,
                **self.depth_token_losses(hidden_states, labels, depth_maps),
            }
            loss = weighted_loss_sum(loss_dict, self.config)
        return PerceptioCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            loss_dict=loss_dict,
            lm_loss_per_sample=None if per_sample is None else per_sample.lm,
            lm_tokens_per_sample=None if per_sample is None else per_sample.lm_tokens,
            answer_loss_per_sample=None if per_sample is None else per_sample.answer,
            answer_tokens_per_sample=None if per_sample is None else per_sample.answer_tokens,
            pred_masks=masks.mask_logits if masks is not None else None,
            pred_mask_scores=masks.mask_scores if masks is not None else None,
        )

    def language_model_loss(
        self, logits: torch.Tensor, labels: torch.LongTensor, return_per_sample: bool = False
    ) -> tuple[torch.Tensor, PerSampleLosses | None]:
        """`loss_lm`, averaged as `config.lm_loss_reduction` says, and when asked each sample's (detached) mean
        next-token cross-entropy over all its supervised tokens and over its answer outside the depth block
        (`PerSampleLosses`)."""
        reduction = self.config.lm_loss_reduction
        vocabulary = self.config.spatial_vocabulary
        if reduction == "segment":
            token_losses, supervised = next_token_losses(logits, labels)
            loss = segment_mean(token_losses, supervised, labels, vocabulary)
            return loss, per_sample_losses(token_losses, supervised, labels, vocabulary) if return_per_sample else None
        if reduction == "token":
            # transformers' own loss keeps "token" identical to InternVL's; the per-sample means need their own pass.
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
            if not return_per_sample:
                return loss, None
            return loss, per_sample_losses(*next_token_losses(logits.detach(), labels), labels, vocabulary)
        raise ValueError(f"config.lm_loss_reduction must be one of {LM_LOSS_REDUCTIONS}, got {reduction!r}.")

    def depth_token_losses(
        self,
        hidden_states: torch.Tensor,
        labels: torch.LongTensor,
        depth_maps: list[torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`loss_marker`, `loss_token`, `loss_count` and `loss_depth_recon` (docs/training.md; 0 without depth blocks).

        Only the N + 2 steps of each depth block go through the LM head again (from the last hidden states): the
        terms never index the full (batch, length, vocabulary) logits, whose backward would scatter into a copy of
        their whole size.
        """
        vocabulary = self.config.spatial_vocabulary
        blocks = vocabulary.find_depth_blocks(labels) if vocabulary is not None else None
        if blocks is None or not len(blocks):
            return {name: hidden_states.new_zeros((), dtype=torch.float32) for name in loss_term_names("depth")}
        step_logits = self.lm_head(gather_block_steps(hidden_states, blocks, vocabulary.num_depth_tokens))
        return self.depth_losses_of_step_logits(step_logits, blocks, labels, depth_maps)

    def depth_losses_of_step_logits(
        self,
        step_logits: torch.Tensor,
        blocks: DepthBlocks,
        labels: torch.LongTensor,
        depth_maps: list[torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The four depth terms from the logits (num_blocks, N + 2, V) at the block steps of `blocks`."""
        vocabulary = self.config.spatial_vocabulary
        code_logits = depth_code_logits(step_logits, vocabulary)
        code_targets = depth_code_targets(labels, blocks, vocabulary)
        return {
            "loss_marker": depth_marker_loss(step_logits, vocabulary),
            "loss_token": depth_token_loss(code_logits, code_targets),
            "loss_count": depth_count_loss(step_logits, vocabulary),
            "loss_depth_recon": self._depth_reconstruction_loss(code_logits, code_targets, blocks, depth_maps),
        }

    def _depth_reconstruction_loss(
        self,
        code_logits: torch.Tensor,
        code_targets: torch.LongTensor,
        blocks: DepthBlocks,
        depth_maps: list[torch.Tensor | None] | None,
    ) -> torch.Tensor:
        # Soft merging: the frozen decoder turns softmax-mixed codebook entries into depth, so gradients reach the LLM.
        tokenizer = self.require_depth_tokenizer()
        if depth_maps is not None and len(depth_maps) <= int(blocks.samples.max()):
            raise ValueError(f"depth_maps has {len(depth_maps)} entries, fewer than the batch's samples.")
        predicted = tokenizer.decode_soft(code_logits, tau=float(self.config.depth_soft_merge_temperature))
        with torch.no_grad():
            targets = []
            for block, sample in enumerate(blocks.samples.tolist()):
                depth = depth_maps[sample] if depth_maps is not None else None
                if depth is None:
                    targets.append(tokenizer.decode(code_targets[block : block + 1])[0])
                else:
                    targets.append(tokenizer.normalize(depth.to(predicted.device, torch.float32)[None])[0][0])
        return (predicted.float() - torch.stack(targets).float()).abs().mean()

    @staticmethod
    def _keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        if isinstance(logits_to_keep, int):
            return hidden_states[:, -logits_to_keep:, :]
        return hidden_states[:, logits_to_keep, :]

    def _check_image_tokens(self, input_ids: torch.LongTensor | None, pixel_values: torch.Tensor | None) -> None:
        if input_ids is None or pixel_values is None:
            return
        per_sample = (input_ids == self.config.image_token_id).sum(-1).tolist()
        expected = pixel_values.shape[0] * self.config.image_seq_length
        if sum(per_sample) != expected or any(count % self.config.image_seq_length for count in per_sample):
            bad = [index for index, count in enumerate(per_sample) if count % self.config.image_seq_length] or list(
                range(len(per_sample))
            )
            raise ValueError(
                f"Image tokens do not match the images: samples {bad} have {[per_sample[i] for i in bad]} image-context "
                f"tokens, but {pixel_values.shape[0]} tiles × image_seq_length {self.config.image_seq_length} = "
                f"{expected} are needed in total. Build inputs with PerceptioProcessor so each <image> is expanded."
            )

    def _mask_stage(
        self,
        input_ids: torch.LongTensor | None,
        hidden_states: torch.Tensor,
        sam_pixel_values: torch.Tensor | None,
        gt_masks: list[torch.Tensor] | None,
        labels: torch.LongTensor | None,
        seg_attributes: list[torch.Tensor] | None = None,
        seg_prompt_targets: list[torch.Tensor] | None = None,
    ) -> tuple[PerceptioMaskOutput | None, dict[str, torch.Tensor | None]]:
        """Masks from the `[SEG]` states of a teacher-forced sequence, and in training `loss_mask` / `loss_mask_iou`,
        `loss_seg_attribute` and `loss_seg_prompt` (zeros when nothing is supervised; `None` outside training)."""
        if seg_attributes is not None and self.seg_attribute_heads is None:
            raise ValueError(
                "seg_attributes were given but the model has no seg_attribute_heads; set "
                "config.seg_attribute_classes when building the model to train them."
            )
        training = labels is not None or gt_masks is not None
        no_losses = dict.fromkeys(loss_term_names("mask"), hidden_states.new_zeros(()) if training else None)
        if not training and sam_pixel_values is None:
            return None, no_losses
        if input_ids is None or self.config.seg_token_id is None:
            return None, no_losses
        seg_positions = input_ids == self.config.seg_token_id
        seg_counts = seg_positions.sum(-1).tolist()
        self._check_masks_match_seg_tokens(seg_counts, gt_masks, sam_pixel_values, training)
        if sam_pixel_values is None:
            return None, no_losses
        if sam_pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"sam_pixel_values has {sam_pixel_values.shape[0]} images for a batch of {input_ids.shape[0]} samples; "
                "give one SAM2 image per sample."
            )
        seg_hidden = [hidden_states[index][seg_positions[index]] for index in range(input_ids.shape[0])]
        if training and sum(seg_counts) == 0:
            return None, {**no_losses, "loss_mask": self._zero_weight_mask_loss(hidden_states, sam_pixel_values)}
        masks = self.predict_masks(seg_hidden, sam_pixel_values)
        if not training:
            return masks, no_losses
        losses = dict(no_losses)
        if seg_attributes is not None:
            losses["loss_seg_attribute"] = self.seg_attribute_loss(seg_hidden, seg_attributes)
        if seg_prompt_targets is not None:
            losses["loss_seg_prompt"] = self.seg_prompt_loss(seg_hidden, seg_prompt_targets)
        if gt_masks is None:
            return masks, losses
        return masks, {**losses, **self.predicted_mask_losses(masks, gt_masks)}

    def predicted_mask_losses(
        self, masks: PerceptioMaskOutput, gt_masks: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """`loss_mask` and `loss_mask_iou` of a batch's predicted masks (`predict_masks`) against each sample's
        ground-truth masks (num_seg, H, W), one per `[SEG]` in order."""
        candidates = torch.cat(masks.candidate_logits)
        low_res = tuple(candidates.shape[-2:])
        # Samples' masks may come at different image sizes: bring each to the logits' size before stacking.
        targets = torch.cat(
            [
                resize_masks_to_logits(sample_masks.to(candidates.device), low_res)
                for sample_masks in gt_masks
                if len(sample_masks)
            ]
        )
        return self.mask_losses(candidates, torch.cat(masks.candidate_scores), targets)

    def seg_attribute_loss(self, seg_hidden: list[torch.Tensor], seg_attributes: list[torch.Tensor]) -> torch.Tensor:
        """`loss_seg_attribute`: the attribute heads on the `[SEG]` states (per sample (num_seg, hidden)) against
        their labels (per sample (num_seg, A), -100 where unlabelled)."""
        heads = self.seg_attribute_heads
        if len(seg_attributes) != len(seg_hidden):
            raise ValueError(f"seg_attributes has {len(seg_attributes)} entries for a batch of {len(seg_hidden)}.")
        for index, (states, labels) in enumerate(zip(seg_hidden, seg_attributes)):
            if tuple(labels.shape) != (states.shape[0], len(heads)):
                raise ValueError(
                    f"Sample {index} has {states.shape[0]} [SEG] token(s) but seg_attributes of shape "
                    f"{tuple(labels.shape)}; give one row of {len(heads)} class ids per [SEG]."
                )
        states = torch.cat(seg_hidden)
        labels = torch.cat([labels.to(states.device, torch.long) for labels in seg_attributes])
        classes = torch.tensor(self.config.seg_attribute_classes, device=labels.device)
        if bool(((labels < 0) & (labels != UNLABELLED_SEG_ATTRIBUTE) | (labels >= classes)).any()):
            raise ValueError(
                f"seg_attributes must be class ids below {self.config.seg_attribute_classes} per column, or "
                f"{UNLABELLED_SEG_ATTRIBUTE} for none."
            )
        return seg_attribute_loss([head(states) for head in heads], labels)

    def seg_prompt_loss(self, seg_hidden: list[torch.Tensor], seg_prompt_targets: list[torch.Tensor]) -> torch.Tensor:
        """`loss_seg_prompt`: the SAM2 prompts `text_hidden_fcs` makes of the `[SEG]` states (per sample (num_seg,
        hidden)) against their targets (per sample (num_seg, C), NaN rows where there is none)."""
        width = self.config.sam2_config.mask_decoder_config.hidden_size
        if len(seg_prompt_targets) != len(seg_hidden):
            raise ValueError(
                f"seg_prompt_targets has {len(seg_prompt_targets)} entries for a batch of {len(seg_hidden)}."
            )
        for index, (states, targets) in enumerate(zip(seg_hidden, seg_prompt_targets)):
            if tuple(targets.shape) != (states.shape[0], width):
                raise ValueError(
                    f"Sample {index} has {states.shape[0]} [SEG] token(s) but seg_prompt_targets of shape "
                    f"{tuple(targets.shape)}; give one target prompt of {width} values (the mask decoder's width) "
                    "per [SEG]."
                )
        states = torch.cat(seg_hidden)
        targets = torch.cat([targets.to(states.device) for targets in seg_prompt_targets])
        return seg_prompt_loss(self.text_hidden_fcs(states), targets)

    def mask_losses(
        self, candidate_logits: torch.Tensor, predicted_iou: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """`loss_mask` (the config's BCE + Dice on each mask's best candidate) and `loss_mask_iou` (the IoU head's
        regression) of candidates (M, C, h, w) with predicted IoU (M, C) against ground-truth masks (M, H, W) of any
        size."""
        low_res = resize_masks_to_logits(targets, tuple(candidate_logits.shape[-2:])).to(candidate_logits.dtype)
        loss_mask = segmentation_loss(
            candidate_logits,
            low_res,
            self.config.mask_bce_weight,
            self.config.mask_dice_weight,
            self.config.mask_dice_epsilon,
        )
        loss_mask_iou = mask_iou_prediction_loss(candidate_logits, predicted_iou, low_res)
        return {"loss_mask": loss_mask, "loss_mask_iou": loss_mask_iou}

    def _zero_weight_mask_loss(self, hidden_states: torch.Tensor, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        # A batch without [SEG] still runs the mask path (weight 0) so every process in DDP/DeepSpeed builds the same
        # graph and reduces the same gradients.
        dummy_states = [hidden_states[0, :1]] + [
            hidden_states[index, :0] for index in range(1, hidden_states.shape[0])
        ]
        masks = self.predict_masks(dummy_states, sam_pixel_values)
        return (masks.candidate_logits[0].sum() + masks.candidate_scores[0].sum()) * 0.0

    @staticmethod
    def _check_masks_match_seg_tokens(
        seg_counts: list[int],
        gt_masks: list[torch.Tensor] | None,
        sam_pixel_values: torch.Tensor | None,
        training: bool,
    ) -> None:
        if training and sam_pixel_values is None:
            with_seg = [index for index, count in enumerate(seg_counts) if count]
            if with_seg:
                raise ValueError(
                    f"Samples {with_seg} have [SEG] tokens but no sam_pixel_values were given; the mask decoder needs "
                    "the SAM2 view of the image (PerceptioProcessor returns it)."
                )
        if gt_masks is None:
            return
        if len(gt_masks) != len(seg_counts):
            raise ValueError(f"gt_masks has {len(gt_masks)} entries for a batch of {len(seg_counts)} samples.")
        for index, (count, sample_masks) in enumerate(zip(seg_counts, gt_masks)):
            if count != len(sample_masks):
                raise ValueError(
                    f"Sample {index} has {count} [SEG] token(s) but {len(sample_masks)} ground-truth mask(s); "
                    "each [SEG] needs exactly one mask."
                )
            if len(sample_masks) and sample_masks.ndim != 3:
                raise ValueError(
                    f"Sample {index}: gt_masks must be (num_seg, H, W), got shape {tuple(sample_masks.shape)}."
                )


__all__ = ["PerceptioForConditionalGeneration", "PerceptioCausalLMOutputWithPast", "PerceptioMaskOutput"]
