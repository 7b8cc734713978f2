"""The Accelerate training loop (`train`), what it builds, checkpoints and releases, and the module it optimises."""

from .checkpoint import CheckpointError, TrainerState, find_checkpoint, run_fingerprint, save_checkpoint
from .log_history import LOG_HISTORY_FILE, read_log_history
from .loop import NonFiniteLossError, train
from .module import DistillationModule, StepOutput

__all__ = ["train", "NonFiniteLossError", "CheckpointError", "TrainerState", "find_checkpoint", "run_fingerprint",
           "save_checkpoint", "DistillationModule", "StepOutput", "read_log_history", "LOG_HISTORY_FILE"]
