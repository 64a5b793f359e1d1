"""Loggers: run last in every event, on global rank zero only (see ``base``)."""
from raytrainer.loggers.base import Logger
from raytrainer.loggers.csv_logs import CSVLogger
from raytrainer.loggers.mlflow import MLflowLogger
from raytrainer.loggers.tensorboard import TensorBoardLogger
from raytrainer.loggers.wandb import WandbLogger

__all__ = ["Logger", "TensorBoardLogger", "CSVLogger", "WandbLogger", "MLflowLogger"]
