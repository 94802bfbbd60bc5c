"""Loading a checkpoint folder for evaluation; the loader lives in `perceptio.checkpoint_loading`, shared by every
command that loads one, and stays importable from here."""

from ...checkpoint_loading import load_perceptio_checkpoint


__all__ = ["load_perceptio_checkpoint"]
