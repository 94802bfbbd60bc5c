"""Training: PerceptioTrainer, its collator and data mixture, PEFT presets, configs, recipes, depth-tokenizer distillation."""
