"""Perceptio model packages, in the layout of `transformers.models`."""
