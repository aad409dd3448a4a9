"""`dlkit tune`: hyperparameter search with Optuna over a recipe's search space; each trial is an
ordinary run directory under runs/<study>/, the study lives in an Optuna RDB storage (a SQLite file
in that folder by default) that processes on several machines can share."""
from dlkit.tune.session import TuneResult, tune

__all__ = ["TuneResult", "tune"]
