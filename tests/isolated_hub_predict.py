"""Load an exported Perceptio folder where `import perceptio` fails; run `predict` and the pipeline on it.

Usage: python isolated_hub_predict.py FOLDER INPUTS.pt OUTPUTS.pt TASK [DTYPE]
DTYPE ("bfloat16", ...) is the `dtype` the model is loaded in; the checkpoint's own ("auto") by default.
"""

import sys

from import_blocker import block_perceptio


block_perceptio()

import torch  # noqa: E402
from transformers import AutoModel, AutoProcessor, pipeline  # noqa: E402


torch.set_num_threads(1)
folder, inputs_path, outputs_path, task = sys.argv[1:5]
dtype = getattr(torch, sys.argv[5]) if len(sys.argv) > 5 else "auto"
request = torch.load(inputs_path, weights_only=False)
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
(predicted,) = model.predict([request["image"]], [request["prompt"]], processor=processor, max_new_tokens=22)
pipe = pipeline(task, model=folder, trust_remote_code=True)
piped = pipe(request["image"], prompt=request["prompt"], max_new_tokens=22)
depth_tokenizer = model.depth_tokenizer
depth_tokenizer_dtypes = (
    {
        str(tensor.dtype)
        for tensor in [*depth_tokenizer.parameters(), *depth_tokenizer.buffers()]
        if tensor.is_floating_point()
    }
    if depth_tokenizer is not None
    else set()
)
torch.save(
    {
        "predict": vars(predicted),
        "pipeline": vars(piped),
        "pipeline_class": type(pipe).__name__,
        "model_dtype": str(model.dtype),
        "depth_tokenizer_dtypes": depth_tokenizer_dtypes,
    },
    outputs_path,
)
