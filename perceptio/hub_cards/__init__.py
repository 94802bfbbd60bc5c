"""Getting checkpoints onto the Hub: flat export, building from released parts, model cards, publishing."""
