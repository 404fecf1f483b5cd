"""PixelFlow: pixel-space generative models with flow (Chen et al., arXiv 2504.07963)."""

__version__ = "0.1.0"
