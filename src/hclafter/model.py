"""The specification's stable import path for the model API (SPEC §6); the code is in ``models/``."""
from .models import NGA, HybridCascadeLaFTer, ModelOutput, build_model

__all__ = ["NGA", "HybridCascadeLaFTer", "ModelOutput", "build_model"]
