"""Make the Sa2VA parity fixtures of `tests/test_sa2va_conversion.py` with Sa2VA's own Hub code.

For each variant (`qwen2`: a Sa2VA-1B/4B-like model; `internlm2`: a Sa2VA-8B/26B-like one) this builds a tiny random
`Sa2VAChatModel` from Sa2VA's `projects/sa2va/hf/models/` (imported from a checkout of github.com/bytedance/Sa2VA),
saves it as a Hub-layout checkpoint (sharded safetensors, config.json, tokenizer files) and records what Sa2VA's code
computes:

- (a) `qwen2` only: its `sam2.py` prompt path (`SAM2.get_sam2_embeddings` + `language_embd_inference`) for fixed
  `[SEG]`-sized prompt embeddings: every multimask candidate and its predicted IoU (recorded from the mask decoder),
  the best pick, and the final mask logits and masks (`predict_forward`'s resize of the 1024² logits SAM2 returns to
  the image size, and sigmoid > 0.5);
- (b) `predict_forward` on a fixed image and prompt: `input_ids`, `pixel_values`, statistics of the SAM2 input, the
  prompt's logits (Sa2VA's `_llm_forward`), the generated ids, the `[SEG]` hidden states and the masks.

Only what Sa2VA's code needs to run on this machine is changed, at run time: `Tensor.cuda` is the identity and the
SAM2 inference state lives on the CPU (Sa2VA hard-codes CUDA), torchvision and timm come from `standins/`, and the
SAM2 built by `SAM2` is shrunk (a tiny Hiera, neck and memory modules made from Sa2VA's own classes) so the fixtures
stay small; everything of SAM2-L that the weights' shapes cannot tell (heads, windows, global blocks) is kept.

Run it in the venv of `make_env.sh`:

    .venv-sa2va-fixtures/bin/python scripts/sa2va_fixtures/make_fixtures.py --sa2va-repo PATH_TO_CHECKOUT
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "fixtures" / "sa2va"
CORPUS = REPO_ROOT / "perceptio" / "assets" / "tiny_corpus.txt"
PACKAGE = "sa2va_hf"
PROMPT = "<image>Please segment the red square."
IMAGE_SIZE = (96, 96)  # (width, height): square, so Sa2VA's dynamic tiling keeps a single 448² tile
MAX_NEW_TOKENS = 6
NUM_SAM_PROMPTS = 2
# Tokens the InternVL tokenizers carry, and those Sa2VA adds (projects/sa2va: `_add_special_tokens`).
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SA2VA_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
VARIANTS = {
    "qwen2": {
        "template": "qwen_chat",
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "bos": None,
        "vision": {"norm_type": "layer_norm", "qk_normalization": False, "qkv_bias": True},
        "tie_word_embeddings": True,
        "seed": 0,
    },
    "internlm2": {
        "template": "internlm2_chat",
        "specials": ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        "tokens": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"},
        "bos": "<s>",
        # InternViT-6B's layout (Sa2VA-26B): RMSNorm, QK-norm, no qkv bias.
        "vision": {"norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False},
        "tie_word_embeddings": False,
        "seed": 1,
    },
}


def import_sa2va(sa2va_repo: Path) -> dict[str, types.ModuleType]:
    """Sa2VA's Hub modules, imported as the package `sa2va_hf` (their relative imports need a package)."""
    models_dir = sa2va_repo / "projects" / "sa2va" / "hf" / "models"
    if not (models_dir / "modeling_sa2va_chat.py").is_file():
        raise SystemExit(f"{models_dir} has no modeling_sa2va_chat.py: pass a checkout of bytedance/Sa2VA.")
    sys.path.insert(0, str(HERE / "standins"))
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(models_dir)]
    sys.modules[PACKAGE] = package
    names = ("configuration_sa2va_chat", "configuration_intern_vit", "configuration_internlm2", "sam2")
    modules = {name: importlib.import_module(f"{PACKAGE}.{name}") for name in names}
    modules["modeling_sa2va_chat"] = importlib.import_module(f"{PACKAGE}.modeling_sa2va_chat")
    return modules


def run_on_cpu(sam2_module: types.ModuleType) -> None:
    """Let Sa2VA's inference code run without CUDA: `.cuda()` is the identity, the SAM2 state stays on the CPU."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    predictor = sam2_module.SAM2VideoPredictor
    original_init_state = predictor.init_state

    def init_state_on_cpu(self, images):
        state = original_init_state(self, images)
        state["device"] = state["storage_device"] = torch.device("cpu")
        return state

    predictor.init_state = init_state_on_cpu


def shrink_sam2(sam2_module: types.ModuleType) -> None:
    """Make `SAM2()` build a tiny SAM2 from Sa2VA's own classes (Hiera widths/depths and the memory modules shrunk)."""
    m = sam2_module
    d_model, memory_dim = 32, 16

    def build_image_encoder(self):
        trunk = m.Hiera(
            embed_dim=8,
            num_heads=2,  # as SAM2-L (Sa2VA's build_trunk); doubled per stage
            stages=[1, 2, 1, 1],
            global_att_blocks=[23, 33, 43],
            window_pos_embed_bkg_spatial_size=[7, 7],
            window_spec=[8, 4, 16, 8],
        )
        position = m.PositionEmbeddingSine(num_pos_feats=d_model, normalize=True, scale=None, temperature=10000)
        neck = m.FpnNeck(
            d_model=d_model,
            position_encoding=position,
            backbone_channel_list=[64, 32, 16, 8],
            fpn_top_down_levels=[2, 3],
            fpn_interp_model="nearest",
        )
        return m.ImageEncoder(scalp=1, trunk=trunk, neck=neck)

    def build_memory_attention(self):
        def attention(**extra):
            return m.RoPEAttention(
                rope_theta=10000.0,
                feat_sizes=[32, 32],
                embedding_dim=d_model,
                num_heads=1,
                downsample_rate=1,
                dropout=0.1,
                **extra,
            )

        layer = m.MemoryAttentionLayer(
            activation="relu",
            dim_feedforward=64,
            dropout=0.1,
            pos_enc_at_attn=False,
            d_model=d_model,
            pos_enc_at_cross_attn_queries=False,
            pos_enc_at_cross_attn_keys=True,
            self_attention=attention(),
            cross_attention=attention(rope_k_repeat=True, kv_in_dim=memory_dim),
        )
        return m.MemoryAttention(d_model=d_model, pos_enc_at_input=True, num_layers=1, layer=layer)

    def build_memory_encoder(self):
        position = m.PositionEmbeddingSine(num_pos_feats=memory_dim, normalize=True, scale=None, temperature=10000)
        downsampler = m.MaskDownSampler(embed_dim=d_model, kernel_size=3, stride=2, padding=1)
        block = m.CXBlock(dim=d_model, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True)
        fuser = m.Fuser(layer=block, num_layers=1)
        return m.MemoryEncoder(
            out_dim=memory_dim, position_encoding=position, mask_downsampler=downsampler, fuser=fuser, in_dim=d_model
        )

    m.SAM2.build_image_encoder = build_image_encoder
    m.SAM2.build_memory_attention = build_memory_attention
    m.SAM2.build_memory_encoder = build_memory_encoder


def train_tokenizer(variant: dict):
    """A tiny byte-level BPE tokenizer (local corpus) with the variant's specials, InternVL's and Sa2VA's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=variant["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    if variant["bos"] is not None:
        # InternLM2's tokenizer prepends <s> when encoding (add_bos_token=True).
        bos = variant["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **variant["tokens"])
    tokenizer.add_special_tokens({"additional_special_tokens": INTERNVL_TOKENS + SA2VA_TOKENS})
    return tokenizer


def chat_config(modules: dict, name: str, variant: dict, vocab_size: int):
    """A tiny Sa2VAChatConfig: InternViT at Sa2VA's fixed 448²/14 tiles, a 2-layer LLM of the variant."""
    vision = {
        "architectures": ["InternVisionModel"],
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "image_size": 448,
        "patch_size": 14,
        "layer_norm_eps": 1e-6,
        "drop_path_rate": 0.0,
        "use_flash_attn": False,
        **variant["vision"],
    }
    llm = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": variant["tie_word_embeddings"],
        "attn_implementation": "eager",
    }
    if name == "qwen2":
        llm.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6)
    else:
        llm.update(
            architectures=["InternLM2ForCausalLM"],
            model_type="internlm2",
            bias=False,
            hidden_act="silu",
            rms_norm_eps=1e-5,
            rope_scaling=None,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
    return modules["configuration_sa2va_chat"].Sa2VAChatConfig(
        vision_config=vision,
        llm_config=llm,
        template=variant["template"],
        downsample_ratio=0.5,
        force_image_size=448,
        select_layer=-1,
        ps_version="v2",
        dynamic_image_size=True,
        use_thumbnail=True,
        max_dynamic_patch=12,
        architectures=["Sa2VAChatModel"],
        auto_map={
            "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
            "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
            "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
        },
    )


def round_to_bfloat16(model: torch.nn.Module) -> None:
    """Round every weight to bfloat16 (the dtype the checkpoint is saved in), keeping float32 compute exact."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).to(tensor.dtype))


def fixture_image() -> Image.Image:
    """A 96×96 RGB scene: a gradient, a red square and a blue disc."""
    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    image = Image.fromarray(array, mode="RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle([12, 20, 44, 52], fill=(220, 30, 30))
    draw.ellipse([52, 48, 86, 82], fill=(30, 40, 210))
    return image


class MaskDecoderRecorder:
    """Records every call of SAM2's mask decoder (all multimask candidates and their predicted IoU)."""

    def __init__(self, decoder: torch.nn.Module):
        self.candidates: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.handle = decoder.register_forward_hook(self._record)

    def _record(self, module, inputs, output) -> None:
        self.candidates.append(output[0].detach().float().clone())
        self.scores.append(output[1].detach().float().clone())


def sam2_prompt_path(model, image: Image.Image, prompts: torch.Tensor) -> dict[str, np.ndarray]:
    """(a): Sa2VA's SAM2 on the image for each prompt embedding, as `predict_forward` runs it per `[SEG]`."""
    g_image = model.extra_image_processor.apply_image(np.array(image))
    g_pixels = torch.from_numpy(g_image).permute(2, 0, 1).contiguous().to(model.torch_dtype)
    g_pixel_values = torch.stack([model.grounding_encoder.preprocess_image(g_pixels)]).to(model.torch_dtype)
    recorder = MaskDecoderRecorder(model.grounding_encoder.sam2_model.sam_mask_decoder)
    final_logits, final_masks = [], []
    width, height = image.size
    with torch.no_grad():
        for prompt in prompts:
            state = model.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            pred = model.grounding_encoder.language_embd_inference(state, [prompt[None]])
            logits = F.interpolate(pred, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            final_logits.append(logits[0])
            final_masks.append((logits.sigmoid() > 0.5)[0])
    recorder.handle.remove()
    candidates = torch.cat(recorder.candidates)
    scores = torch.cat(recorder.scores)
    return {
        "sam_prompts": prompts.numpy(),
        "sam_candidate_logits": candidates.numpy(),
        "sam_candidate_scores": scores.numpy(),
        "sam_best": scores.argmax(-1).numpy(),
        "sam_final_logits": torch.stack(final_logits).numpy(),
        "sam_final_masks": torch.stack(final_masks).numpy(),
    }


def sam_input_statistics(model, image: Image.Image) -> dict[str, np.ndarray]:
    """Checks of Sa2VA's SAM2 input (the tensor itself, 12 MB, is not kept): sums and values at fixed positions."""
    g_image = model.extra_image_processor.apply_image(np.array(image))
    g_pixels = torch.from_numpy(g_image).permute(2, 0, 1).contiguous().to(model.torch_dtype)
    values = model.grounding_encoder.preprocess_image(g_pixels).double()
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, values.numel(), (4096,), generator=generator)
    return {
        "sam_input_positions": positions.numpy(),
        "sam_input_values": values.flatten()[positions].float().numpy(),
        "sam_input_sum": np.array(values.sum().item()),
        "sam_input_abs_sum": np.array(values.abs().sum().item()),
    }


def steer_towards_seg(model, tokenizer, image: Image.Image) -> None:
    """Scale the LM-head row of `[SEG]` so the random model answers with `[SEG]` (masks to compare) and text."""
    seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
    head = model.language_model.get_output_embeddings().weight
    with torch.no_grad():
        head[seg_id] *= 0
    model.predict_forward(image=image, text=PROMPT, tokenizer=tokenizer)
    hidden = model._fixture_last_hidden
    with torch.no_grad():
        direction = hidden / hidden.norm()
        others = model.language_model.get_output_embeddings()(hidden[None])[0]
        head[seg_id] = (direction * (others.max() + 1.0) / hidden.norm()).to(head.dtype)
        head[seg_id] = head[seg_id].to(torch.bfloat16).float()


def record_generation(model):
    """Wrap `model.generate` to keep its inputs and the last prompt hidden state."""
    original = model.generate

    def generate(**kwargs):
        model._fixture_inputs = {key: kwargs[key] for key in ("input_ids", "pixel_values", "attention_mask")}
        output = original(**kwargs)
        model._fixture_output = output
        model._fixture_last_hidden = output.hidden_states[0][-1][0, -1].float().clone()
        return output

    model.generate = generate


def record_seg_states(model) -> list[torch.Tensor]:
    """The `[SEG]` hidden states `predict_forward` passes to `text_hidden_fcs`."""
    seen: list[torch.Tensor] = []
    model.text_hidden_fcs.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach().clone()))
    return seen


def make_variant(modules: dict, name: str, output_dir: Path) -> dict:
    variant = VARIANTS[name]
    torch.manual_seed(variant["seed"])
    tokenizer = train_tokenizer(variant)
    config = chat_config(modules, name, variant, len(tokenizer))
    model = modules["modeling_sa2va_chat"].Sa2VAChatModel(config, use_flash_attn=False).eval()
    round_to_bfloat16(model)
    model.preparing_for_generation(tokenizer=tokenizer, max_new_tokens=MAX_NEW_TOKENS, torch_dtype=torch.float32)
    model._count = 0  # `_llm_forward` counts its calls in an attribute Sa2VA's __init__ does not create
    record_generation(model)
    image = fixture_image()
    steer_towards_seg(model, tokenizer, image)

    seg_states = record_seg_states(model)
    recorder = MaskDecoderRecorder(model.grounding_encoder.sam2_model.sam_mask_decoder)
    with torch.no_grad():
        result = model.predict_forward(image=image, text=PROMPT, tokenizer=tokenizer)
    recorder.handle.remove()
    inputs = model._fixture_inputs
    generated = model._fixture_output.sequences[0]
    with torch.no_grad():
        logits = model._llm_forward(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_flags=torch.ones(inputs["pixel_values"].shape[0], dtype=torch.long),
            return_dict=True,
        ).logits
    outputs = {
        "input_ids": inputs["input_ids"].numpy(),
        "pixel_values": inputs["pixel_values"].float().numpy(),
        "prompt_logits": logits[0].float().numpy(),
        "generated_ids": generated.numpy(),
        "seg_hidden_states": torch.cat(seg_states).float().numpy() if seg_states else np.zeros((0, 32), np.float32),
        "masks": np.stack([mask[0] for mask in result["prediction_masks"]])
        if result["prediction_masks"]
        else np.zeros((0, IMAGE_SIZE[1], IMAGE_SIZE[0]), bool),
        "mask_candidate_scores": torch.cat(recorder.scores).numpy() if recorder.scores else np.zeros((0, 3)),
        **sam_input_statistics(model, image),
    }
    if name == "qwen2":
        generator = torch.Generator().manual_seed(7)
        prompts = torch.randn(NUM_SAM_PROMPTS, model.grounding_encoder.hidden_dim, generator=generator)
        outputs.update(sam2_prompt_path(model, image, prompts))

    variant_dir = output_dir / name
    checkpoint = variant_dir / "checkpoint"
    model.to(torch.bfloat16).save_pretrained(checkpoint, max_shard_size="400KB", safe_serialization=True)
    tokenizer.save_pretrained(checkpoint)
    image.save(variant_dir / "image.png")
    np.savez_compressed(variant_dir / "sa2va_outputs.npz", **outputs)
    return {
        "prediction": result["prediction"],
        "num_seg": int(outputs["seg_hidden_states"].shape[0]),
        "generated_ids": outputs["generated_ids"].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sa2va-repo", type=Path, required=True, help="checkout of github.com/bytedance/Sa2VA")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--sa2va-commit", default=None, help="commit of the checkout, when it is not a git work tree")
    args = parser.parse_args()
    modules = import_sa2va(args.sa2va_repo)
    run_on_cpu(modules["sam2"])
    shrink_sam2(modules["sam2"])
    torch.set_num_threads(1)
    summary = {}
    for name in args.variants:
        summary[name] = make_variant(modules, name, args.output_dir)
        print(name, summary[name])
    import transformers

    commit = (
        args.sa2va_commit
        or subprocess.run(
            ["git", "-C", str(args.sa2va_repo), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    meta = {
        "prompt": PROMPT,
        "sa2va_commit": commit or "unknown (not a git checkout)",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "variants": summary,
    }
    (args.output_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
