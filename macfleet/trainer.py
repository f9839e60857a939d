"""The training loop: `Trainer(model, dataset, training_config, cluster_config).fit()`.

`train.py` (Hydra) and the Python API share this one code path. One step:

    sampler gives this rank its b_i of the global batch B  ->  forward/backward on b_i
    -> MacFleetDDP's comm hook scales by b_i/B, compresses, all_reduces (overlapping backward)
    -> every rank holds the global-batch mean gradient  ->  identical optimizer.step()

Only rank 0 writes: logs, metrics.json, W&B and checkpoints.

Ctrl-C (`_CtrlC`): the first SIGINT only asks to stop. Every rank votes on stopping at step
boundaries (`_StopVote`), so all of them stop at the same step, rank 0 saves a checkpoint there
when that fits in about 2 s, writes metrics.json, history.json and curves.png for the steps
done, and `fit` raises `TrainingInterrupted`, whose text is the one line to show. A second
Ctrl-C aborts the collectives and stops at once, keeping the newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from macfleet import checkpoint as ckpt
from macfleet.compression.compressor import carry_residuals
from macfleet.config import ClusterConfig, CompressionConfig, LoggerConfig, SchedulerConfig, TrainingConfig
from macfleet.data.loader import build_loader, fetch, resolve_workers
from macfleet.device import pick_device, synchronize
from macfleet.errors import ConfigError, MacFleetError, TrainingInterrupted
from macfleet.fingerprint import fingerprint as fleet_fingerprint
from macfleet.fingerprint import setup
from macfleet.profile import StepProfiler
from macfleet.sampler import WeightedBatchSampler, shard_range
from macfleet.tracking import build_tracker

log = logging.getLogger("macfleet")


def build_scheduler(optimizer, cfg: SchedulerConfig, total_steps: int):
    """The LR schedule of `cfg` (train.py: the scheduler group; the Python API: TrainingConfig's
    lr_schedule and warmup_steps) over `total_steps`: a multiplier of the peak LR per step, linear
    warm-up, then constant, cosine or step decay."""
    total = max(1, total_steps)
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        if cfg.name == "step":
            return 0.01 if frac >= 0.75 else 0.1 if frac >= 0.5 else 1.0
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def default_optimizer_factory(tc: TrainingConfig) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer `tc` names, as a partial of params (the fingerprint reads it unbuilt)."""
    if tc.optimizer == "adamw":
        return functools.partial(torch.optim.AdamW, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    return functools.partial(torch.optim.SGD, lr=tc.learning_rate, momentum=tc.momentum, weight_decay=tc.weight_decay)


def default_optimizer(params, tc: TrainingConfig) -> torch.optim.Optimizer:
    return default_optimizer_factory(tc)(params)


def _as_bundle(dataset, val_dataset=None, loss_fn=None):
    """The trainer's view of the data: a DatasetBundle, or a torch Dataset of (input, target)
    pairs. The task decides the default loss: integer targets are class labels (cross-entropy);
    any other target needs `loss_fn`, and the data is refused before training, never trained on
    with the wrong loss."""
    from macfleet.data import DatasetBundle

    if isinstance(dataset, DatasetBundle):
        bundle = dataset
    elif isinstance(dataset, torch.utils.data.Dataset):
        bundle = DatasetBundle(name=type(dataset).__name__, train=dataset, test=None,
                               task="custom" if loss_fn is not None else "classification")
    else:
        raise ConfigError(f"dataset must be a macfleet DatasetBundle or a torch Dataset, not {type(dataset).__name__}")
    if val_dataset is not None:
        if not isinstance(val_dataset, torch.utils.data.Dataset):
            raise ConfigError(f"val_dataset must be a torch Dataset, not {type(val_dataset).__name__}")
        bundle = dataclasses.replace(bundle, test=val_dataset)
    if loss_fn is not None and bundle.task == "classification":
        bundle = dataclasses.replace(bundle, task="custom")
    for split, data in (("dataset", bundle.train), ("val_dataset", bundle.test)):
        if data is not None and len(data):
            _check_item(split, data[0], bundle.task)
    return bundle


def _check_item(split: str, item, task: str) -> None:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ConfigError(f"{split}[0] is a {type(item).__name__}: items must be (input, target) pairs, "
                          "as a TensorDataset(inputs, targets) gives")
    target = torch.as_tensor(item[1])
    if task in ("classification", "lm") and (target.dtype.is_floating_point or target.is_complex()):
        raise ConfigError(
            f"{split} has {target.dtype} targets (shape {tuple(target.shape)}), but the default loss is "
            "cross-entropy over integer class labels. For regression or any other objective pass "
            "loss_fn=..., e.g. Trainer(model, data, loss_fn=torch.nn.functional.mse_loss); for "
            "classification give the labels as integers (targets.long()).")


class Trainer:
    """Data-parallel trainer; on one machine with `cluster_config=None`."""

    def __init__(
        self,
        model: torch.nn.Module,
        dataset,
        training_config: TrainingConfig | None = None,
        cluster_config: ClusterConfig | None = None,
        *,
        compression_config: CompressionConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        logger_config: LoggerConfig | None = None,
        config_dict: dict | None = None,
        fingerprint: dict | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        val_dataset=None,
    ):
        """`dataset`: a torch Dataset of (input, target) pairs or a `DatasetBundle`. Integer
        targets train a classifier with cross-entropy (test accuracy is reported); for any other
        objective pass `loss_fn(output, target) -> mean loss over the batch`, and the test metric is
        that loss. `val_dataset` is evaluated after every epoch, split across the nodes."""
        self.model = model
        self.loss_fn = loss_fn
        self.data = _as_bundle(dataset, val_dataset, loss_fn)
        self._labels_checked = False
        self.tc = training_config or TrainingConfig()
        self.cc = cluster_config or ClusterConfig()
        self.comp = compression_config or CompressionConfig(name=self.tc.compression, ratio=self.tc.topk_ratio)
        self.schedule = scheduler_config or SchedulerConfig(name=self.tc.lr_schedule, warmup_steps=self.tc.warmup_steps)
        self.optimizer_factory = optimizer
        self.logger_cfg = logger_config
        self.config_dict = config_dict or {
            "trainer": vars(self.tc).copy(),
            "compression": vars(self.comp).copy(),
            "cluster": {k: (v.value if hasattr(v, "value") else v) for k, v in vars(self.cc).items() if k != "token"},
        }
        # What a joining node must share with the master, computed the same way for train.py and
        # the Python API (macfleet/fingerprint.py): a `fingerprint` argument replaces it.
        self.fingerprint = fingerprint or fleet_fingerprint(setup(
            self.tc, self.comp, self.schedule, self.cc, model, self.data,
            self.optimizer_factory or default_optimizer_factory(self.tc), loss_fn))
        self.metrics: dict[str, Any] = {}
        self._prof = StepProfiler(0, torch.device("cpu"), Path("."), 0)  # _fit's replaces it

    # ----------------------------------------------------------------- set-up
    def _output_dir(self, run_id: str) -> Path:
        if self.tc.output_dir:
            return Path(self.tc.output_dir)
        return Path("outputs") / run_id

    def _connect(self, device):
        from macfleet.cluster.fleet import connect

        speed = None
        if self.cc.mode != "single" and self.cc.weights is None and self.cc.weight == "auto":
            speed = self.calibrate(device)
        return connect(self.cc, self.fingerprint, seed=self.tc.seed, config_dict=self.config_dict, samples_per_s=speed,
                       device=device)

    def calibrate(self, device, steps: int = 10, budget_s: float = 2.0) -> float:
        """Measured training samples/s of this node (forward + backward on a copy of the model),
        for `cluster.weight: auto`. RNG and the model are left as they were."""
        import copy

        rng = ckpt.rng_state()
        model = copy.deepcopy(self.model).to(device).train()
        n = min(len(self.data.train), max(2, self.tc.batch_size // max(1, self.cc.nodes)))
        batch = [t.to(device) for t in fetch(self.data.train, list(range(n)))]

        timings: list[float] = []
        t_end = time.perf_counter() + budget_s
        for i in range(steps + 2):
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            self._loss(model(batch[0]), batch[1]).backward()
            synchronize(device)
            if i >= 2:  # the first steps warm up allocators and kernels
                timings.append(time.perf_counter() - t0)
            if timings and time.perf_counter() > t_end:
                break
        ckpt.set_rng_state(rng)
        speed = n / sorted(timings)[len(timings) // 2]
        log.info("calibration: %.0f samples/s on %s (batch %d)", speed, device, n)
        return speed

    # ----------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
        from macfleet.cluster.macos import keep_awake

        t_start = time.perf_counter()
        with keep_awake():  # a Mac with its lid open must not idle-sleep mid-run (caffeinate; nothing elsewhere)
            device = pick_device(self.tc.device)
            # Model, optimizer and schedule before joining: a node joining a run in progress is
            # then ready when the others take it in (the first optimizer imports torch._dynamo, 2-3 s).
            state = self._prepare(device)
            world = self._connect(device)

            # From here on a first Ctrl-C only asks to stop (waiting for nodes above stops at once).
            def abort() -> None:
                if world.group is not None:
                    world.group.abort(MacFleetError("stopped by a second Ctrl-C"))

            with _CtrlC(on_second=abort) as ctrl_c:
                try:
                    return self._fit(world, device, t_start, ctrl_c, state)
                except (RuntimeError, WorkerDied) as exc:
                    died = _worker_death(exc)
                    if died is None:
                        raise
                    what = str(died).strip().rstrip(".")
                    raise MacFleetError(
                        f"a DataLoader worker process died at step {state.step}: {what}. A worker killed "
                        "by SIGKILL is most often the system running out of memory. Resume with trainer.resume=auto; "
                        "trainer.num_workers=0 loads batches in the training process instead") from exc
                finally:
                    world.close()

    def _prepare(self, device) -> "TrainState":
        """The model on `device`, its optimizer and LR schedule, at step 0."""
        tc = self.tc
        model = self.model.to(device)
        params = model.parameters()
        opt = self.optimizer_factory(params) if self.optimizer_factory else default_optimizer(params, tc)
        if self.comp.momentum_correction and isinstance(opt, torch.optim.SGD):
            # DGC: the compressor already applies momentum before selecting; SGD must not add it again.
            for g in opt.param_groups:
                g["momentum"] = 0.0
            log.info("compression.momentum_correction: SGD momentum set to 0 (applied inside the compressor)")
        steps_per_epoch = len(self.data.train) // tc.batch_size
        return TrainState(model, opt, build_scheduler(opt, self.schedule, steps_per_epoch * tc.epochs))

    def _fit(self, world, device, t_start, ctrl_c: "_CtrlC", state: "TrainState") -> dict[str, Any]:
        tc, data = self.tc, self.data
        is_master = world.rank == 0  # the master is rank 0 in every generation
        from macfleet.config import new_run_id

        run_id = world.run.get("run_id") or new_run_id()
        out_dir = self._output_dir(run_id)
        ckpt_dir = Path(tc.checkpoint_dir) if tc.checkpoint_dir else out_dir / "checkpoints"
        self._out_dir = out_dir
        if is_master:
            out_dir.mkdir(parents=True, exist_ok=True)
        log.info("device %s | rank %d of %d | weights %s | run %s%s", device, world.rank, world.world_size,
                 [round(w, 3) for w in world.weights], run_id, " (joining it in progress)" if world.running else "")

        torch.manual_seed(tc.seed)
        fleet = _Parallel(self, world, device)
        steps_per_epoch = fleet.sampler.steps_per_epoch()
        total_steps = steps_per_epoch * tc.epochs
        if tc.max_steps:
            total_steps = min(total_steps, tc.max_steps)

        model, opt, sched = state.model, state.optimizer, state.scheduler
        history: list[dict] = []
        if world.running:
            # Joined a run in progress: a survivor sends the training state (and the codec the
            # fleet runs), then DDP is built.
            fleet.agree(state, None)
            fleet.build(state)
            fleet.gen_step = state.step
            log.info("joined the run at epoch %d step %d (generation %d)", state.epoch, state.step, world.generation)
        else:
            if self.comp.name == "auto":  # compression=auto: measure, then fix the codec for the run (compression/auto.py)
                from macfleet.compression.auto import resolve

                self.comp, self._compression_auto = resolve(self.comp, world, model, self._loss, data.train,
                                                            fleet.sampler.local_batch, device)
                fleet.decided = world.generation
            fleet.build(state)
            if is_master:
                removed = ckpt.clean(ckpt_dir)
                if removed:
                    log.info("removed what killed runs left in %s: %s", ckpt_dir, ", ".join(p.name for p in removed))
            resume_path = ckpt.resolve_resume(tc.resume, ckpt_dir) if is_master else None
            if is_master and resume_path is None and (aside := ckpt.set_aside(ckpt_dir)) is not None:
                log.warning("%s held checkpoints of an earlier run; this run starts afresh (trainer.resume=%s), so "
                            "they were moved to %s", ckpt_dir, tc.resume, aside)
            resume = world.broadcast_object({"path": str(resume_path) if resume_path else None})
            if resume["path"]:
                history = self._restore(world, resume["path"], state, fleet)
                log.info("resumed from %s at epoch %d step %d", resume["path"], state.epoch, state.step)
                if state.shares and len(state.shares) == world.world_size and list(state.shares) != world.weights:
                    fleet.reshare(list(state.shares), 0)  # the shares the run had moved to
                    log.info("shares as at the checkpoint: %s", [round(w, 3) for w in state.shares])
        log.info("model %s: %.2fM params | optimizer %s | compression %s | local batch %d of %d",
                 type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6,
                 type(opt).__name__, self.comp.name, fleet.sampler.local_batch, tc.batch_size)
        start_step = state.step

        tracker = build_tracker(self.logger_cfg, self.config_dict, str(out_dir), run_id) if is_master else build_tracker(None, {}, "", None)
        progress = _Progress(enabled=is_master and tc.progress, total=total_steps, start=state.step)
        # Throughput counts the training steps and the boundaries between them (not evaluation,
        # checkpoints or regrouping: see _StepClock), and only after this process's first
        # `timing_warmup_steps` (allocators, kernels, connections). On a GPU the timed window
        # starts and ends with the device idle: a synchronize at its two boundaries, none in
        # between, so queued kernels are neither lost nor waited on per step.
        clock = _StepClock()
        timed_steps, timed_samples, timed_s = 0, 0, 0.0
        slowest = (0.0, 0)  # the slowest timed step's seconds and number: a stall shows there, not in a mean
        steps_run = 0
        # trainer.profile_steps: recorded right after the warm-up, then timed (the profiler slows them).
        self._prof = prof = StepProfiler(tc.profile_steps, device, out_dir, world.rank)
        timing_from = tc.timing_warmup_steps + tc.profile_steps
        window_samples, window_s = 0, 0.0
        last_eval: dict[str, float] = {}
        stop = False
        vote = _StopVote(world)
        leave_alone = world.elastic and self.cc.mode == "direct"
        interrupted = None  # the TrainingInterrupted to raise once everything is written
        epoch_end = False   # the step loop of this epoch is over: sync, evaluate, save
        batches = None
        lost: BaseException | None = None   # the departure that ended the last generation
        admit = False                       # rank 0 takes waiting joiners in at this boundary
        recovery_s = 0.0
        first_step_of: dict | None = None
        try:
            while state.epoch < tc.epochs and not (stop and not epoch_end):
                try:
                    if lost is not None or admit:
                        clock.pause()
                        t_regroup = time.perf_counter()
                        why = lost
                        lost, admit, batches = None, False, None
                        world_record = fleet.regroup(state, admit=is_master and why is None)
                        vote.next_step = 0  # every rank votes at the next boundary (a joiner's first)
                        if fleet.loaded:
                            epoch_end = False  # the state came from a node further on: go on from there
                        recovery_s += time.perf_counter() - t_regroup
                        event = {"step": state.step, "event": world_record.get("why") or "new generation",
                                 "generation": world.generation, "world_size": world.world_size,
                                 "t": time.time() - (time.perf_counter() - t_regroup),
                                 "regroup_s": time.perf_counter() - t_regroup}
                        history.append(event)
                        first_step_of = event  # its "first_step_t": when the next step completed
                        tracker.log({"fleet/generation": world.generation, "fleet/world_size": world.world_size},
                                    state.step)
                        log.info("generation %d: %d node(s), rank %d, local batch %d of %d; %s step %d (%.2f s)",
                                 world.generation, world.world_size, world.rank, fleet.sampler.local_batch,
                                 tc.batch_size, "redoing" if why is not None else "going on at", state.step,
                                 time.perf_counter() - t_regroup)
                    if epoch_end:
                        clock.pause()
                        # Redoable as a whole: the epoch moves on at its end. Every rank evaluates
                        # and checkpoints rank 0's BatchNorm statistics.
                        fleet.ddp.sync_buffers()
                        if vote.stop:
                            progress.update(state.step, f"epoch {state.epoch + 1}/{tc.epochs} stopped by Ctrl-C")
                            # No evaluation (it may take long); a checkpoint if it fits the time
                            # budget and holds a step this run took.
                            why = ("no step since the start" if state.step == start_step else
                                   "" if vote.save else f"no time to save within {_CtrlC.BUDGET_S:g} s")
                            saved = None if why else self._save(world, ckpt_dir, state, fleet.ddp, history)
                            newest = saved or (ckpt.latest(ckpt_dir) if is_master else None)
                            interrupted = TrainingInterrupted(state.step, world.rank, saved=not why, why=why,
                                                              checkpoint=newest, out_dir=out_dir if is_master else None)
                            break
                        ended = state.epoch + (0 if stop else 1)  # the epoch a resume starts in
                        last_eval = self.evaluate(model, world, device)
                        if last_eval:
                            tracker.log({f"test/{k}": v for k, v in last_eval.items()}, state.step)
                            history.append({"step": state.step, **{f"test/{k}": v for k, v in last_eval.items()}})
                            where = (f"epoch {state.epoch + 1}" if state.step_in_epoch >= steps_per_epoch else
                                     f"step {state.step} ({state.step_in_epoch} of {steps_per_epoch} steps into "
                                     f"epoch {state.epoch + 1}, stopped there)")
                            log.info("%s: %s", where, " ".join(f"test {k} {v:.4f}" for k, v in last_eval.items()))
                        if (not stop and tc.checkpoint_every and ended % tc.checkpoint_every == 0) or stop \
                                or ended >= tc.epochs:
                            self._save(world, ckpt_dir, state, fleet.ddp, history, epoch=ended)
                        if not stop:
                            state.epoch, state.step_in_epoch = ended, 0
                        epoch_end = False
                        batches = None
                        continue
                    if tc.max_steps and state.step >= tc.max_steps:
                        stop = epoch_end = True
                        continue
                    if state.step_in_epoch >= steps_per_epoch:
                        epoch_end = True
                        continue
                    if batches is None:
                        fleet.sampler.set_epoch(state.epoch, state.step_in_epoch)
                        model.train()
                        batches = fleet.batches()
                    if ctrl_c.hard:
                        raise KeyboardInterrupt("a second Ctrl-C")
                    if vote.due(state.step) and vote(state.step, ctrl_c.at is not None, ctrl_c.save_fits(self._save_s),
                                                     leave_alone=leave_alone, joiners=world.joiners(),
                                                     rate=fleet.speed.rate):
                        stop = epoch_end = True
                        continue
                    fresh, fleet.seen_votes = vote.votes > fleet.seen_votes, vote.votes
                    if fleet.auto is not None and fresh and fleet.decided == world.generation \
                            and fleet.watch.changed(vote.step_s):
                        line = (f"compression=auto: the step time went from {1e3 * fleet.watch.reference:.1f} to "
                                f"{1e3 * vote.step_s:.1f} ms and stayed there: deciding again")
                        log.info("%s", line)
                        history.append({"step": state.step, "event": line})
                        fleet.decided, fleet.gen_step = None, state.step - fleet.REDECIDE_AFTER_STEPS
                    if fleet.adapt and fresh and (shares := self.propose_shares(world.weights, vote.rates, state.step,
                                                                               vote.votes - fleet.shares_vote)):
                        before = list(world.weights)
                        fleet.reshare(shares, vote.votes)
                        batches = None
                        line = (f"shares {[round(w, 3) for w in before]} -> {[round(w, 3) for w in shares]} "
                                f"(compute {', '.join(f'{r:,.0f}' for r in vote.rates)} samples/s)")
                        log.info("%s at step %d", line, state.step)
                        history.append({"step": state.step, "event": line, "shares": list(shares)})
                        tracker.log({f"fleet/share_{r}": w for r, w in enumerate(shares)}, state.step)
                        continue
                    if world.rank in vote.leaving:
                        interrupted = TrainingInterrupted(state.step, world.rank, saved=False, why="", left=True)
                        break
                    if vote.leaving or vote.admit:
                        vote.leaving, vote.admit = [], False
                        admit = True
                        continue
                    if fleet.auto is not None and fleet.decided != world.generation \
                            and state.step >= fleet.gen_step + fleet.REDECIDE_AFTER_STEPS:
                        clock.pause()  # trial exchanges, as at the start: not a step's cost
                        self.decide_again(fleet, state, history)
                    timed = steps_run >= timing_from
                    if steps_run == timing_from:
                        synchronize(device)
                    if prof.steps and not prof.done and not prof.active and steps_run == tc.timing_warmup_steps:
                        prof.start()
                    t_step = clock.start()
                    loss = self.train_step(state, fleet, world, next(batches), device)
                    if first_step_of is not None:
                        first_step_of["first_step_t"], first_step_of = time.time(), None
                    steps_run += 1
                    window_samples += tc.batch_size
                    if state.step == total_steps:
                        synchronize(device)
                    dt = time.perf_counter() - t_step
                    prof.step_done(dt)
                    dt += clock.end(timed)  # with the boundary before it (a vote may wait on the device there)
                    window_s += dt
                    if timed:
                        timed_steps += 1
                        timed_samples += tc.batch_size
                        timed_s += dt
                        slowest = max(slowest, (dt, state.step))
                    step = state.step
                    if step % tc.log_every == 0 or step == total_steps:
                        sps = window_samples / max(1e-9, window_s)
                        window_samples, window_s = 0, 0.0
                        gl = world.weighted_mean(float(loss.detach()), fleet.sampler.share)
                        row = {"train/loss": gl, "lr": sched.get_last_lr()[0], "samples_per_s": sps, "epoch": state.epoch}
                        row.update(fleet.ddp.wire_stats())
                        history.append({"step": step, **row})
                        tracker.log(row, step)
                        world.report(step, sps)
                        progress.update(step, f"epoch {state.epoch + 1}/{tc.epochs} train loss {gl:.4f}")
                    if tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0:
                        self._save(world, ckpt_dir, state, fleet.ddp, history)
                except (MacFleetError, RuntimeError) as exc:
                    lost = fleet.departure(exc, asked_to_stop=ctrl_c.at is not None)
                    if lost is None:
                        raise
                    log.warning("%s", lost)
        except (KeyboardInterrupt, MacFleetError):
            # A second Ctrl-C, or a peer that a Ctrl-C stopped before it could vote: stop here,
            # keep the newest checkpoint, and still write what the steps done measured.
            if ctrl_c.at is None:
                raise
            why = "stopped at once by a second Ctrl-C" if ctrl_c.hard else "a peer stopped before the others"
            interrupted = TrainingInterrupted(state.step, world.rank, saved=False, why=why,
                                              checkpoint=ckpt.latest(ckpt_dir) if is_master else None,
                                              out_dir=out_dir if is_master else None)
        finally:
            progress.close()
            # The recorded steps are read and written now, after the run's steps (see
            # StepProfiler.stop); a run that ended inside them keeps what was recorded.
            prof.finish()

        step, epoch = state.step, state.epoch
        if not timed_steps and interrupted is None:
            log.warning("no step was timed: trainer.timing_warmup_steps=%d covers all %d steps run; samples_per_s is 0",
                        tc.timing_warmup_steps, steps_run)
        wall = time.perf_counter() - t_start
        metrics = {
            **{f"test_{k}": v for k, v in last_eval.items()},
            "steps": step,
            "epochs": epoch,
            "samples_per_s": timed_samples / max(1e-9, timed_s),
            "step_s": timed_s / max(1, timed_steps),
            "step_max_s": slowest[0],
            "step_max_at": slowest[1],
            "timed_steps": timed_steps,
            "wall_s": wall,
            "world_size": world.world_size,
            "compression": self.comp.name,
            **self._compression_auto,
            "device": str(device),
            "data_workers": fleet.workers,
            **({"profile": prof.summary} if prof.summary else {}),
            "run_id": run_id,
            **{k.replace("comm/", ""): v for k, v in fleet.ddp.wire_stats().items()},
        }
        if world.generation > 1 or fleet.regroups:
            metrics.update({"generation": world.generation, "regroups": fleet.regroups, "recovery_s": recovery_s})
        if interrupted is not None:
            metrics["interrupted"] = True
        self.metrics = metrics
        if is_master:
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            _write_history(out_dir, history)
            from macfleet.plots import plot_history

            plot_history(history, out_dir / "curves.png",
                         title=f"{type(model).__name__} on {data.name}, {world.world_size} node(s), {self.comp.name}")
            tracker.summary(metrics)
            tracker.finish()
            if tc.progress and interrupted is None:
                _print_summary(metrics, out_dir)
        if interrupted is not None:
            raise interrupted
        return metrics

    def train_step(self, state: "TrainState", fleet: "_Parallel", world, batch, device) -> torch.Tensor:
        """One optimizer step on this rank's share of the global batch; returns the local loss.

        Redoable: until the step's exchange completed on every rank nothing is committed. A
        departure mid-step raises (PeerLostError); the caller drops the step (`_Parallel.regroup`
        rolls the codec's residuals back) and runs it again with the same global batch in the
        next generation. `state.step` moves only when the optimizer stepped."""
        ddp, model, opt = fleet.ddp, state.model, state.optimizer
        world.check()
        phase = self._prof.phase  # trainer.profile_steps: times each part while profiling
        with phase("data"):
            x, y = (t.to(device, non_blocking=True) for t in batch)
            ddp.set_step(state.step)
            opt.zero_grad(set_to_none=True)
        fleet.in_flight = True
        with phase("forward"):
            if fleet.adapt:  # device events on every step only where the shares use them
                fleet.speed.start()
            loss = self._loss(ddp(x), y)
            if fleet.adapt:
                fleet.speed.stop(len(y))
        with phase("backward"):
            loss.backward()
        with phase("exchange"):
            ddp.finish_gradients()
        fleet.in_flight = False
        with phase("optimizer"):
            if self.tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.tc.grad_clip)
            opt.step()
            state.scheduler.step()
        state.step += 1
        state.step_in_epoch += 1
        return loss

    # ----------------------------------------------------------------- pieces
    def _loss(self, out, y):
        if self.loss_fn is not None:
            return self.loss_fn(out, y)
        if self.data.task == "lm":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        if not self._labels_checked:
            self._check_labels(out, y)
        return F.cross_entropy(out, y)

    def _check_labels(self, out, y) -> None:
        """Once, on the first batch: labels index the model's outputs (a bad label is otherwise a
        device-side assert on a GPU, or a silent probability-target loss)."""
        self._labels_checked = True
        if out.dim() != y.dim() + 1 or out.shape[0] != y.shape[0]:
            raise ConfigError(f"classification needs outputs of shape (batch, classes, ...) and integer labels of "
                              f"shape (batch, ...); got outputs {tuple(out.shape)} and labels {tuple(y.shape)}. Pass "
                              "loss_fn=... for another objective.")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= out.shape[1]:
            raise ConfigError(f"labels run from {lo} to {hi}, but the model has {out.shape[1]} outputs: "
                              f"give the model {hi + 1} outputs (num_classes) or relabel to 0..{out.shape[1] - 1}")

    @torch.no_grad()
    def evaluate(self, model, world, device) -> dict[str, float]:
        """Test metrics, the test set split across ranks and the sums all-reduced."""
        test = self.data.test
        if test is None or len(test) == 0:
            return {}
        model.eval()
        lo, hi = shard_range(len(test), world.weights, world.rank)
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        bs = self.tc.eval_batch_size
        for start in range(lo, hi, bs):
            x, y = (t.to(device) for t in fetch(test, list(range(start, min(hi, start + bs)))))
            out = model(x)
            if self.loss_fn is not None:
                sums[0] += float(self.loss_fn(out, y)) * len(y)
                sums[2] += len(y)
                continue
            if self.data.task == "lm":
                out = out.reshape(-1, out.shape[-1])
                y = y.reshape(-1)
            sums[0] += float(F.cross_entropy(out, y, reduction="sum"))
            sums[1] += float((out.argmax(-1) == y).sum())
            sums[2] += y.numel()
        sums = world.all_reduce_sum(sums)
        model.train()
        n = max(1.0, float(sums[2]))
        res = {"loss": float(sums[0]) / n}
        if self.data.task == "lm":
            res["perplexity"] = math.exp(min(50.0, res["loss"]))
        elif self.data.task == "classification":
            res["accuracy"] = float(sums[1]) / n
        return res

    _save_s = 0.0
    """Seconds the last checkpoint took on rank 0: whether one more fits after a Ctrl-C."""
    _compression_auto: dict = {}
    """With compression=auto, why the codec in self.comp was chosen (for metrics.json)."""

    SHARE_HYSTERESIS = 0.1
    """Adaptive shares move only when some rank's share would change by more than this (relative)."""
    SHARE_SETTLE_VOTES = 3
    """... and only this many votes after the last move, so speeds are measured at the new shares."""

    def decide_again(self, fleet: "_Parallel", state: "TrainState", history: list) -> None:
        """compression=auto in a new generation (a node left or joined), or after the fleet's step
        time changed a lot (_StepWatch): measure and decide again at this step boundary, which
        every rank of the generation reaches together. A new codec
        takes over the residuals (per parameter); a dense one pays them out with the next
        gradient (carry_residuals). Costs a probe and trial exchanges (about 1-2 s), a few steps
        after the regroup, so the recovery itself is not slowed."""
        from macfleet.compression.auto import resolve

        world = fleet.world
        chosen, self._compression_auto = resolve(fleet.auto, world, state.model, self._loss, self.data.train,
                                                 fleet.sampler.local_batch, fleet.device)
        fleet.decided = world.generation
        fleet.watch.reset()
        residuals = fleet.ddp.state_dict()
        chosen = carry_residuals(chosen, residuals)
        was = _codec_label(self.comp)
        if chosen == self.comp:
            line = f"compression=auto, generation {world.generation} ({world.world_size} node(s)): keeps {was}"
            log.info("%s", line)
            history.append({"step": state.step, "event": line, "generation": world.generation})
            return
        line = f"compression=auto, generation {world.generation} ({world.world_size} node(s)): {was} -> {_codec_label(chosen)}"
        log.info("%s at step %d", line, state.step)
        history.append({"step": state.step, "event": line, "generation": world.generation})
        self.comp = chosen
        fleet.ddp.retire()
        fleet.build(state, residuals)

    def propose_shares(self, weights: list[float], rates: list[float], step: int, votes_since: int) -> list[float] | None:
        """New shares from every rank's measured compute speed (`cluster.adapt_shares`), or None
        to keep `weights`. Every rank calls it with the same numbers (they come from one
        all_reduce), so every rank takes the same decision without another message."""
        if votes_since < self.SHARE_SETTLE_VOTES or len(rates) != len(weights) or min(rates) <= 0:
            return None
        total = sum(rates)
        new = [r / total for r in rates]
        if max(abs(n - w) / w for n, w in zip(new, weights)) <= self.SHARE_HYSTERESIS:
            return None
        return new

    def _save(self, world, ckpt_dir, state: "TrainState", ddp, history, epoch: int | None = None) -> Path | None:
        """A checkpoint at this step boundary (a collective: every rank calls it); rank 0 writes
        it and history.json (so a killed run's history survives to its resume). `epoch`: the
        epoch a resume starts in, when an epoch just ended (its step in that epoch is then 0).
        Rank 0 returns its path."""
        t0 = time.perf_counter()
        per_rank = world.gather_object({"rng": ckpt.rng_state(), "compression": ddp.state_dict()})
        if world.rank != 0:
            return None
        state.shares = list(world.weights)
        shared = state.state_dict()
        if epoch is not None and epoch != state.epoch:
            shared.update(epoch=epoch, step_in_epoch=0)
        saved = {**shared, "per_rank": per_rank, "history": history}
        meta = {
            "epoch": shared["epoch"],
            "step_in_epoch": shared["step_in_epoch"],
            "world_size": world.world_size,
            "generation": world.generation,
            "run_id": world.run.get("run_id"),
            "config": self.config_dict,
        }
        path = ckpt.save(ckpt_dir, state.step, saved, meta, keep=self.tc.keep_checkpoints)
        _write_history(self._out_dir, history)
        self._save_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.iterdir())
        log.info("checkpoint %s (%s in %.2f s)", path, _megabytes(size), self._save_s)
        return path

    def _restore(self, world, path, state: "TrainState", fleet) -> list:
        """Load a checkpoint on every rank; returns the history up to its step (rank 0's). When
        the checkpoint holds top-k residuals and this run's codec is dense (compression=auto
        decided again, or the config changed), the codec becomes its top-k form at ratio 1.0,
        which sends the residuals with the next gradient instead of dropping them."""
        saved, history = None, []
        if world.rank == 0:
            saved, _ = ckpt.load(path)
            history = saved.pop("history", None) or []  # rank 0's alone: not sent to the others
            saved_ws = len(saved["per_rank"])
            if saved_ws != world.world_size:
                log.warning("checkpoint was written by %d nodes, now %d: error-feedback residuals and RNG of "
                            "missing ranks are reset", saved_ws, world.world_size)
        saved = world.broadcast_object(saved)
        state.load_state_dict(saved)
        mine = saved["per_rank"][world.rank] if world.rank < len(saved["per_rank"]) else None
        # Decided from rank 0's record, which every rank has, so every rank builds the same codec.
        carried = carry_residuals(self.comp, saved["per_rank"][0]["compression"] if saved["per_rank"] else None)
        if carried is not self.comp:
            log.info("compression: the checkpoint holds error-feedback residuals of %s, which %s would drop; "
                     "running %s at 100%% instead (the same bytes on the wire), so they are sent with the next "
                     "gradient", saved["per_rank"][0]["compression"].get("codec"), self.comp.name, carried.name)
            self.comp = carried
            fleet.build(state)
        if mine is not None:
            ckpt.set_rng_state(mine["rng"])
            fleet.ddp.load_state_dict(mine["compression"])
        return history


class TrainState:
    """What every rank holds the same of a run at a step boundary: model, optimizer, scheduler
    and the data position (step, epoch, step in epoch). `state_dict()` is the shared part of a
    checkpoint and what a node joining a run in progress receives; per-rank state (RNG, the
    codec's residuals) and the shares live beside it (checkpoint's per_rank, the World)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 step: int = 0, epoch: int = 0, step_in_epoch: int = 0):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step, self.epoch, self.step_in_epoch = step, epoch, step_in_epoch
        self.shares: list[float] | None = None
        """Every rank's share of the global batch in effect (the World's weights), when saved."""

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "shares": self.shares}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        self.shares = state.get("shares")


def _names_a_worker_death(exc: BaseException) -> bool:
    """PyTorch's own error for a DataLoader worker that died or was killed."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker")


def _worker_death(exc: BaseException) -> BaseException | None:
    """PyTorch's "DataLoader worker ... killed / exited" error in `exc` or the errors it was
    raised while handling: its SIGCHLD handler raises it wherever the main thread is, e.g.
    inside torch.save, whose cleanup then fails with an error of its own."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, WorkerDied) or _names_a_worker_death(exc):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class _StepWatch:
    """compression=auto's watch on the fleet's step time within a generation: the link or a Mac's
    speed changed a lot when the step time (rank 0's, from the stop vote, so every rank sees the
    same numbers and decides alike) stays more than FACTOR away from its reference for SUSTAINED
    votes in a row. The reference is the median of REFERENCE_VOTES votes after a decision (the
    codec just chosen runs then), once WARMUP_VOTES have passed: a codec's first steps allocate
    its buffers and PyTorch DDP rebuilds its buckets after the first step (model=mlp on one core:
    919 ms a step over the first votes, 514 ms after, which read as a change and made auto
    decide again). One slow interval (an evaluation, a checkpoint, the probe itself) never
    triggers."""

    FACTOR = 1.5
    SUSTAINED = 3
    REFERENCE_VOTES = 3
    WARMUP_VOTES = 3

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._first: list[float] = []
        self._skipped = 0
        self.reference: float | None = None
        self._off = 0

    def changed(self, step_s: float) -> bool:
        if step_s <= 0:
            return False  # no figure yet (rank 0's first vote)
        if self._skipped < self.WARMUP_VOTES:
            self._skipped += 1
            return False
        if self.reference is None:
            self._first.append(step_s)
            if len(self._first) >= self.REFERENCE_VOTES:
                self.reference = sorted(self._first)[len(self._first) // 2]
            return False
        ratio = step_s / self.reference
        self._off = self._off + 1 if ratio > self.FACTOR or ratio < 1 / self.FACTOR else 0
        return self._off >= self.SUSTAINED


def _codec_label(cfg: CompressionConfig) -> str:
    """'none', 'fp16', 'int8', 'topk_fp16 at 10%'; a dense codec's top-k form paying out residuals says so."""
    if cfg.name in ("topk", "topk_fp16") and cfg.ratio >= 1.0:
        return f"{'none' if cfg.name == 'topk' else 'fp16'} (as {cfg.name} at 100%, paying out the residuals)"
    return cfg.name if cfg.name in ("none", "fp16", "int8") else f"{cfg.name} at {100 * cfg.ratio:.3g}%"


class _Parallel:
    """One generation's data-parallel parts: this rank's sampler and loader (its share of every
    global batch) and the MacFleetDDP wrapping the model. `regroup` moves them to the next
    generation of an elastic run."""

    REDECIDE_AFTER_STEPS = 2
    """compression=auto decides again this many steps into a new generation (see decide_again)."""

    def __init__(self, trainer: Trainer, world, device):
        self.trainer, self.world, self.device = trainer, world, device
        self.ddp = None
        self.in_flight = False
        """A step's exchange started on this rank and has not completed here."""
        self.regroups = 0
        self.loaded = False
        """The last regroup replaced this rank's state with a node's that was further on."""
        self.adapt = trainer.cc.adapt_shares and world.world_size > 1
        self.speed = _Speed(device)
        self.shares_vote = 0
        """The vote count when the shares last moved."""
        self.seen_votes = 0
        self.auto: CompressionConfig | None = trainer.comp if trainer.comp.name == "auto" else None
        """compression=auto's own config (the codec it picks is trainer.comp), None otherwise."""
        self.decided: int | None = None
        """The generation auto last decided for; another one decides again (see decide_again)."""
        self.gen_step = 0
        """The step at which this generation's parts were built (after the ranks agreed on it)."""
        self.watch = _StepWatch()
        tc = trainer.tc
        self.workers = resolve_workers(tc.num_workers, trainer.data.train, device)
        """DataLoader worker processes (trainer.num_workers, `auto` resolved for this device)."""
        if tc.num_workers == "auto" and self.workers:
            log.info("data: %d DataLoader worker processes augment batches beside the %s (trainer.num_workers=auto; "
                     "set trainer.num_workers=0 to keep them in this process)", self.workers, device.type)
        self._shard()

    def reshare(self, weights: list[float], votes: int) -> None:
        """Take new shares of the global batch at this step boundary (every rank the same)."""
        self.world.weights = list(weights)
        self._shard()
        self.ddp.share = self.sampler.share
        self.shares_vote = votes
        self.speed.reset()

    def _shard(self) -> None:
        tc, w = self.trainer.tc, self.world
        self.sampler = WeightedBatchSampler(len(self.trainer.data.train), tc.batch_size, w.weights, rank=w.rank,
                                            seed=tc.seed)
        self._build_loader()

    def _build_loader(self) -> None:
        # Batches (and their augmentation, seeded per item) come from workers when workers > 0.
        self.loader = build_loader(self.trainer.data.train, self.sampler, self.trainer.tc.seed, self.workers,
                                   pin_memory=self.device.type == "cuda")

    def batches(self):
        """An iterator over this rank's batches of the sampler's current epoch. Where workers are
        spawned (macOS) each one gets a pickled copy of the dataset: under num_workers=auto a
        dataset that cannot be pickled (e.g. a lambda transform) falls back to 0 workers with a
        warning instead of failing the run."""
        try:
            with _sigint_ignored_by_children(self.workers > 0):
                it = iter(self.loader)
            if self.workers > 0:
                worker_deaths_pass_through()  # PyTorch set its SIGCHLD handler in iter()
            return it
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            if self.trainer.tc.num_workers != "auto" or not self.workers or "pickle" not in str(exc).lower():
                raise
            log.warning("data: DataLoader workers need a dataset they can pickle (%s); loading batches in this "
                        "process instead (trainer.num_workers=0)", exc)
            self.workers = 0
            self._build_loader()  # the same sampler, still at this epoch's position
            return iter(self.loader)

    def build(self, state: TrainState, residuals: dict | None = None) -> None:
        from macfleet.ddp import MacFleetDDP

        t = self.trainer
        self.ddp = MacFleetDDP(state.model, self.world.group, share=self.sampler.share, compression=t.comp,
                               device=self.device, redoable=self.world.elastic, bucket_cap_mb=t.cc.bucket_cap_mb,
                               use_torch_ddp={"auto": None, "torch": True, "flat": False}[t.cc.ddp])
        if residuals is not None:
            self.ddp.load_state_dict(residuals)

    def departure(self, exc: BaseException, asked_to_stop: bool):
        """The PeerLostError this run goes on after (None: `exc` ends it). DDP's C++ reducer turns
        a failed comm hook into a bare RuntimeError: the MacFleetError behind it says what to do,
        and is raised instead when the run cannot go on."""
        from macfleet.errors import PeerLostError

        lost = exc if isinstance(exc, PeerLostError) else None
        if lost is None:
            try:
                self.world.check()
            except PeerLostError as behind:
                lost = behind
            if lost is None:
                return None
        if asked_to_stop or not self.world.recoverable(lost):
            if lost is exc:
                return None
            raise lost from exc
        return lost

    def regroup(self, state: TrainState, admit: bool = False) -> dict:
        """Next generation: the step in flight (if any) is dropped on every rank, the new data
        plane opened, the ranks agree on the newest state, and sampler, loader and DDP are
        rebuilt with the new shares. The codec's residuals carry over. Returns the generation."""
        old = self.ddp
        old.retire()
        record = self.world.regroup(admit=admit)
        self.regroups += 1
        self._shard()
        self.speed.reset()
        self.adapt = self.trainer.cc.adapt_shares and self.world.world_size > 1
        self.agree(state, old)
        for p in state.model.parameters():
            p.grad = None
        self.build(state, old.state_dict())
        self.gen_step = state.step
        return record

    def agree(self, state: TrainState, old) -> None:
        """Every rank of a new generation ends up with the newest state any of them holds. A rank
        behind by the step in flight (it failed there while another completed it: every rank's
        share had arrived) keeps that step's residuals and takes the state of the first rank that
        is furthest on; a node joining the run (`old` None) takes it too. Otherwise the step in
        flight never completed anywhere: its residuals are dropped and it is redone."""
        w = self.world
        mine = [float(state.step + 1), float(state.epoch)] if old is not None else [0.0, 0.0]
        v = torch.zeros(2 * w.world_size, dtype=torch.float64)
        v[2 * w.rank: 2 * w.rank + 2] = torch.tensor(mine, dtype=torch.float64)
        v = w.all_reduce_sum(v).tolist()
        where = [(int(v[2 * r]), int(v[2 * r + 1])) for r in range(w.world_size)]
        top = max(where)
        behind = (int(mine[0]), int(mine[1])) < top
        if old is not None:
            if behind or not self.in_flight:
                old.settle()
            else:
                old.rollback()
        self.in_flight = False
        self.loaded = False
        if self.auto is not None:
            # compression=auto may have been deciding again when a node was lost: a rank that got
            # the decision and one that did not must not run two codecs in one generation. Rank
            # 0's codec is the generation's until auto decides again (a few steps on); a rank that
            # moves to a dense codec pays out its top-k residuals (carry_residuals: the same wire).
            codec = w.broadcast_object(dataclasses.asdict(self.trainer.comp) if w.rank == 0 else None)
            if codec["name"] != "auto":  # a joiner's own is still "auto": it takes the fleet's below
                self.trainer.comp = carry_residuals(CompressionConfig(**codec), old.state_dict() if old else None)
        if any(x != top for x in where):
            src = where.index(top)
            mine = {"state": state.state_dict(), "codec": dataclasses.asdict(self.trainer.comp)}
            shared = w.broadcast_object(mine if w.rank == src else None, src=src)
            if old is None:  # a joiner runs the codec the fleet runs (compression=auto chose it at the start)
                self.trainer.comp = CompressionConfig(**shared["codec"])
            if behind:
                state.load_state_dict(shared["state"])
                self.loaded = True
                log.info("took the training state at step %d from rank %d", state.step, src)


class _Speed:
    """This rank's compute speed for adaptive shares: samples per second of the forward pass,
    smoothed. The forward pass, not the step: a step also waits for the slowest rank's gradients,
    which would make every rank look as slow as the slowest. On CUDA and MPS the forward is timed
    with device events, read once they completed (no synchronisation added to the step)."""

    SMOOTHING = 0.2
    SKIP = 2
    """Passes left out after a (re)start: allocators and kernels warming up at a new batch size."""
    MIN_PASSES = 5
    """`rate` stays None (no vote for new shares) until this many passes were measured."""

    def __init__(self, device: torch.device, thermal: Callable[[], str] | None = None):
        from macfleet.cluster.macos import thermal_level

        self.device = device
        self._smoothed: float | None = None
        self._pending: list = []  # (start event, end event, samples) not yet read
        self._t0 = 0.0
        self._seen = 0
        self._thermal = thermal or thermal_level  # cached: microseconds, never waits on a command
        self._level: str | None = None

    @property
    def rate(self) -> float | None:
        return self._smoothed if self._seen >= self.SKIP + self.MIN_PASSES else None

    def reset(self) -> None:
        self._smoothed = None
        self._pending = []
        self._seen = 0

    def _rethink_on_thermal_change(self) -> None:
        """Thermal pressure steers the shares: when this Mac enters or leaves heavy pressure or
        worse (macOS slows it hard, or stops doing so), its speed is measured afresh instead of
        being smoothed into the old one, so its share follows within MIN_PASSES steps (the
        smoothing alone takes about 10 to move most of the way)."""
        from macfleet.cluster.macos import SEVERE

        level = self._thermal()
        before, self._level = self._level, level
        if before is None or before == level or (before not in SEVERE and level not in SEVERE):
            return
        log.info("thermal pressure %s -> %s: this node's compute speed is measured afresh for its share", before, level)
        self._smoothed = None
        self._seen = self.SKIP  # the batch size did not change: no warm-up to leave out

    def _event(self):
        if self.device.type == "cuda":
            return torch.cuda.Event(enable_timing=True)
        if self.device.type == "mps":
            return torch.mps.event.Event(enable_timing=True)
        return None

    def start(self) -> None:
        ev = self._event()
        if ev is None:
            self._t0 = time.perf_counter()
        else:
            ev.record()
            self._start = ev

    def stop(self, samples: int) -> None:
        ev = self._event()
        if ev is None:
            self._add(samples / max(time.perf_counter() - self._t0, 1e-9))
            return
        ev.record()
        self._pending.append((self._start, ev, samples))
        while self._pending and self._pending[0][1].query():
            start, end, n = self._pending.pop(0)
            self._add(n / max(start.elapsed_time(end) / 1e3, 1e-9))
        del self._pending[:-8]

    def _add(self, rate: float) -> None:
        self._rethink_on_thermal_change()
        self._seen += 1
        if self._seen <= self.SKIP:
            return
        s = self._smoothed
        self._smoothed = rate if s is None else s + self.SMOOTHING * (rate - s)


class _CtrlC:
    """SIGINT while training. The first only records when it came (`at`), so the loop stops at a
    step boundary all ranks agree on and saves; the second sets `hard` and calls `on_second`
    (which aborts the group's collectives), so this rank stops without waiting for the others.

    Python runs signal handlers on the main thread between bytecodes, never while it waits
    inside C++ (backward waiting on the comm hook's collective): the handler does nothing, and a
    watcher thread counts the signals from the wakeup fd, which the C-level handler writes at
    once. Installed only when `fit` runs on the main thread."""

    BUDGET_S = 2.0
    """A checkpoint is written after a Ctrl-C only if it is expected to be done this soon after it."""

    def __init__(self, on_second: Callable[[], None] | None = None):
        self.at: float | None = None
        self.hard = False
        self._on_second = on_second
        self._installed = False

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._read, self._write = os.pipe()
            os.set_blocking(self._write, False)  # set_wakeup_fd's rule: a handler never blocks
            self._previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
            self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
            self._watcher = threading.Thread(target=self._watch, name="macfleet-ctrl-c", daemon=True)
            self._watcher.start()
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if not self._installed:
            return
        signal.set_wakeup_fd(self._previous_fd)
        # None: the previous handler was not set from Python.
        signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
        os.close(self._write)  # the watcher reads end-of-file and returns
        self._watcher.join(5)
        os.close(self._read)

    def _watch(self) -> None:
        while data := os.read(self._read, 64):
            for signum in data:
                if signum != signal.SIGINT:
                    continue
                if self.at is None:
                    self.at = time.monotonic()
                elif not self.hard:
                    self.hard = True
                    if self._on_second is not None:
                        self._on_second()

    def save_fits(self, last_save_s: float) -> bool:
        """Whether a checkpoint taking as long as the last one ends within the budget."""
        return self.at is None or time.monotonic() - self.at + last_save_s <= self.BUDGET_S


class _StepClock:
    """The time a timed step costs: the step itself, and the boundary since the step before it
    (the stop vote and the loop's own work). Counting only the inside of steps hid time: where
    nothing in a step waits for the device (nccl), the host ran steps ahead and waited at the
    next vote, between steps, and 2 H200s under torchrun reported 1.42x the sum of their own
    speeds alone. `pause()` leaves the current boundary out (evaluation, checkpoints, regrouping)."""

    def __init__(self):
        self._last_end: float | None = None   # when the last timed step ended, while its boundary counts
        self._start = 0.0

    def pause(self) -> None:
        self._last_end = None

    def start(self) -> float:
        self._start = time.perf_counter()
        return self._start

    def end(self, timed: bool) -> float:
        """Seconds of the boundary before the step that just ended, to add to it (0 for the first
        step after a pause, or an untimed step)."""
        gap = self._start - self._last_end if timed and self._last_end is not None else 0.0
        self._last_end = time.perf_counter() if timed else None
        return gap


class _StopVote:
    """Stop or go, decided by all ranks together at a step boundary: a Ctrl-C seen by any rank
    (all of them on one machine, one Mac of two) stops every rank at the same step, which the
    checkpoint (a collective) needs. One all_reduce of 3 floats; rank 0 spaces the votes about
    `every_s` of training apart (the gap at most doubling from one vote to the next, so slow
    first steps are measured first), and decides whether a checkpoint still fits in the Ctrl-C
    budget."""

    def __init__(self, world, every_s: float = 0.2):
        self.world, self.every_s = world, every_s
        self.next_step = 0  # the first vote is before the first step
        self._t, self._step, self._gap = time.perf_counter(), None, 1
        self.stop = self.save = False
        self.admit = False
        """Rank 0 has nodes waiting to join: every rank moves to the next generation here."""
        self.leaving: list[int] = []
        """Ranks whose own Ctrl-C makes them leave an elastic run alone (direct mode)."""
        self.rates: list[float] = []
        """Every rank's compute speed as it voted (identical on every rank: one all_reduce)."""
        self.step_s = 0.0
        """Rank 0's seconds per step since its previous vote (0 at the first): the fleet's step
        time, the same on every rank."""
        self.votes = 0

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def __call__(self, step: int, asked: bool, save_fits: bool, leave_alone: bool = False, joiners: int = 0,
                 rate: float | None = None) -> bool:
        """`leave_alone`: a worker's Ctrl-C makes it leave, not the run stop (an elastic run in
        direct mode, where each Mac has its own terminal). `joiners` (rank 0): nodes waiting.
        `rate`: this rank's compute speed (samples/s) for adaptive shares; every rank gets every
        rank's in `rates` (0 where unknown)."""
        gap, per_step = 0, 0.0
        rank, size = self.world.rank, self.world.world_size
        if self.world.rank == 0:
            now = time.perf_counter()
            if self._step is not None and step > self._step:
                per_step = (now - self._t) / (step - self._step)
                self._gap = max(1, min(2 * self._gap, int(self.every_s / max(per_step, 1e-6))))
            self._t, self._step, gap = now, step, self._gap
        leaves = asked and leave_alone and rank != 0
        own = [float(asked and not leaves), float(gap), float(save_fits) if rank == 0 else 0.0,
               float(joiners) if rank == 0 else 0.0] + [0.0] * (2 * size) + [per_step]
        own[4 + rank] = float(leaves)
        own[4 + size + rank] = float(rate or 0.0)
        total = self.world.all_reduce_sum(torch.tensor(own, dtype=torch.float32)).tolist()
        self.stop, self.save = total[0] > 0, total[2] > 0
        self.admit = total[3] > 0
        self.leaving = [r for r in range(size) if total[4 + r] > 0]
        self.rates = total[4 + size:4 + 2 * size]
        self.step_s = total[4 + 2 * size]
        self.votes += 1
        self.next_step = step + max(1, int(total[1]))
        return self.stop


class WorkerDied(BaseException):
    """A DataLoader worker process died, as PyTorch's SIGCHLD handler reported it (its message).
    A BaseException, like KeyboardInterrupt: the handler raises wherever the main thread is, and
    code that catches Exception on the way would swallow a RuntimeError there. logging's emit does
    (it prints "--- Logging error ---" with a traceback and goes on, so the run failed later,
    at the next batch, with that traceback on the terminal); `fit` turns this into the error that
    says what to do."""


def worker_deaths_pass_through() -> None:
    """Wrap PyTorch's DataLoader SIGCHLD handler (set by the first iterator with workers) so that
    a dead worker raises WorkerDied instead of its RuntimeError. Main thread only; once."""
    sigchld = getattr(signal, "SIGCHLD", None)
    if sigchld is None or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(sigchld)
    if not callable(previous) or getattr(previous, "macfleet_wrapped", False):
        return

    def handler(signum, frame):
        try:
            previous(signum, frame)
        except RuntimeError as exc:
            if not _names_a_worker_death(exc):
                raise
            raise WorkerDied(str(exc)) from None

    handler.macfleet_wrapped = True
    signal.signal(sigchld, handler)


class _sigint_ignored_by_children:
    """DataLoader workers started inside inherit an ignored SIGINT. A spawned worker (macOS's
    default) would otherwise die of the first Ctrl-C, and the loop's next batch with it; a forked
    one (Linux) would write its Ctrl-C into the trainer's wakeup fd, counted as a second one."""

    def __init__(self, active: bool):
        self.active = active and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.active:
            self._previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self._previous)


def _write_history(out_dir: Path, history: list[dict]) -> None:
    tmp = out_dir / "history.json.tmp"
    tmp.write_text(json.dumps(history))
    os.replace(tmp, out_dir / "history.json")


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class _Progress:
    """A rich progress bar on rank 0; nothing elsewhere or when disabled. While it shows, log lines
    print through its console, above the bar, instead of into it."""

    def __init__(self, enabled: bool, total: int, start: int = 0):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("", total=total, completed=start)
        self._routed = _ConsoleHandler.route(self.bar.console)

    def update(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            _ConsoleHandler.unroute(self._routed)
            self.bar = None


class _ConsoleHandler(logging.Handler):
    """Stands in for a terminal log handler while the bar shows: the same lines, same format,
    printed by the bar's console (which lifts the bar above them), never wrapped."""

    def __init__(self, console, replaced: logging.Handler):
        super().__init__(replaced.level)
        self.setFormatter(replaced.formatter)
        self.console, self.replaced = console, replaced

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging's own rule: a failed log line never stops the run
            self.handleError(record)

    @classmethod
    def route(cls, console) -> list[tuple[logging.Logger, "_ConsoleHandler"]]:
        """Swap the stream handlers writing to the terminal (Hydra's console handler, basicConfig's)
        on the root and macfleet loggers; returns what to undo."""
        import sys

        terminal = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
        swapped = []
        for logger in (logging.getLogger(), log):
            for h in list(logger.handlers):
                if type(h) is logging.StreamHandler and h.stream in terminal:
                    mine = cls(console, h)
                    logger.removeHandler(h)
                    logger.addHandler(mine)
                    swapped.append((logger, mine))
        return swapped

    @staticmethod
    def unroute(swapped) -> None:
        for logger, mine in swapped:
            logger.removeHandler(mine)
            logger.addHandler(mine.replaced)


def _shown_value(key: str, v) -> str:
    """A metric as people read it: bytes in MB, rates in whole samples/s, times with units."""
    if not isinstance(v, float):
        return str(v)
    if "bytes" in key:
        return _megabytes(v)
    if key.endswith("per_s"):
        return f"{v:,.0f}"
    if key == "step_s":
        return f"{v * 1e3:.1f} ms"
    if key.endswith("_s"):
        return f"{v:.1f} s"
    if key.endswith("ratio"):
        return f"{v:.2%}"
    return f"{v:.4f}"


def _print_summary(metrics: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MacFleet run {metrics.get('run_id')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k.replace("samples_per_s", "samples/s"), _shown_value(k, v))
    table.add_row("output dir", str(out_dir))
    Console().print(table)


__all__ = ["Trainer", "MacFleetError", "TrainingInterrupted"]
