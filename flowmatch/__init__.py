"""flowmatch: train SD3/FLUX-style rectified-flow MMDiT text-to-image models.

    import flowmatch
    pipe = flowmatch.Pipeline.from_checkpoint("runs/digits")
    images = pipe.generate(["a handwritten digit seven"] * 8, steps=20, seed=0)  # (B, C, H, W) in [0, 1]
"""

__version__ = "0.1.0"
__all__ = ["Pipeline", "Recipe", "load_recipe", "train"]


def __getattr__(name: str):
    # Lazy: `import flowmatch` stays cheap (the CLI imports torch, transformers and DeepSpeed only when needed).
    if name == "Pipeline":
        from flowmatch.sampling.generate import Pipeline

        return Pipeline
    if name in ("Recipe", "load_recipe"):
        from flowmatch import config

        return getattr(config, name)
    if name == "train":
        from flowmatch.training import train

        return train
    raise AttributeError(f"module 'flowmatch' has no attribute {name!r}")
