"""`kill -USR1 <pid>` on a training process prints every thread's stack to its log, and the run
goes on to its normal end: how to see where a node that seems hung waits (macfleet/run.py)."""

from __future__ import annotations

import signal

from tests.integration.test_cluster_training import TrainProc


def test_sigusr1_prints_every_threads_stack_and_training_goes_on(tmp_path):
    proc = TrainProc(["cluster=single", "trainer.epochs=1", "trainer.max_steps=400", "trainer.batch_size=8",
                      "trainer.progress=false", "trainer.checkpoint_every=0", "logger=none",
                      f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    try:
        started = proc.wait_line("local batch", timeout=120)  # the model line: the loop is about to run
        proc.signal(signal.SIGUSR1)
        proc.wait_line("(most recent call first)", timeout=60, after=started)
        assert proc.wait(240) == 0, proc.text()[-3000:]
    finally:
        proc.kill()
    text = proc.text()
    assert "Current thread" in text and 'File "' in text, text[-3000:]
    assert "epoch 1:" in text  # it trained on after the dump
