"""The Accelerate training loop (`train`) and the module it optimises."""

from .log_history import LOG_HISTORY_FILE, read_log_history
from .loop import NonFiniteLossError, TrainerState, find_checkpoint, save_checkpoint, train
from .module import DistillationModule, StepOutput

__all__ = ["train", "NonFiniteLossError", "TrainerState", "find_checkpoint", "save_checkpoint", "DistillationModule", "StepOutput",
           "read_log_history", "LOG_HISTORY_FILE"]
