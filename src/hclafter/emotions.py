"""The specification's stable import path for wheels and distributions (SPEC §6); the code is in ``core/emotions.py``."""
from .core.emotions import EKMAN6, MIKELS8, POLARITY2, Wheel, get_wheel, load_wheel, strategy1, wheel_distance

__all__ = ["EKMAN6", "MIKELS8", "POLARITY2", "Wheel", "get_wheel", "load_wheel", "strategy1", "wheel_distance"]
