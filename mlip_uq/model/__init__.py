"""The NequIP model shared by all posterior samples."""

from .build import ModelConfig, build_model, state_layout

__all__ = ["ModelConfig", "build_model", "state_layout"]
