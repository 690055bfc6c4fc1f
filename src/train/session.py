"""The wiring that every training script shares (main.py, eval_linear.py): resume the
loop and the model from the checkpoint found at start-up, write the scalars, run the
epochs with the script's work at each epoch end, and stop as the signals and a
non-finite loss demand."""
import os

from src.distributed import is_main_process
from src.errors import NonFiniteLoss
from src.logger import ScalarWriter


class Training:
    """The run of a train.loop.TrainLoop `loop` over `model` and its AmpOptimizer
    `amp`, started by train.startup.start_run (`started`), logged as config.Run `run`
    says. `restore_extra(checkpoint)` restores what the script keeps beside the model
    (e.g. the linear probe's lr scheduler and scores)."""

    def __init__(self, started, loop, model, amp, run, restore_extra=None):
        self.started, self.loop, self.log = started, loop, started.log
        checkpoint = started.resumed
        if checkpoint:
            started.checkpoint_file.restore(checkpoint, model, amp)
            if restore_extra:
                restore_extra(checkpoint)
            loop.load_position(checkpoint)
            self.log.info(f"resumed from {checkpoint['source']} at epoch {loop.epoch + 1}, "
                          f"iteration {loop.iteration}")
        self.writer = loop.writer = ScalarWriter(run, is_main_process(), purge_step=loop.step)

    def epochs(self):
        """Yield the mean loss of every epoch as it ends, for the script's epoch-end work
        (checkpoint, evaluation); then a stop signal that came meanwhile ends the run
        (every process agrees). A non-finite loss is logged with the state of the last
        checkpoint, and raised."""
        try:
            with self.loop:
                while self.loop.epoch < self.loop.epochs:
                    yield self.loop.run_epoch()
                    self.loop.stop_if_requested()
        except NonFiniteLoss as err:
            path = self.started.checkpoint_file.path
            kept = (f"the last good checkpoint {path} is intact" if os.path.isfile(path)
                    else "no checkpoint was written")
            self.log.error(f"stopping: {err}; {kept}")
            raise NonFiniteLoss(f"{err}; {kept}") from None
        finally:
            self.writer.close()
