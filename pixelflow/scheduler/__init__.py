"""The cascade's flow math: `from pixelflow.scheduler import PixelFlowScheduler`."""

from .scheduling_pixelflow import PixelFlowScheduler, StageTargets, halve

__all__ = ["PixelFlowScheduler", "StageTargets", "halve"]
