"""Task sampling weights: the one check every place that takes them (the YAML `data` section, the training run, the
data mixture, the synthetic dataset and recipe) applies."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def validate_task_weights(
    weights: Mapping[str, Any],
    tasks: Collection[str] | None = None,
    *,
    default: float | None = None,
    where: str = "task weights",
) -> dict[str, float]:
    """The sampling weight of each task as floats, after checking `weights` ({task: weight}); every place that takes
    task weights checks them here.

    Each weight must be a number >= 0 (a bool is not) and, with `tasks`, each name one of `tasks`. Without `default`,
    `weights` is the whole mixture: with `tasks` it must name each of them, and the weights must sum to > 0 so some
    task is drawn. With `default`, tasks left out weigh `default`: with `tasks` the result names each of them and its
    sum is checked; without `tasks` (not known yet) the sum cannot be.
    """
    if not isinstance(weights, Mapping):
        raise ValueError(f"{where} must be a {{task: weight}} mapping, got {weights!r}.")
    bad = {
        task: weight
        for task, weight in weights.items()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0
    }
    if bad:
        raise ValueError(f"{where} must be non-negative numbers, got {bad}.")
    if tasks is None:
        complete = dict(weights)
    else:
        unknown = sorted(set(weights) - set(tasks))
        missing = sorted(set(tasks) - set(weights)) if default is None else []
        problems = []
        if unknown:
            problems.append(f"{unknown} are not among them")
        if missing:
            problems.append(f"{missing} have no weight")
        if problems:
            raise ValueError(f"{where} must weigh the tasks {sorted(tasks)}: {' and '.join(problems)}.")
        complete = {task: weights.get(task, default) for task in tasks}
    if (default is None or tasks is not None) and sum(complete.values()) <= 0:
        raise ValueError(f"{where} must give some task a positive weight, got {dict(weights)}.")
    return {task: float(weight) for task, weight in complete.items()}
