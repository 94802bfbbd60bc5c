"""Stand-in for timm: only `timm.models.layers.DropPath`, which Sa2VA's InternViT imports (see ../README.md)."""
