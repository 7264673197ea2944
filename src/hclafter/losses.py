"""The specification's stable import path for the losses (SPEC §6); the code is in ``models/losses.py``."""
from .models.losses import dual_task_loss, stage_consistency_loss, stage_distillation_loss, task_loss

__all__ = ["dual_task_loss", "stage_consistency_loss", "stage_distillation_loss", "task_loss"]
