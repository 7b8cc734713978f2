"""The Accelerate training loop (`train`) and the module it optimises."""

from .loop import NonFiniteLossError, TrainerState, find_checkpoint, save_checkpoint, train
from .module import DistillationModule, StepOutput

__all__ = ["train", "NonFiniteLossError", "TrainerState", "find_checkpoint", "save_checkpoint", "DistillationModule", "StepOutput"]
