"""`PerceptioTrainer`: a `transformers.Trainer` that logs every term of Perceptio's composite loss.

The model returns the total loss and each of its terms (`output.loss_dict`, one entry per `LOSS_TERMS` name:
`loss_lm`, `loss_mask`, `loss_mask_iou`, `loss_seg_attribute`, `loss_seg_prompt`, `loss_marker`, `loss_token`, `loss_count`,
`loss_depth_recon`). The trainer sums the terms of every training micro-batch, and at each logging step adds their
mean over the window (averaged across processes) to the Trainer's own logs under the same names, so the console,
TensorBoard and W&B show them next to `loss`. A non-finite term stops training with an error naming it.

It also logs the language-model loss per task, so a task that does not learn shows early: `loss_lm/<task>` is the
mean over the window's samples of that task of each sample's next-token cross-entropy over its own supervised tokens
(shifted as the model's `loss_function` shifts them), and `loss_answer/<task>` the same over the tokens outside the
sample's depth block (its `[SEG]`s and text answer), which in `loss_lm/<task>` a 64-code depth block would hide.
Samples weigh equally, and so do the tokens of a sample, whatever averaging the model's `loss_lm` uses, so the
per-task values need not average to `loss_lm`. The task names come from the batch's `tasks` list, which the trainer's copy of `PerceptioDataCollator` adds (`return_tasks=True`)
and `compute_loss` pops before the forward. The per-sample losses come from the forward
(`return_lm_loss_per_sample=True`, which reuses the per-token cross-entropy of `loss_lm` when it averages by segment)
and accumulate on the device, with no host sync; at logging, the per-task sums and counts of all processes are summed
(over the synthetic `TASK_NAMES` and any other name a process has seen), then divided. Samples without a task and
tasks absent from the window are not logged.

`module_learning_rates` gives parts of the model their own learning rate (for instance a pretrained vision tower
fine-tuned slower than the language model): each key names a module by its dotted path in `named_parameters()` (a
PEFT wrapper's prefix is allowed before it), each value is that module's peak rate, which the schedule scales as it
scales `learning_rate`. Where two keys match, the longer one wins.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.training_args import ParallelMode

from perceptio.data.synthetic_tasks import TASK_NAMES
from perceptio.models.perceptio.loss_perceptio import loss_term_names
from perceptio.models.perceptio.modeling_perceptio import PerceptioForConditionalGeneration
from perceptio.trainers.collator_perceptio import NO_TASK, PerceptioDataCollator


logger = logging.getLogger(__name__)

TASK_LOSS_PREFIX = "loss_lm/"
TASK_ANSWER_LOSS_PREFIX = "loss_answer/"
# Rows of the per-task window sums: LM loss sum, its sample count, answer loss sum, its sample count.
TASK_STAT_ROWS = 4


class NonFiniteLossError(FloatingPointError):
    """A loss component became NaN or infinite during training."""


class WindowMeans:
    """Named per-step scalars summed on the device over a logging window (no host sync per step), logged as their
    window means averaged across processes; `PerceptioTrainer` and `DepthTokenizerTrainer` log their losses with it.

    Args:
        names: the log key of each value, in the order `add` takes them.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        """Add one micro-batch's values, a (len(names),) float tensor."""
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def pop_means(self, parallel_mode: ParallelMode) -> dict[str, float]:
        """The window mean of each value, averaged over processes, and start a new window. Every process calls it at
        the same logging step, after at least one `add`."""
        gathered = nested_gather(self.sums[None], parallel_mode)
        means = gathered.mean(0) / self.count
        self.sums, self.count = None, 0
        return {name: round(float(value), 6) for name, value in zip(self.names, means.tolist())}


class PerceptioTrainer(Trainer):
    """Trainer for `PerceptioForConditionalGeneration` (or a PEFT wrapper of it).

    Use it exactly like `transformers.Trainer`, with `PerceptioDataCollator` as `data_collator`. Because the
    collator reads the raw sample schema (image, prompt, masks, depth, ...), `remove_unused_columns` is turned off,
    and the trainer uses a copy of the collator with `return_tasks=True` for the per-task `loss_lm/<task>` and
    `loss_answer/<task>` logs (the caller's collator is left as it was). Any other collator may add the same `tasks`
    list (one name per sample, `""` for none) to get them.

    Logged components are means over the micro-batches of the logging window, so they equal the Trainer's `loss`
    convention under gradient accumulation (the model sets `accepts_loss_kwargs = False`: each micro-batch loss is a
    mean, and the Trainer divides it by the accumulation steps).
    """

    def __init__(self, *args, module_learning_rates: Mapping[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.module_learning_rates = validated_module_learning_rates(self.model, module_learning_rates or {})
        if self.args.remove_unused_columns:
            logger.info("PerceptioTrainer: setting remove_unused_columns=False; the collator needs the raw columns.")
            self.args.remove_unused_columns = False
        if isinstance(self.data_collator, PerceptioDataCollator) and not self.data_collator.return_tasks:
            self.data_collator = copy.copy(self.data_collator)
            self.data_collator.return_tasks = True
        self._component_means = WindowMeans(loss_term_names())
        # Task name -> column of `_task_stats`; starts with the synthetic tasks, grows with any other name seen.
        self._task_index = {name: index for index, name in enumerate(TASK_NAMES)}
        # (TASK_STAT_ROWS, len(_task_index)): per task, the window's sum of per-sample LM losses and its number of samples, then
        # the same for the answer losses (outside the depth block).
        self._task_stats: torch.Tensor | None = None

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with one parameter group per (learning rate, weight decay) pair when
        `module_learning_rates` is set."""
        if self.optimizer is not None or not self.module_learning_rates:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                rate = module_learning_rate(name, self.module_learning_rates, self.args.learning_rate)
                key = (rate, self.args.weight_decay if name in decay else 0.0)
                groups.setdefault(key, []).append(parameter)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise ValueError(
                f"module_learning_rates needs a torch optimizer; TrainingArguments.optim={self.args.optim!r} builds "
                f"{optimizer_cls!r}."
            )
        parameter_groups = [
            {"params": parameters, "lr": rate, "weight_decay": weight_decay}
            for (rate, weight_decay), parameters in groups.items()
        ]
        self.optimizer = optimizer_cls(parameter_groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's total loss; in training, also records each component (stopping on a non-finite one) and the
        LM loss per task of the batch's `tasks`, which is popped because it is no model input."""
        tasks = inputs.pop("tasks", None)
        record_tasks = model.training and tasks is not None
        outputs = model(**inputs, return_lm_loss_per_sample=True) if record_tasks else model(**inputs)
        if model.training:
            self._record_components(outputs)
            if record_tasks:
                self._record_task_losses(outputs, inputs["labels"].shape[0], tasks)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the window mean of each loss component (averaged over processes) to a training log."""
        if "loss" in logs and self._component_means.count:
            logs.update(self._component_means.pop_means(self.args.parallel_mode))
            logs.update(self._task_loss_means())
            self._task_stats = None
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        if (
            self.is_deepspeed_enabled
            or self.is_fsdp_enabled
            or not isinstance(model, PerceptioForConditionalGeneration)
        ):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # `save_pretrained` writes InternVL's checkpoint key layout (`language_model.model.*`), which the Trainer's
        # raw, non-strict resume load would silently skip; `from_pretrained` converts it, and the strict load proves
        # every weight came back.
        restored = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(restored.state_dict(), strict=True)

    def _record_components(self, outputs) -> None:
        names = self._component_means.names
        values = torch.stack([_component(outputs, name).detach().float() for name in names])
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = [f"{name}={value:g}" for name, value, ok in zip(names, values.tolist(), finite.tolist()) if not ok]
            raise NonFiniteLossError(
                f"Non-finite loss component at step {self.state.global_step}: {', '.join(bad)}. Lower the learning "
                "rate or that component's weight, or check the batch's targets."
            )
        self._component_means.add(values)

    def _record_task_losses(self, outputs, batch: int, tasks) -> None:
        if not isinstance(tasks, (list, tuple)) or len(tasks) != batch or not all(isinstance(t, str) for t in tasks):
            raise ValueError(
                f"The batch's 'tasks' must be a list of {batch} task names (str, {NO_TASK!r} for none), one "
                f"per sample, got {tasks!r}."
            )
        rows = [row for row, task in enumerate(tasks) if task != NO_TASK]
        if not rows:
            return
        for row in rows:
            self._task_index.setdefault(tasks[row], len(self._task_index))
        per_sample = [
            getattr(outputs, name, None)
            for name in (
                "lm_loss_per_sample",
                "lm_tokens_per_sample",
                "answer_loss_per_sample",
                "answer_tokens_per_sample",
            )
        ]
        if any(value is None for value in per_sample):
            raise ValueError(
                "The model output has no lm_loss_per_sample or answer_loss_per_sample; PerceptioTrainer's per-task "
                "logs need a Perceptio model called with labels and return_lm_loss_per_sample=True."
            )
        lm, lm_tokens, answer, answer_tokens = per_sample
        # A sample with no token of a kind has no mean loss of that kind and is not counted for it.
        values = torch.stack([lm, (lm_tokens > 0).float(), answer, (answer_tokens > 0).float()])
        if self._task_stats is None or self._task_stats.shape[1] < len(self._task_index):
            grown = torch.zeros(TASK_STAT_ROWS, len(self._task_index), device=values.device)
            if self._task_stats is not None:
                grown[:, : self._task_stats.shape[1]] = self._task_stats
            self._task_stats = grown
        # Python indices, not an index tensor, so that no host-to-device copy waits for the forward.
        for row in rows:
            self._task_stats[:, self._task_index[tasks[row]]] += values[:, row]

    def _task_loss_means(self) -> dict[str, float]:
        """`loss_lm/<task>` and `loss_answer/<task>` of the window, summed over processes before dividing; called by
        every process at once."""
        local_names = list(self._task_index)
        names = local_names
        if self.args.parallel_mode == ParallelMode.DISTRIBUTED:
            # Processes may have seen different extra names; all gather the same union, in the same order.
            gathered_names = [None] * self.args.world_size
            torch.distributed.all_gather_object(gathered_names, local_names)
            names = list(dict.fromkeys(name for process_names in gathered_names for name in process_names))
        stats = torch.zeros(TASK_STAT_ROWS, len(names), device=self.args.device)
        if self._task_stats is not None:
            columns = torch.tensor([names.index(name) for name in local_names])
            stats[:, columns.to(stats.device)] = self._task_stats.to(stats.device)
        sums, counts, answer_sums, answer_counts = nested_gather(stats[None], self.args.parallel_mode).sum(0).tolist()
        return {
            f"{prefix}{name}": round(total / count, 6)
            for prefix, totals, numbers in (
                (TASK_LOSS_PREFIX, sums, counts),
                (TASK_ANSWER_LOSS_PREFIX, answer_sums, answer_counts),
            )
            for name, total, count in zip(names, totals, numbers)
            if count > 0
        }


def module_matches(parameter_name: str, module: str) -> bool:
    """Whether `parameter_name` lies in the module at dotted path `module`, behind any wrapper prefix."""
    return f".{module}." in f".{parameter_name}"


def module_learning_rate(parameter_name: str, rates: Mapping[str, float], default: float) -> float:
    """The rate of the longest key of `rates` whose module holds `parameter_name`, else `default`."""
    matching = [module for module in rates if module_matches(parameter_name, module)]
    return rates[max(matching, key=len)] if matching else default


def validated_module_learning_rates(model: torch.nn.Module, rates: Mapping[str, float]) -> dict[str, float]:
    """`rates` as a dict, after checking that every key names a module of `model` and every rate is positive."""
    if not isinstance(rates, Mapping):
        raise ValueError(f"module_learning_rates must map module paths to learning rates, got {rates!r}.")
    names = [name for name, _ in model.named_parameters()]
    for module, rate in rates.items():
        if not isinstance(module, str) or not any(module_matches(name, module) for name in names):
            raise ValueError(
                f"module_learning_rates key {module!r} names no module of the model; use a dotted path from "
                f"named_parameters(), e.g. 'model.vision_tower'."
            )
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise ValueError(f"module_learning_rates[{module!r}] must be a positive number, got {rate!r}.")
    return {module: float(rate) for module, rate in rates.items()}


def _component(outputs, name: str) -> torch.Tensor:
    value = (getattr(outputs, "loss_dict", None) or {}).get(name)
    if value is None:
        raise ValueError(
            f"The model output has no {name}; PerceptioTrainer needs a Perceptio model called with labels."
        )
    return value


__all__ = ["TASK_ANSWER_LOSS_PREFIX", "TASK_LOSS_PREFIX", "NonFiniteLossError", "PerceptioTrainer", "WindowMeans"]
