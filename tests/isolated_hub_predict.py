"""Load an exported Perceptio folder where `import perceptio` fails; run `predict` and the pipeline on it.

Usage: python isolated_hub_predict.py FOLDER INPUTS.pt OUTPUTS.pt TASK
"""

import sys

from import_blocker import block_perceptio


block_perceptio()

import torch  # noqa: E402
from transformers import AutoModel, AutoProcessor, pipeline  # noqa: E402


torch.set_num_threads(1)
folder, inputs_path, outputs_path, task = sys.argv[1:5]
request = torch.load(inputs_path, weights_only=False)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
(predicted,) = model.predict([request["image"]], [request["prompt"]], processor=processor, max_new_tokens=22)
pipe = pipeline(task, model=folder, trust_remote_code=True)
piped = pipe(request["image"], prompt=request["prompt"], max_new_tokens=22)
torch.save({"predict": vars(predicted), "pipeline": vars(piped), "pipeline_class": type(pipe).__name__}, outputs_path)
