"""An epoch counter that DataLoader workers see: ``set_epoch`` in the main process reaches persistent workers.

Both the video shards' dataset and the image datasets select their shuffle and augmentation by (seed, epoch). A
plain attribute would be copied into each persistent worker once; a value in shared memory is read afresh.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.sharedctypes


class SharedEpoch:
    """Mixin: ``set_epoch(e)``, ``epoch``; call ``_init_epoch()`` in ``__init__``."""

    def _init_epoch(self) -> None:
        self._epoch = multiprocessing.sharedctypes.RawValue("q", 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle (and augmentation) of ``epoch``; call before iterating."""
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def __getstate__(self):
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            # ordinary pickling (not handing the dataset to a starting worker): shared memory cannot travel
            state["_epoch"] = int(self._epoch.value)
        return state

    def __setstate__(self, state):
        if isinstance(state["_epoch"], int):
            state["_epoch"] = multiprocessing.sharedctypes.RawValue("q", state["_epoch"])
        self.__dict__.update(state)
