"""Training of learned editors (KE, MEND, MALMEN, SERAC's classifier): one checkpoint cache shared by
all of them (`checkpoints.py`); the training loop itself comes with the first learned editor."""

from .checkpoints import Checkpoint, checkpoint_key, find_checkpoint, latest_checkpoint, save_checkpoint

__all__ = ["Checkpoint", "checkpoint_key", "find_checkpoint", "latest_checkpoint", "save_checkpoint"]
