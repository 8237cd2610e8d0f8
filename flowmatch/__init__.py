"""flowmatch: train SD3/FLUX-style rectified-flow MMDiT text-to-image models.

    import flowmatch
    pipe = flowmatch.Pipeline.from_checkpoint("runs/digits")
    images = pipe.generate(["a handwritten digit seven"] * 8, steps=20, seed=0)  # (B, C, H, W) in [0, 1]
"""

from flowmatch.version import __version__

__all__ = ["Pipeline", "Recipe", "__version__", "load_recipe", "train"]


def __getattr__(name: str):
    # Lazy: `import flowmatch` stays cheap (the CLI imports torch, transformers and DeepSpeed only when needed).
    if name == "Pipeline":
        from flowmatch.pipeline import Pipeline  # reason: start-up cost (import flowmatch loads no torch)

        return Pipeline
    if name in ("Recipe", "load_recipe"):
        from flowmatch import config  # reason: start-up cost (import flowmatch loads no torch)

        return getattr(config, name)
    if name == "train":
        from flowmatch.training.loop import train  # reason: start-up cost (import flowmatch loads no torch)

        return train
    raise AttributeError(f"module 'flowmatch' has no attribute {name!r}")
