"""Pure network modules: the causal DiT and its action module, the flow-matching scheduler,
the Wan VAE and the CLIP image encoder. No I/O here."""

from .config import ActionConfig, DiTConfig
from .dit import CausalDiT, ContextKV, LayerCaches
from .scheduler import FlowMatchScheduler

__all__ = ["ActionConfig", "CausalDiT", "ContextKV", "DiTConfig", "FlowMatchScheduler", "LayerCaches"]
