"""dlkit: classic deep-learning experiments as reproducible recipes."""
__version__ = "0.1.0"
