"""OnExceptionCheckpoint: an exception during a fit leaves a checkpoint at ``{dirpath}/{filename}.ckpt``.

Lightning's callback, for one process. With several workers it is refused at fit start: when one
rank raises, the others wait in a collective, and the state cannot be gathered; the run's own
checkpoints and ``max_failures`` (Ray restarts the workers from the newest committed checkpoint)
are what covers a multi-worker run.
"""
from __future__ import annotations

import logging

from raytrainer import storage
from raytrainer.callbacks.base import Callback
from raytrainer.errors import ConfigError

log = logging.getLogger(__name__)


class OnExceptionCheckpoint(Callback):
    def __init__(self, dirpath: str, filename: str = "on_exception"):
        self.dirpath = storage.normalize(str(dirpath))
        self.filename = filename

    @property
    def ckpt_path(self) -> str:
        return storage.join(self.dirpath, self.filename + ".ckpt")

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            raise ConfigError(f"OnExceptionCheckpoint needs one process; this fit has {trainer.world_size} workers, "
                              "and when one raises the others wait in a collective. Its checkpoints "
                              "(ModelCheckpoint(every_n_train_steps=...)) and Trainer(max_failures=...) cover a "
                              "multi-worker run: Ray restarts the workers from the newest committed checkpoint")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.state.fn != "fit":
            return
        try:
            trainer.save_checkpoint(self.ckpt_path)
        except Exception as e:  # the run's own exception is what the user must see
            log.warning("OnExceptionCheckpoint could not write %s: %s: %s", self.ckpt_path, type(e).__name__, e)
        else:
            log.info("checkpoint of the failed fit: %s", self.ckpt_path)
