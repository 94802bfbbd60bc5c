"""Files that ship inside the package: the embedded checkpoint, the example scene, the tiny tokenizer corpus."""
