"""Load the processor of a `save_pretrained` folder with AutoProcessor where `import perceptio` fails, and run it.

Usage: python isolated_processor_load.py FOLDER INPUTS.pt OUTPUTS.pt
Saves what `AutoProcessor.from_pretrained(FOLDER)` raised without trust_remote_code, the class it loaded with
trust_remote_code=True, and that processor's outputs on the image/prompt in INPUTS.pt.
"""

import sys

from import_blocker import block_perceptio


block_perceptio()

import torch  # noqa: E402
from transformers import AutoProcessor  # noqa: E402


folder, inputs_path, outputs_path = sys.argv[1:4]
request = torch.load(inputs_path, weights_only=False)
try:
    untrusted = type(AutoProcessor.from_pretrained(folder)).__name__
except ValueError as error:
    untrusted = f"ValueError: {error}"
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
torch.save(
    {
        "untrusted": untrusted,
        "processor_class": type(processor).__module__ + "." + type(processor).__name__,
        "inputs": dict(processor(images=[request["image"]], text=[request["prompt"]])),
    },
    outputs_path,
)
