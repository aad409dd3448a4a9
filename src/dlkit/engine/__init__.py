"""Training engine: plain functions (`fit`, `train_one_epoch`, `evaluate`) and small callbacks."""
from dlkit.engine.callbacks import Callback, Checkpoint, EarlyStopping, FitState, GradClip, MetricsLog
from dlkit.engine.loop import History, evaluate, fit, loss_for, predict_outputs, train_one_epoch

__all__ = ["Callback", "Checkpoint", "EarlyStopping", "FitState", "GradClip", "History", "MetricsLog", "evaluate", "fit",
           "loss_for", "predict_outputs", "train_one_epoch"]
