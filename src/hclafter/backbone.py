"""The specification's stable import path for the backbone API (SPEC §6); the code is in ``models/backbone.py``."""
from .models.backbone import Backbone, BackboneError, backbone_from_config, load_backbone

__all__ = ["Backbone", "BackboneError", "backbone_from_config", "load_backbone"]
