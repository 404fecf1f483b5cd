"""The PixelFlow network: `from pixelflow.model import PixelFlowModel`."""

from .attention import get_attention_backend, set_attention_backend
from .pixelflow_model import PixelFlowModel

__all__ = ["PixelFlowModel", "get_attention_backend", "set_attention_backend"]
