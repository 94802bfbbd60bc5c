"""`PerceptioTrainer`: a `transformers.Trainer` that logs every term of Perceptio's composite loss.

The model returns the total loss and each component (`loss_lm`, `loss_mask`, `loss_mask_iou`, `loss_marker`, `loss_token`,
`loss_count`, `loss_depth_recon`). The trainer sums the components of every training micro-batch, and at each
logging step adds their mean over the window (averaged across processes) to the Trainer's own logs, so the console,
TensorBoard and W&B show them next to `loss`. A non-finite component stops training with an error naming it.
"""

from __future__ import annotations

import logging

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather

from perceptio.modeling_perceptio.modeling_perceptio import PerceptioForConditionalGeneration

logger = logging.getLogger(__name__)

LOSS_COMPONENTS = (
    "loss_lm",
    "loss_mask",
    "loss_mask_iou",
    "loss_marker",
    "loss_token",
    "loss_count",
    "loss_depth_recon",
)


class NonFiniteLossError(FloatingPointError):
    """A loss component became NaN or infinite during training."""


class PerceptioTrainer(Trainer):
    """Trainer for `PerceptioForConditionalGeneration` (or a PEFT wrapper of it).

    Use it exactly like `transformers.Trainer`, with `PerceptioDataCollator` as `data_collator`. Because the
    collator reads the raw sample schema (image, prompt, masks, depth, ...), `remove_unused_columns` is turned off.

    Logged components are means over the micro-batches of the logging window, so they equal the Trainer's `loss`
    convention under gradient accumulation (the model sets `accepts_loss_kwargs = False`: each micro-batch loss is a
    mean, and the Trainer divides it by the accumulation steps).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            logger.info("PerceptioTrainer: setting remove_unused_columns=False; the collator needs the raw columns.")
            self.args.remove_unused_columns = False
        self._component_sums: torch.Tensor | None = None
        self._component_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's total loss; in training, also records each component and stops on a non-finite one."""
        outputs = model(**inputs)
        if model.training:
            self._record_components(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the window mean of each loss component (averaged over processes) to a training log."""
        if "loss" in logs and self._component_sums is not None:
            gathered = nested_gather(self._component_sums[None], self.args.parallel_mode)
            means = gathered.mean(0) / self._component_count
            logs.update({name: round(float(value), 6) for name, value in zip(LOSS_COMPONENTS, means.tolist())})
            self._component_sums = None
            self._component_count = 0
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(model, PerceptioForConditionalGeneration):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # `save_pretrained` writes InternVL's checkpoint key layout (`language_model.model.*`), which the Trainer's
        # raw, non-strict resume load would silently skip; `from_pretrained` converts it, and the strict load proves
        # every weight came back.
        restored = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(restored.state_dict(), strict=True)

    def _record_components(self, outputs) -> None:
        values = torch.stack([_component(outputs, name).detach().float() for name in LOSS_COMPONENTS])
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = [f"{name}={value:g}" for name, value, ok in zip(LOSS_COMPONENTS, values.tolist(), finite.tolist()) if not ok]
            raise NonFiniteLossError(
                f"Non-finite loss component at step {self.state.global_step}: {', '.join(bad)}. Lower the learning "
                "rate or that component's weight, or check the batch's targets."
            )
        self._component_sums = values if self._component_sums is None else self._component_sums + values
        self._component_count += 1


def _component(outputs, name: str) -> torch.Tensor:
    value = getattr(outputs, name, None)
    if value is None:
        raise ValueError(
            f"The model output has no {name}; PerceptioTrainer needs a Perceptio model called with labels."
        )
    return value


__all__ = ["LOSS_COMPONENTS", "NonFiniteLossError", "PerceptioTrainer"]
