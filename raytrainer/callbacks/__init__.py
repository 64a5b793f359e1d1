from raytrainer.callbacks.base import Callback
from raytrainer.callbacks.device_stats import DeviceStatsMonitor
from raytrainer.callbacks.early_stopping import EarlyStopping
from raytrainer.callbacks.gradient_accumulation import GradientAccumulationScheduler
from raytrainer.callbacks.lambda_function import LambdaCallback
from raytrainer.callbacks.lr_monitor import LearningRateMonitor
from raytrainer.callbacks.model_checkpoint import ModelCheckpoint
from raytrainer.callbacks.model_summary import ModelSummary
from raytrainer.callbacks.on_exception import OnExceptionCheckpoint
from raytrainer.callbacks.prediction_writer import BasePredictionWriter, TorchPredictionWriter
from raytrainer.callbacks.progress import ProgressBar
from raytrainer.callbacks.spike import SpikeDetection, TrainingSpikeException
from raytrainer.callbacks.throughput import ThroughputMonitor
from raytrainer.callbacks.timer import Timer

__all__ = ["BasePredictionWriter", "Callback", "DeviceStatsMonitor", "EarlyStopping", "GradientAccumulationScheduler", "LambdaCallback",
           "LearningRateMonitor", "ModelCheckpoint", "ModelSummary", "OnExceptionCheckpoint", "ProgressBar", "SpikeDetection", "ThroughputMonitor",
           "Timer", "TorchPredictionWriter", "TrainingSpikeException"]
