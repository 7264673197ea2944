"""The base layer: typed settings, emotion wheels, crash-safe files and checkpoints, the runtime
(devices, precision), progress, timing, metrics and statistics. Imports nothing else of hclafter."""
