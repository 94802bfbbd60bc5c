"""Load an exported Perceptio folder with trust_remote_code where `import perceptio` fails, and run it.

Usage: python isolated_hub_load.py FOLDER INPUTS.pt OUTPUTS.pt
Runs the processor on the image/prompt in INPUTS.pt and the model on the result; saves both to OUTPUTS.pt.
"""

import sys

from import_blocker import block_perceptio


block_perceptio()

import torch  # noqa: E402
from transformers import AutoModel, AutoProcessor  # noqa: E402


folder, inputs_path, outputs_path = sys.argv[1:4]
request = torch.load(inputs_path, weights_only=False)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(images=[request["image"]], text=[request["prompt"]])
with torch.no_grad():
    output = model(**inputs)
torch.save(
    {
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "inputs": dict(inputs),
        "logits": output.logits,
        "pred_masks": output.pred_masks,
        "seg_attribute_heads": None
        if model.seg_attribute_heads is None
        else [head.weight for head in model.seg_attribute_heads],
    },
    outputs_path,
)
