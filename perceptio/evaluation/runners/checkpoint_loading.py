"""Loading a saved or exported Perceptio folder (model + processor) for evaluation."""

from __future__ import annotations

import os
from pathlib import Path


def load_perceptio_checkpoint(path: str | os.PathLike, device: str = "cpu", dtype: str = "auto"):
    """`(model, processor)` of a checkpoint folder, the model in eval mode on `device`.

    Args:
        path: a folder written by `save_pretrained` or `perceptio export` (it has a config.json).
        device: a torch device string ("cpu", "cuda", "cuda:1").
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
    """
    import torch

    from perceptio import PerceptioForConditionalGeneration, PerceptioProcessor

    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}; got {dtype!r}.")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Perceptio checkpoint folder (no config.json).")
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device ({error}).") from error
    model = PerceptioForConditionalGeneration.from_pretrained(folder, dtype=dtypes[dtype])
    model = model.to(torch_device).eval()
    processor = PerceptioProcessor.from_pretrained(folder)
    return model, processor
