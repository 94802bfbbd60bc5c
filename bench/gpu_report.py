"""One table of Perceptio's speed and memory on an accelerator, for the `perceptio-8b` preset with random weights.

The model is built directly on the device (every tensor is allocated there at construction, as the planner's meta
build is: no 16 GB host copy), cast to bf16 with the depth tokenizer kept in float32 (as `load_perceptio_checkpoint`
does; the tiny model too, so `--tiny` runs the same dtypes on CPU), and measured in this order, each row a median of
`--repeats` runs after a warm-up:

1. device-to-device copy bandwidth (bytes read + written per second), the roofline's denominator;
2. prefill of one 448² tile and of 12 tiles + thumbnail (a forward with `logits_to_keep=1`);
3. the SAM2-Large image encoder on one 1024² image, and the mask stage (`predict_masks`) for 8 `[SEG]`s vs 1;
4. decode tokens/s at batch 1 and 8, transformers' default cache (eager) and static cache + `torch.compile`,
   Perceptio (grammar and `[SEG]` capture on, as `predict` runs it) against transformers' plain
   `InternVLForConditionalGeneration` sharing the same modules. Decode time is generate(T new tokens) minus
   generate(1), so prefill is not counted. The roofline is the bytes of weights one decoding step reads (language
   model layers and LM head, bf16; the embedding reads one row per token) ÷ the measured copy bandwidth: one step
   makes `batch` tokens, so roofline tokens/s = batch × bandwidth / bytes per step (the KV cache read is left out);
5. one LoRA training step (the PEFT preset, bf16, gradient checkpointing, AdamW) on a realistic sample: one image,
   `--text-tokens` text tokens, one mask and a depth block; its time, tokens/s, peak memory against the planner's
   prediction (weights + optimizer states; the planner leaves activations out, so the ratio is above 1), and the
   full objective against LM + mask (`bench/training_step.py`'s two objectives,
   `bench/training_objectives.py`). It runs last: LoRA wraps the
   model's modules in place.

Each row is printed as soon as it is measured, and the whole table at the end. A feature this machine lacks (static
cache, compile, a CUDA peak-memory counter) gives one line saying so and an "unavailable" cell instead of a crash;
rows that would run past `--budget-s` are skipped the same way (the training step keeps `--training-reserve-s`).
`bench/gpu_report_requirements.md` lists what must be installed, and `bench/gpu_wheels.sh` downloads it.

    python bench/gpu_report.py                 # perceptio-8b on cuda: about 8 minutes on one H200
    python bench/gpu_report.py --tiny          # the tiny test model on CPU in seconds (checks the table, not speed)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


# pyproject.toml's floor: older transformers lack parts perceptio uses (Sam2Model, the static cache of InternVL...).
REQUIRED_TRANSFORMERS = "5.24"
REQUIREMENTS_FILE = Path(__file__).with_name("gpu_report_requirements.md")

try:
    import torch
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(REQUIRED_TRANSFORMERS):
        raise ImportError(f"transformers {transformers.__version__} is older than {REQUIRED_TRANSFORMERS}")
    from transformers import InternVLForConditionalGeneration

    from perceptio.hub_cards.planning import GIB, get_preset, plan_build
    from perceptio.models.perceptio.generation_perceptio import SEG_BUFFERS_ATTRIBUTE, decoding_kwargs
    from perceptio.models.perceptio.modeling_perceptio import PerceptioForConditionalGeneration
    from perceptio.tiny_models import build_tiny_perceptio
    from perceptio.trainers.peft_presets import PerceptioLoraPreset, apply_perceptio_lora
except ImportError as import_error:  # the device machine cannot install anything: say what is missing, once
    print(f"gpu_report cannot run: {import_error}; install the wheels listed in {REQUIREMENTS_FILE}.", file=sys.stderr)
    raise SystemExit(2) from import_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_objectives import full_objective, lm_and_mask_objective  # noqa: E402  (training_step.py's two)


PRESET = "perceptio-8b"
COLUMNS = ("measurement", "setting", "value", "reference", "ratio")
# The measurements of the table, in order; `--tiny` gives every one of them.
MEASUREMENTS = (
    "copy bandwidth",
    "prefill",
    "SAM2 image encoder",
    "mask stage",
    "decode",
    "decode roofline",
    "LoRA step time",
    "LoRA step tokens/s",
    "LoRA step peak memory",
    "LoRA step full objective",
)
BATCH_SIZES = (1, 8)
MANY_SEG = 8
MANY_TILES = 12
UNAVAILABLE = "unavailable"


@dataclass
class Settings:
    """What one run measures, with its sizes: the full preset on an accelerator or the tiny model on CPU."""

    device: torch.device
    new_tokens: int
    repeats: int
    text_tokens: int
    copy_bytes: int
    compile_backend: str
    budget_s: float
    training_reserve_s: float


@dataclass
class Row:
    measurement: str
    setting: str
    value: str
    reference: str = ""
    ratio: str = ""


class Report:
    """The table's rows, the one-line notices of what is unavailable, and the time budget."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.rows: list[Row] = []
        self.start = time.perf_counter()

    def add(self, measurement: str, setting: str, value: str, reference: str = "", ratio: str = "") -> None:
        if measurement not in MEASUREMENTS:
            raise ValueError(f"Unknown measurement {measurement!r}; the table has {MEASUREMENTS}.")
        row = Row(measurement, setting, value, reference, ratio)
        self.rows.append(row)
        # Each row as it is measured, so a run stopped at its time limit still reports what it measured.
        cells = " | ".join(getattr(row, column) for column in COLUMNS)
        print(f"[{time.perf_counter() - self.start:5.0f} s] {cells}", flush=True)

    def unavailable(self, measurement: str, setting: str, reason: str) -> None:
        print(f"{measurement} ({setting}) unavailable: {reason}", flush=True)
        self.add(measurement, setting, UNAVAILABLE)

    def seconds_left(self) -> float:
        return self.settings.budget_s - (time.perf_counter() - self.start)

    def attempt(self, measurement: str, setting: str, function: Callable[[], None], reserve_s: float = 0.0) -> None:
        """Run one measurement, or record it as unavailable (with the one-line reason) when it cannot run here."""
        if self.seconds_left() <= reserve_s:
            self.unavailable(measurement, setting, f"skipped, the {self.settings.budget_s:.0f} s budget is spent")
            return
        try:
            function()
        except (RuntimeError, ValueError, ImportError, TypeError, NotImplementedError, AttributeError) as error:
            message = " ".join(str(error).split())[:300] or type(error).__name__
            self.unavailable(measurement, setting, f"{type(error).__name__}: {message}")

    def markdown(self) -> str:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
        for row in self.rows:
            lines.append("| " + " | ".join(getattr(row, column) for column in COLUMNS) + " |")
        return "\n".join(lines)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `function` over `repeats` runs after one warm-up run, the device synchronised."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(tiny: bool, device: torch.device):
    """The model in bf16 on `device` (its depth tokenizer in float32) and the planner's figures for it."""
    if tiny:
        model = build_tiny_perceptio(seed=0, max_num_tiles=1)[0].to(device)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = PerceptioForConditionalGeneration(get_preset(PRESET).config())
    model = model.to(torch.bfloat16)
    # As `from_pretrained` in bf16 loads it (`PerceptioForConditionalGeneration._keep_in_fp32_modules_strict`).
    model.depth_tokenizer.float()
    return model.eval(), plan_build(model.config, PerceptioLoraPreset())


def plain_internvl(model: PerceptioForConditionalGeneration) -> InternVLForConditionalGeneration:
    """transformers' InternVL sharing Perceptio's InternVL modules (the same weights, no copy)."""
    with torch.device("meta"):
        plain = InternVLForConditionalGeneration(model.config)
    plain.model, plain.lm_head = model.model, model.lm_head
    plain.generation_config = model.generation_config
    leftover = [name for name, parameter in plain.named_parameters() if parameter.is_meta]
    if leftover:
        raise RuntimeError(f"The plain InternVL has parameters Perceptio does not share: {leftover[:3]}.")
    return plain.eval()


def text_ids(model, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random ids below every special id (image context and spatial tokens)."""
    config = model.config
    lowest_special = min([config.image_token_id, *config.spatial_vocabulary.spatial_token_ids])
    return torch.randint(10, lowest_special, (count,), generator=generator)


def tile_size(model) -> int:
    """The side of one image tile (448 for InternViT-300M); configs give it as an int or a (height, width) pair."""
    size = model.config.vision_config.image_size
    return size[0] if isinstance(size, (list, tuple)) else size


def image_prompt(model, num_tiles: int, text_tokens: int, batch_size: int, device: torch.device) -> dict:
    """A prompt of `text_tokens` text ids around one image of `num_tiles` tiles, repeated `batch_size` times."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    words = text_ids(model, text_tokens, generator)
    image = torch.full((num_tiles * config.image_seq_length,), config.image_token_id)
    input_ids = torch.cat([words[: text_tokens // 2], image, words[text_tokens // 2 :]]).repeat(batch_size, 1)
    tile = tile_size(model)
    pixel_values = torch.randn(batch_size * num_tiles, 3, tile, tile, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, model.dtype),
    }


def sam_image(model, device: torch.device) -> torch.Tensor:
    size = model.config.sam2_config.prompt_encoder_config.image_size
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, model.dtype)


def decoding_bytes(model) -> int:
    """Bytes of weights one decoding step reads: the language model's layers and norm, and the LM head."""
    embedding = model.get_input_embeddings().weight
    layers = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters() if p is not embedding)
    return layers + sum(p.numel() * p.element_size() for p in model.lm_head.parameters())


def measure_bandwidth(report: Report) -> float | None:
    settings = report.settings
    elements = settings.copy_bytes // 2
    source = torch.randn(elements, device=settings.device, dtype=torch.bfloat16)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), settings.device, settings.repeats)
    bandwidth = 2 * elements * 2 / seconds
    report.add(
        "copy bandwidth", f"{settings.copy_bytes / GIB:.2f} GiB copy, read + write", f"{bandwidth / 1e9:.1f} GB/s"
    )
    return bandwidth


@torch.no_grad()
def measure_prefill(report: Report, model, num_tiles: int) -> None:
    settings = report.settings
    inputs = image_prompt(model, num_tiles, settings.text_tokens, 1, settings.device)
    seconds = median_seconds(lambda: model(**inputs, logits_to_keep=1), settings.device, settings.repeats)
    tile = tile_size(model)
    tiles = "1 tile" if num_tiles == 1 else f"{num_tiles - 1} tiles + thumbnail"
    setting = f"{tiles} ({tile}²), {inputs['input_ids'].shape[1]} tokens"
    report.add("prefill", setting, f"{seconds * 1e3:.1f} ms")


@torch.no_grad()
def measure_sam2(report: Report, model) -> None:
    settings = report.settings
    image = sam_image(model, settings.device)
    seconds = median_seconds(lambda: model.sam_image_embeddings(image), settings.device, settings.repeats)
    report.add("SAM2 image encoder", f"1 image, {image.shape[-1]}²", f"{seconds * 1e3:.1f} ms")


@torch.no_grad()
def measure_mask_stage(report: Report, model) -> None:
    settings = report.settings
    image = sam_image(model, settings.device)
    hidden_size = model.config.text_config.hidden_size
    states = torch.randn(MANY_SEG, hidden_size, generator=torch.Generator().manual_seed(2))
    states = states.to(settings.device, model.dtype)
    one = median_seconds(lambda: model.predict_masks([states[:1]], image), settings.device, settings.repeats)
    many = median_seconds(lambda: model.predict_masks([states], image), settings.device, settings.repeats)
    report.add(
        "mask stage",
        f"{MANY_SEG} [SEG] vs 1, image encoder included",
        f"{many * 1e3:.1f} ms",
        f"{one * 1e3:.1f} ms",
        f"{many / one:.2f}×",
    )


def mode_kwargs(settings: Settings, compiled: bool) -> dict:
    if not compiled:
        return {}
    kwargs = decoding_kwargs(static_cache=True, compile=True)
    kwargs["compile_config"].backend = settings.compile_backend
    return kwargs


@torch.no_grad()
def decode_tokens_per_second(model, inputs: dict, settings: Settings, extra: dict) -> float:
    """Decode tokens/s: (generate(T) − generate(1)) over the batch's T − 1 new tokens per row."""
    common = dict(do_sample=False, pad_token_id=0, eos_token_id=None, **extra)

    def generate(new_tokens: int):
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common)

    long = median_seconds(lambda: generate(settings.new_tokens), settings.device, settings.repeats)
    short = median_seconds(lambda: generate(1), settings.device, settings.repeats)
    batch = inputs["input_ids"].shape[0]
    return batch * (settings.new_tokens - 1) / (long - short)


def measure_decode(report: Report, model, plain, batch_size: int, compiled: bool, bandwidth: float | None) -> None:
    settings = report.settings
    mode = f"static cache + compile ({settings.compile_backend})" if compiled else "eager, dynamic cache"
    setting = f"batch {batch_size}, {mode}"
    inputs = image_prompt(model, 1, settings.text_tokens, batch_size, settings.device)
    extra = mode_kwargs(settings, compiled)
    torch._dynamo.reset()
    ours = decode_tokens_per_second(model, inputs, settings, {**extra, "return_dict_in_generate": True})
    theirs = decode_tokens_per_second(plain, inputs, settings, extra)
    report.add(
        "decode",
        f"Perceptio vs InternVL, {setting}",
        f"{ours:.1f} tok/s",
        f"{theirs:.1f} tok/s",
        f"{ours / theirs:.3f}×",
    )
    if bandwidth is not None:
        roofline = batch_size * bandwidth / decoding_bytes(model)
        report.add(
            "decode roofline",
            f"Perceptio vs InternVL, {setting}",
            f"{ours / roofline:.3f}",
            f"{theirs / roofline:.3f}",
            f"roofline {roofline:.1f} tok/s",
        )


def training_sample(model, text_tokens: int, device: torch.device) -> dict:
    """One labelled sample: prompt (text around one tile), then `[SEG]`, a depth block and an answer; its mask and
    depth map at the tile's size."""
    config = model.config
    vocabulary = config.spatial_vocabulary
    generator = torch.Generator().manual_seed(3)
    prompt = image_prompt(model, 1, text_tokens - text_tokens // 8, 1, device)
    codes = torch.randint(0, config.num_depth_codes, (config.num_depth_tokens,), generator=generator).tolist()
    answer = text_ids(model, text_tokens // 8, generator).tolist()
    target = torch.tensor([vocabulary.seg, *vocabulary.depth_block(codes), *answer], device=device)[None]
    input_ids = torch.cat([prompt["input_ids"], target], dim=1)
    labels = torch.cat([torch.full_like(prompt["input_ids"], -100), target], dim=1)
    side = prompt["pixel_values"].shape[-1]
    mask = torch.zeros(1, side, side, device=device)
    mask[:, side // 4 : side // 2, side // 3 : 2 * side // 3] = 1.0
    depth = torch.rand(side, side, generator=generator).add(0.1).to(device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": prompt["pixel_values"],
        "sam_pixel_values": sam_image(model, device),
        "gt_masks": [mask],
        "depth_maps": [depth],
    }


def release_decoding_memory(model) -> None:
    """Drop what decoding left on the device (compiled graphs and their CUDA graph pools, the `[SEG]` buffers), so
    the training step's peak memory is its own."""
    torch._dynamo.reset()
    if hasattr(model, SEG_BUFFERS_ATTRIBUTE):
        delattr(model, SEG_BUFFERS_ATTRIBUTE)
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def measure_training(report: Report, model, planned_lora_bytes: int) -> None:
    settings = report.settings
    device = settings.device
    release_decoding_memory(model)
    peft_model = apply_perceptio_lora(model, PerceptioLoraPreset())
    checkpointing = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    else:  # transformers before 5.x names it after gradients
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    peft_model.train()
    sample = training_sample(model, settings.text_tokens, device)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)

    def step(objective) -> None:
        loss = objective(peft_model, sample)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    full = median_seconds(lambda: step(full_objective), device, settings.repeats)
    tokens = sample["input_ids"].numel()
    setting = f"1 image, {tokens} tokens, 1 mask, depth block, r={PerceptioLoraPreset().r}"
    report.add("LoRA step time", setting, f"{full * 1e3:.0f} ms")
    report.add("LoRA step tokens/s", setting, f"{tokens / full:.0f} tok/s")
    planned = f"planner {planned_lora_bytes / GIB:.2f} GiB"
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        report.add(
            "LoRA step peak memory", setting, f"{peak / GIB:.2f} GiB", planned, f"{peak / planned_lora_bytes:.2f}×"
        )
    else:
        report.unavailable("LoRA step peak memory", setting, f"no peak-memory counter on {device.type}")
    base = median_seconds(lambda: step(lm_and_mask_objective), device, settings.repeats)
    report.add(
        "LoRA step full objective",
        f"full vs LM + mask, {setting}",
        f"{full * 1e3:.0f} ms",
        f"{base * 1e3:.0f} ms",
        f"{full / base:.3f}×",
    )


def run(settings: Settings, tiny: bool) -> Report:
    """Build the model and measure every row of the table."""
    report = Report(settings)
    model, plan = build_model(tiny, settings.device)
    plain = plain_internvl(model)
    bandwidth_box: list[float] = []
    report.attempt("copy bandwidth", "device to device", lambda: bandwidth_box.append(measure_bandwidth(report)))
    bandwidth = bandwidth_box[0] if bandwidth_box else None
    reserve = settings.training_reserve_s
    for num_tiles in (1, MANY_TILES + 1):
        report.attempt("prefill", f"{num_tiles} tiles", lambda n=num_tiles: measure_prefill(report, model, n), reserve)
    report.attempt("SAM2 image encoder", "1 image", lambda: measure_sam2(report, model), reserve)
    report.attempt("mask stage", f"{MANY_SEG} [SEG] vs 1", lambda: measure_mask_stage(report, model), reserve)
    for compiled in (False, True):
        for batch_size in BATCH_SIZES:
            report.attempt(
                "decode",
                f"batch {batch_size}, {'static cache + compile' if compiled else 'eager'}",
                lambda b=batch_size, c=compiled: measure_decode(report, model, plain, b, c, bandwidth),
                reserve,
            )
    report.attempt("LoRA step time", "PEFT preset", lambda: measure_training(report, model, plan.lora_bytes))
    return report


def parse_settings(argv: list[str] | None) -> tuple[Settings, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on CPU (checks the table)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode length T (default 128; 8 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3; 1 with --tiny)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens (default 1024; 48 with --tiny)")
    parser.add_argument("--copy-gib", type=float, default=None, help="bandwidth copy size (default 2; 1/64 --tiny)")
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor; eager with --tiny)"
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="rows past this many seconds are skipped")
    parser.add_argument(
        "--training-reserve-s", type=float, default=None, help="seconds kept for the training step (default 120)"
    )
    args = parser.parse_args(argv)
    defaults = (8, 1, 48, 1 / 64, "eager", 0.0) if args.tiny else (128, 3, 1024, 2.0, "inductor", 120.0)
    new_tokens, repeats, text_tokens, copy_gib, backend, reserve = (
        default if given is None else given
        for given, default in zip(
            (
                args.new_tokens,
                args.repeats,
                args.text_tokens,
                args.copy_gib,
                args.compile_backend,
                args.training_reserve_s,
            ),
            defaults,
        )
    )
    if new_tokens < 2 or repeats < 1 or text_tokens < 16 or copy_gib <= 0 or args.budget_s <= 0 or reserve < 0:
        raise ValueError(
            "--new-tokens must be at least 2, --repeats at least 1, --text-tokens at least 16, --copy-gib and "
            "--budget-s positive, --training-reserve-s non-negative."
        )
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("No CUDA device here: run with --tiny (CPU) or pass --device.")
    settings = Settings(
        device=device,
        new_tokens=new_tokens,
        repeats=repeats,
        text_tokens=text_tokens,
        copy_bytes=int(copy_gib * GIB),
        compile_backend=backend,
        budget_s=args.budget_s,
        training_reserve_s=reserve,
    )
    return settings, args.tiny


def main(argv: list[str] | None = None) -> Report:
    settings, tiny = parse_settings(argv)
    name = "tiny test model" if tiny else PRESET
    hardware = torch.cuda.get_device_name(settings.device) if settings.device.type == "cuda" else "CPU"
    print(f"{name} on {hardware}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    report = run(settings, tiny)
    print(report.markdown())
    return report


if __name__ == "__main__":
    main()
