"""The main job: train a gated model on real data while pruning it, then compact it and report.

`train(TrainConfig)` is what `cadk train` runs. With `dense=True` it trains the same architecture as a
plain network (the compacted gated model at initialisation, i.e. with every gate at 1) for comparison.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data as D
from .compaction import compact, compact_paths, flop_count, param_count, save_compact
from .complexity import ComplexityCost
from .models import build_model
from .nn import GatedResidualBlock
from .optim import Pruner, ThetaAdam, ThetaSGD, split_parameters
from .utils import atomic_write, atomic_write_json, eval_mode, remove_partial_writes


@dataclass
class TrainConfig:
    model: str = "resnet20"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    image_size: int = 224         # crops of the streamed folder datasets (imagenet, imagefolder)
    workers: int | None = None    # their decoding processes; None: min(8, CPU count)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lam: float = 0.1
    alpha: float = 1.0
    beta: float = 0.5
    target_flops: float | None = None
    target_params: float | None = None
    lam_lr: float = 0.02
    ramp_epochs: float | None = None   # None: 80% of the time between warm-up and settling
    settle_epoch: float | None = None  # None: at 40% of the epochs (6 of 15); 0: never
    theta_optimizer: str = "adam"
    theta_lr: float = 2e-3
    prune_eps: float = 0.02
    patience: int = 100
    warmup_epochs: float = 1.0
    prune_every: int = 50
    dense: bool = False
    augment: bool = True
    seed: int = 0
    threads: int = 0
    out_dir: str = "runs/cadk"
    resume: bool = False
    overwrite: bool = False       # start a new run in an out-dir that holds one
    device: str | None = None     # where the model trains; None: CUDA when there is a GPU, else the CPU
    max_steps_per_epoch: int = 0  # 0 = full epochs; a small value gives quick smoke runs
    checkpoint_minutes: float = 30.0  # within an epoch, a checkpoint when this long has passed since the last; 0: none
    checkpoint_every: int = 0     # within an epoch, a checkpoint every this many steps; 0: none
    history: list = field(default_factory=list, repr=False)


class CheckpointError(RuntimeError):
    pass


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stops (the last checkpoint stays as it was)."""


@dataclass
class EpochProgress:
    """How far the epoch under way has got: what a checkpoint written within it holds to continue it exactly."""
    gen: torch.Tensor             # the data generator's state at the epoch's start (order and crops follow from it)
    steps_per_epoch: int
    batch: int = 0                # steps done in this epoch
    losses: float = 0.0           # sum of the loss over the examples seen
    correct: int = 0
    seen: int = 0
    elapsed: float = 0.0          # seconds of training in this epoch so far
    events: list = field(default_factory=list)  # its pruning and settling lines


class Run:
    """Everything that lives across epochs: model, optimizers, cost, pruner, history."""

    def __init__(self, cfg: TrainConfig, ds: D.TrainingData, device: torch.device | None = None):
        self.cfg, self.ds = cfg, ds
        self.device = device or training_device(cfg.device)  # train() passes the one it resolved
        torch.manual_seed(cfg.seed)
        kw = {"image_size": ds.image_size} if cfg.model == "mlp" else {}
        gated = build_model(cfg.model, ds.in_channels, ds.num_classes, seed=cfg.seed, **kw)
        self.example = self._input(ds.example())
        self.model = compact(gated).train() if cfg.dense else gated
        self.model = self.model.to(self.device, memory_format=torch.channels_last)
        weights, gates = split_parameters(self.model)
        self.opt = torch.optim.SGD(weights, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   nesterov=True)
        self.steps_per_epoch = math.ceil(ds.num_train / cfg.batch_size)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self._check_last_batch()
        self.cost = self.pruner = self.theta_opt = self.settle_step = None
        if not cfg.dense:
            self.cost = ComplexityCost(self.model, self.example, cfg.lam, cfg.alpha, cfg.beta, cfg.target_flops,
                                       cfg.target_params, cfg.lam_lr, int(self._ramp_epochs() * self.steps_per_epoch))
            opt_cls = {"sgd": ThetaSGD, "adam": ThetaAdam}[cfg.theta_optimizer]
            self.theta_opt = opt_cls(gates, lr=cfg.theta_lr)
            self.warmup_steps = int(cfg.warmup_epochs * self.steps_per_epoch)
            settle = self._settle_epoch()
            self.settle_step = int(settle * self.steps_per_epoch) if settle > 0 else None
            if self.settle_step is not None and self.settle_step <= self.warmup_steps:
                raise ValueError(f"settling at epoch {settle:g} (step {self.settle_step}) comes before the warm-up "
                                 f"ends ({cfg.warmup_epochs:g} epochs, step {self.warmup_steps}, at "
                                 f"{self.steps_per_epoch} steps per epoch): no structure would have been learnt, and "
                                 "rounding thetas that all sit at 1 prunes everything; pass a later --settle-epoch, "
                                 "a shorter --warmup-epochs, or --settle-epoch 0")
            self.pruner = Pruner(self.model, cfg.prune_eps, cfg.patience, self.warmup_steps, cfg.prune_every)
        self.step = 0
        self.epoch = 0
        self.progress: EpochProgress | None = None  # of the epoch under way
        self._resumed_rng: dict | None = None  # torch's generators as a checkpoint within an epoch left them
        self.history: list[dict] = []
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def _check_last_batch(self) -> None:
        """A last batch of one example fails in a batch-norm layer whose feature maps are 1x1 (one value per
        channel to normalise), at the end of the first epoch: refused before any training."""
        n, b = self.ds.num_train, self.cfg.batch_size
        if n % b != 1 or self.steps_per_epoch < math.ceil(n / b):
            return
        if _smallest_batch_norm_map(self.model, self.example) == 1:
            raise ValueError(f"{n} training examples in batches of {b} (--batch-size) leave one example in the last "
                             "batch of each epoch, and this model's batch norm cannot train on a single example at "
                             "this image size (its smallest feature maps are 1x1): pass another --batch-size")

    def _settle_epoch(self) -> float:
        return _settle_epoch(self.cfg.settle_epoch, self.cfg.epochs)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch as the model takes it: on its device (copied as uint8, a quarter of the bytes),
        normalised, channels-last."""
        x = images.to(self.device, non_blocking=True)
        return D.normalize(x, self.ds).contiguous(memory_format=torch.channels_last)

    def _ramp_epochs(self) -> float:
        cfg = self.cfg
        if cfg.ramp_epochs is not None:
            return cfg.ramp_epochs
        settle = self._settle_epoch()
        end = settle if settle > 0 else cfg.epochs
        return max(0.0, 0.8 * (end - cfg.warmup_epochs))

    # ---- one epoch ----------------------------------------------------------------------------------
    def _set_lr(self) -> None:
        lr = 0.5 * self.cfg.lr * (1 + math.cos(math.pi * self.step / self.total_steps))
        for g in self.opt.param_groups:
            g["lr"] = lr

    def train_epoch(self, checkpoints: Checkpoints | None = None) -> dict:
        """Train the epoch under way to its end: a new one, or the rest of one a checkpoint stopped within."""
        cfg, spe = self.cfg, self.steps_per_epoch
        self.model.train()
        if self.progress is None:
            self.progress = EpochProgress(self.gen.get_state(), spe)
        p = self.progress
        self.gen.set_state(p.gen)  # the skipped batches' draws are made again (train_batches' start)
        it = self.ds.train_batches(self.epoch, cfg.batch_size, self.gen, cfg.augment, start=p.batch)
        desc = f"epoch {self.epoch + 1}/{cfg.epochs}" + (f" (resumed at step {p.batch})" if p.batch else "")
        start, stats = time.perf_counter() - p.elapsed, {}
        with tqdm(total=spe, initial=p.batch, desc=desc, leave=False, dynamic_ncols=True, mininterval=2.0) as bar:
            while p.batch < spe:
                xb, yb = next(it)
                if self._resumed_rng is not None:  # set after the first batch: a DataLoader draws a seed from
                    _set_torch_rng_state(self._resumed_rng)  # torch's generator as it starts, as the saved one had
                    self._resumed_rng = None
                stats = self._train_step(xb, yb) or stats
                p.elapsed = time.perf_counter() - start
                bar.update()
                if stats:
                    bar.set_postfix(loss=f"{p.losses / p.seen:.3f}", flops=f"{100 * stats['flops']:.0f}%",
                                    kept=f"{100 * stats.get('deployed_flops', stats['flops']):.0f}%",
                                    lam=f"{stats['lam']:.2f}", refresh=False)
                if checkpoints is not None and p.batch < spe:  # the epoch's end writes its own
                    checkpoints.within_epoch(self)
        self.progress = None
        return {"train_loss": p.losses / p.seen, "train_acc": p.correct / p.seen, "epoch_time": p.elapsed,
                "pruned": p.events, "lam": self.cost.lam if self.cost else None}

    def _train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> dict:
        """One step on a batch, counted in self.progress; returns the cost's statistics (none during the
        warm-up and once settled)."""
        model, p, stats = self.model, self.progress, {}
        x, yb = self._input(xb), yb.to(self.device, non_blocking=True)
        self._set_lr()
        out = model(x)
        loss = F.cross_entropy(out, yb)
        self.opt.zero_grad(set_to_none=True)
        if self.theta_opt is not None:
            self.theta_opt.zero_grad(set_to_none=True)
        loss.backward()
        learning_structure = self.cost is not None and not self.settled
        if learning_structure:
            if self.step >= self.warmup_steps:
                stats = self.cost.add_grad_()
            else:  # warm-up: weights settle before any structure is priced
                for g in self.theta_opt._gates:
                    g.theta.grad = None
        self.opt.step()
        if learning_structure:
            self.theta_opt.step()
            p.events += self.pruner.step([self.opt, self.theta_opt])
        self.step += 1
        if learning_structure and self.step == self.settle_step:
            p.events += self.settle()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged at epoch {self.epoch + 1}, step {self.step}: the loss is "
                                   f"{value}; lower --lr (or --theta-lr, --lam) and start again, or --resume from "
                                   "the last checkpoint with lower rates")
        p.losses += value * len(yb)
        p.correct += int((out.argmax(1) == yb).sum())
        p.seen += len(yb)
        p.batch += 1
        return stats

    @property
    def settled(self) -> bool:
        return self.settle_step is not None and self.step >= self.settle_step

    def settle(self) -> list[str]:
        """Round the structure at the threshold that meets the budget; thetas are fixed from here on."""
        threshold = self.cost.settle_threshold()
        events = self.pruner.settle(threshold, [self.opt, self.theta_opt])
        flops, params = self.cost.deployed_ratios()
        over = ""
        if self.cost.target is not None and (flops if self.cost.target_kind == "flops" else params) > self.cost.target:
            over = (f"; over the {100 * self.cost.target:.0f}% budget: the structures left all sit at theta 1, which "
                    "rounding keeps (train longer or with a larger --lam before settling)")
        return events + [f"settled at theta > {threshold:.3f}: FLOPs {100 * flops:.1f}%, params {100 * params:.1f}% "
                         f"of dense{over}; thetas fixed at 1 from here on"]

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> float:
        model = model or self.model
        model.eval()
        correct = seen = 0
        for xb, yb in self.ds.eval_batches(_eval_batch_size(self.ds.image_size, self.cfg.batch_size)):
            correct += int((model(self._input(xb)).argmax(1) == yb.to(self.device)).sum())
            seen += len(yb)
        return correct / seen

    def structure(self) -> dict:
        if self.cost is None:
            return {"flops": 1.0, "params": 1.0, "widths": [], "blocks_alive": None}
        with torch.no_grad():
            _, flops, params = self.cost.value()
        blocks = [m for m in self.model.modules() if isinstance(m, GatedResidualBlock)]
        # guard: compaction keeps one unit of a gate whose alive units all sit at theta 0 (keep_idx)
        deployed_flops, deployed_params = self.cost.deployed_ratios(guard=True)
        return {"flops": float(flops), "params": float(params), "deployed_flops": deployed_flops,
                "deployed_params": deployed_params, "widths": self.cost.complexity.per_layer(),
                "blocks_alive": sum(not b.is_pruned for b in blocks), "blocks_total": len(blocks)}

    # ---- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict:
        s = {"config": dataclasses.asdict(self.cfg), "model": self.model.state_dict(), "opt": self.opt.state_dict(),
             "step": self.step, "epoch": self.epoch, "history": self.history, "gen": self.gen.get_state(),
             "torch_rng": _torch_rng_state(), "data": _data_shape(self.ds)}
        if self.progress is not None:  # written within an epoch
            s["progress"] = dataclasses.asdict(self.progress)
        if self.cost is not None:
            s.update(theta_opt=self.theta_opt.state_dict(), cost=self.cost.state_dict(),
                     pruner=self.pruner.state_dict(), settle_step=self.settle_step)
        return s

    def load(self, s: dict) -> None:
        if not isinstance(s, dict) or not isinstance(s.get("config"), dict):
            raise CheckpointError("the checkpoint is not a cadk checkpoint (no 'config' entry; a bare state_dict "
                                  "or another program's file?): delete it or start without --resume")
        # The settings first: a whole checkpoint of another run (e.g. --dense, which has no theta_opt, cost,
        # pruner) is a mismatch to name, not an incomplete file to delete.
        saved = s["config"]
        for key in _fixed_settings(self.cfg):
            if saved.get(key, getattr(TrainConfig, key)) != getattr(self.cfg, key):
                raise CheckpointError(f"checkpoint was made with {key}={saved.get(key)!r}, this run has "
                                      f"{getattr(self.cfg, key)!r}: use the same settings or another --out-dir")
        if "data" in s and s["data"] != _data_shape(self.ds):  # checkpoints from before it was saved lack it
            raise CheckpointError(f"checkpoint was trained on {_describe(s['data'])}, but the data of this run "
                                  f"(--data-dir {self.cfg.data_dir or 'default'}) has {_describe(_data_shape(self.ds))}: "
                                  "resume with the run's --data-dir, or start a new run in another --out-dir")
        needed = ["model", "opt", "step", "epoch", "history", "gen"]
        if self.cost is not None:
            needed += ["theta_opt", "cost", "pruner"]
        missing = [key for key in needed if key not in s]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {missing}: it is incomplete or corrupt; delete it or start "
                                  "without --resume")
        try:
            self.model.load_state_dict(s["model"])
            _load_keeping_settings(self.opt, s["opt"])
            if self.cost is not None:
                _load_keeping_settings(self.theta_opt, s["theta_opt"])
                self.cost.load_state_dict(s["cost"])
                if self.cost.target is None:  # a fixed lam is a setting; in target mode it is state (adapted)
                    self.cost.lam = float(self.cfg.lam)
                self.pruner.load_state_dict(s["pruner"])
            self.step, self.epoch, self.history = int(s["step"]), int(s["epoch"]), list(s["history"])
            if self.cost is not None:
                self._resume_settling(s)
            self.gen.set_state(s["gen"])
            if "torch_rng" in s:  # checkpoints from before gate seeds were drawn from torch's generator lack it
                _set_torch_rng_state(s["torch_rng"])
            if s.get("progress") is not None:
                self.progress = EpochProgress(**s["progress"])
                self._resumed_rng = s["torch_rng"]
        except torch.OutOfMemoryError:  # a RuntimeError, but no fault of the checkpoint: not one to delete
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"the checkpoint does not fit this run ({type(e).__name__}: {e}); it is corrupt "
                                  "or from another version: delete it or start without --resume") from e
        self._check_steps()
        if self.epoch + (self.progress is not None) > self.cfg.epochs:  # finish() would report more epochs than set
            within = f" and part of epoch {self.epoch + 1}" if self.progress else ""
            raise CheckpointError(f"the checkpoint has {self.epoch} epochs done{within}, more than --epochs "
                                  f"{self.cfg.epochs}: pass --epochs {self.epoch + (self.progress is not None)} or "
                                  "more to resume it")

    def _check_steps(self) -> None:
        """The schedules count steps: a checkpoint's epochs must have this run's steps."""
        p, spe = self.progress, self.steps_per_epoch
        if p is not None and not 0 < p.batch < p.steps_per_epoch:
            raise CheckpointError(f"the checkpoint was written after step {p.batch} of an epoch of "
                                  f"{p.steps_per_epoch} steps: it is corrupt; delete it or start without --resume")
        saved = p.steps_per_epoch if p else self.step // self.epoch if self.epoch else spe
        if saved != spe or self.step != self.epoch * spe + (p.batch if p else 0):
            raise CheckpointError(f"the checkpoint's epochs had {saved} steps each, this run's have "
                                  f"{self.steps_per_epoch} ({self.ds.num_train} training examples in batches of "
                                  f"{self.cfg.batch_size}): learning rate, warm-up, pruning and settling count steps, "
                                  "so resume with the run's --batch-size and --max-steps-per-epoch, on its data "
                                  "(--data-dir)")

    def _resume_settling(self, s: dict) -> None:
        """The settle step comes from --epochs/--settle-epoch, which a resumed run may change: a run
        that has settled stays settled (its thetas were fixed at 1; recomputing the step un-settled it and
        rounded the structure a second time), and one whose new settle step has already passed settles now
        (it was never rounded, and `settled` would have frozen its fractional thetas)."""
        if "settle_step" in s:
            saved = s["settle_step"]
        else:  # checkpoints from before the settle step was saved: the saved settings give it
            epoch = _settle_epoch(s["config"].get("settle_epoch"), s["config"].get("epochs", self.cfg.epochs))
            saved = int(epoch * self.steps_per_epoch) if epoch > 0 else None
        if saved is not None and self.step >= saved:
            self.settle_step = int(saved)
        elif self.settle_step is not None and self.settle_step <= self.step:
            self.settle_step = self.step + 1


def _smallest_batch_norm_map(model: nn.Module, example: torch.Tensor) -> int | None:
    """The fewest values per channel that one example gives a batch-norm layer of model (None: it has none).
    A gated conv runs its BN inside its own op, so its output is what the BN saw."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: sizes.append(out.shape[2:].numel()))
             for m in model.modules()
             if isinstance(m, nn.BatchNorm2d) or isinstance(getattr(m, "bn", None), nn.BatchNorm2d)]
    try:
        with eval_mode(model), torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return min(sizes, default=None)


def _data_shape(ds: D.TrainingData) -> dict:
    """What the model's shapes follow from the data: another dataset under the same --data fails to load into
    them (a state_dict size mismatch, which read as a corrupt checkpoint)."""
    return {"num_classes": ds.num_classes, "in_channels": ds.in_channels, "image_size": ds.image_size}


def _describe(shape) -> str:
    try:
        return f"{shape['num_classes']} classes of {shape['in_channels']}-channel {shape['image_size']}px images"
    except (TypeError, KeyError):
        return repr(shape)


def _eval_batch_size(image_size: int, batch_size: int) -> int:
    """500 images up to 32x32; about as many pixels for larger ones, but never fewer images than a training
    batch (which fits in memory with its gradients)."""
    return min(500, max(batch_size, 500 * 32 * 32 // image_size ** 2))


def _load_keeping_settings(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer's state (momentum, Adam moments) but keep this run's settings: load_state_dict also
    brings back the saved lr, weight decay, ..., which silently overrode the flags of a resumed run."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, own in zip(opt.param_groups, settings):
        group.update(own)


def training_device(name: str | None) -> torch.device:
    """--device: CUDA by default where there is a GPU; a device that is not there is refused up front."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device: pass cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: cadk trains on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; pass --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _fixed_settings(cfg: TrainConfig) -> tuple[str, ...]:
    """What a resumed run must share with its checkpoint: the seed's draws are all in the checkpoint, and
    the crops of a streamed dataset have the size the model was trained on."""
    fixed = ("model", "data", "dense", "seed")
    return fixed + ("image_size",) if cfg.data in D.FOLDER_DATASETS else fixed


def _changed_settings(saved: dict, cfg: TrainConfig, settled: bool = False) -> str:
    """The settings a resumed run changes, for the log: they apply from its first step on. With a budget,
    lam is the controller's state, which the checkpoint brings back: --lam (its starting value) changes
    nothing then, and is not named as a change; nor is --settle-epoch once the run has settled (the
    structure stays as it was rounded)."""
    ignore = ("resume", "overwrite", "history", "out_dir", "data_dir", "threads", "workers")
    if cfg.target_flops is not None or cfg.target_params is not None:
        ignore += ("lam",)
    if settled:
        ignore += ("settle_epoch",)
    changes = [f"{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k in saved and k not in ignore and saved[k] != v]
    return f"; from here on with {', '.join(changes)}" if changes else ""


# What a run writes in its out-dir (the compacted model: compact_paths of MODEL_PREFIX)
CHECKPOINT, REPORT, PLOT, MODEL_PREFIX = "checkpoint.pt", "report.json", "report.png", "model_compact"


def _remove_run(out_dir: str) -> None:
    """Delete the files of the run in out_dir that --overwrite replaces."""
    models = compact_paths(os.path.join(out_dir, MODEL_PREFIX)).values()
    for path in [*(os.path.join(out_dir, name) for name in (CHECKPOINT, REPORT, PLOT)), *models]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _settle_epoch(settle_epoch: float | None, epochs: float) -> float:
    """The epoch at which the structure is rounded: --settle-epoch, by default 40% of the run."""
    return settle_epoch if settle_epoch is not None else 0.4 * epochs


def _torch_rng_state() -> dict:
    """torch's generator states (CPU, and every CUDA device in use): the gates' draws continue from them."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_torch_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():  # devices this process sees, however many it saved
        for device, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is corrupt or "
                              "not a cadk checkpoint: delete it or start without --resume") from e


def _format_epoch(rec: dict) -> str:
    line = (f"epoch {rec['epoch']:3d} | loss {rec['train_loss']:.4f} | test acc {100 * rec['test_acc']:.2f}% | "
            f"E[FLOPs] {100 * rec['flops']:.1f}% | E[params] {100 * rec['params']:.1f}% | time {rec['epoch_time']:.1f}s")
    if "deployed_flops" in rec:
        line += f" | compacted now: FLOPs {100 * rec['deployed_flops']:.1f}% params {100 * rec['deployed_params']:.1f}%"
    if rec.get("blocks_alive") is not None:
        widths = " ".join(f"{w['alive']}" for w in rec["widths"])
        blocks = f" | blocks {rec['blocks_alive']}/{rec['blocks_total']}" if rec["blocks_total"] else ""
        line += f"{blocks} | lam {rec['lam']:.3f} | widths {widths}"
    return line


# Each numeric flag's range: (low, high, low included, high included); high None: no upper bound. A flag
# left at None (its default chosen later) is not checked. Checked before anything is read, so the error
# names the flag rather than coming later from the optimizers, cost or pruner under their own names
# (torch's "Invalid learning rate: -1.0").
_RANGES = {"epochs": (1, None, True, True), "batch_size": (1, None, True, True), "threads": (0, None, True, True),
           "max_steps_per_epoch": (0, None, True, True), "image_size": (1, None, True, True),
           "checkpoint_minutes": (0, None, True, True), "checkpoint_every": (0, None, True, True),
           "workers": (0, None, True, True), "settle_epoch": (0, None, True, True),
           "ramp_epochs": (0, None, True, True),
           "lr": (0, None, True, True), "weight_decay": (0, None, True, True), "theta_lr": (0, None, True, True),
           "lam": (0, None, True, True), "alpha": (0, None, True, True), "beta": (0, 1, True, True),
           "lam_lr": (0, None, True, True), "target_flops": (0, 1, False, True), "target_params": (0, 1, False, True),
           "prune_eps": (0, 1, True, False), "patience": (1, None, True, True), "prune_every": (1, None, True, True),
           "warmup_epochs": (0, None, True, True)}


def _check_ranges(cfg: TrainConfig) -> None:
    for name, (low, high, low_in, high_in) in _RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        below = value < low if low_in else value <= low
        above = high is not None and (value > high if high_in else value >= high)
        if not (below or above):
            continue
        flag = f"--{name.replace('_', '-')}"
        if high is None and low_in:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
        span = f"{'[' if low_in else '('}{low}, {'inf)' if high is None else str(high) + (']' if high_in else ')')}"
        raise ValueError(f"{flag} must lie in {span}, got {value}")


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot mean anything, naming the flag, before any data is read or file written."""
    for f in dataclasses.fields(cfg):  # every number: a NaN one made report.json invalid JSON, inf ones tracebacks
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    _check_ranges(cfg)
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out-dir {cfg.out_dir} is an existing file, not a folder: pass another --out-dir")


def train(cfg: TrainConfig, log=print) -> dict:
    check_config(cfg)
    device = training_device(cfg.device)  # before anything is read or written
    # The training GPU is the current one while the run lasts: Triton kernels launch on the current device and
    # stream, whatever device their tensors are on, and the loaders pin batches for it (cuda:1 ran on GPU 0).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _train(cfg, device, log)


def _check_run_files(cfg: TrainConfig, ckpt: str) -> None:
    """--resume and --overwrite against what the out-dir holds: checked before the data loads, and again
    once the out-dir is locked (a run that held it may have written or removed its checkpoint since)."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")
    if not (cfg.resume or cfg.overwrite) and os.path.exists(ckpt):  # it would go without a word
        raise CheckpointError(f"{cfg.out_dir} holds a run (checkpoint.pt): pass --resume to continue it, --overwrite "
                              "to replace it with this one, or another --out-dir")
    if cfg.resume and not os.path.exists(ckpt):
        raise CheckpointError(f"--resume: no checkpoint at {ckpt}")


def _train(cfg: TrainConfig, device: torch.device, log) -> dict:
    ckpt = os.path.join(cfg.out_dir, CHECKPOINT)
    _check_run_files(cfg, ckpt)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    created = not os.path.isdir(cfg.out_dir)
    try:  # before the data loads (an ImageNet scan takes minutes): a bad --out-dir fails at once
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:  # a file on its path, a read-only file system, no permission
        raise ValueError(f"--out-dir {cfg.out_dir} cannot be created ({e.strerror}): pass a folder you can write "
                         "to") from e
    with _out_dir_lock(cfg.out_dir):
        try:
            ds = D.load_dataset(cfg.data, cfg.data_dir, cfg.image_size, cfg.workers, cfg.seed,
                                device.type == "cuda")
            return _run(Run(cfg, ds, device), ckpt, log)
        except BaseException:
            if created:
                _remove_if_unused(cfg.out_dir)
            raise


def _remove_if_unused(out_dir: str) -> None:
    """An out-dir this run made and left holding only its lock file (it failed before writing anything);
    removed while the lock is held, so no other run can be using it."""
    try:
        if os.listdir(out_dir) == [".lock"]:
            os.remove(os.path.join(out_dir, ".lock"))
        os.rmdir(out_dir)
    except OSError:  # something else is there: leave it
        pass


def _run(run: Run, ckpt: str, log) -> dict:
    cfg = run.cfg
    _check_run_files(cfg, ckpt)
    remove_partial_writes(cfg.out_dir)  # one process writes to an out-dir: its leftovers are from a killed run
    if cfg.overwrite:  # now, not as this run writes its own: stopped before, it left the old run to --resume
        _remove_run(cfg.out_dir)
    if cfg.resume:
        state = load_checkpoint(ckpt)
        run.load(state)
        where = (f"in epoch {run.epoch + 1} after step {run.progress.batch} of {run.steps_per_epoch}" if run.progress
                 else f"at epoch {run.epoch}")
        log(f"resumed from {ckpt} {where}{_changed_settings(state['config'], cfg, run.settled)}")
    if run.cost is not None:
        c = run.cost.complexity
        log(f"{cfg.model}: dense {c.dense_flops / 1e6:.1f} MFLOPs, {c.dense_params / 1e3:.1f}k params, "
            f"{len(c.gates())} gates, on {run.device}, backend {__import__('cadk').kernels.backend_for(run.device)}")
    checkpoints = Checkpoints(ckpt, cfg, log)
    while run.epoch < cfg.epochs:
        rec = run.train_epoch(checkpoints)
        run.epoch += 1
        rec.update(epoch=run.epoch, test_acc=run.evaluate(), **run.structure())
        run.history.append(rec)
        log(_format_epoch(rec))
        for ev in rec["pruned"]:
            log(f"    {ev}")
        checkpoints.write(run)
    return finish(run, log)


class Checkpoints:
    """Writes a run's checkpoint: at each epoch's end, and within an epoch every --checkpoint-every steps
    and once --checkpoint-minutes have passed since the last write (of either kind)."""

    def __init__(self, path: str, cfg: TrainConfig, log):
        self.path, self.every, self.seconds, self.log = path, cfg.checkpoint_every, 60 * cfg.checkpoint_minutes, log
        self.last = time.perf_counter()

    def write(self, run: Run) -> float:
        """Write it atomically; returns the seconds it took. It draws nothing and leaves the model as it was."""
        start = time.perf_counter()
        atomic_write(self.path, lambda f: torch.save(run.state(), f))
        self.last = time.perf_counter()
        return self.last - start

    def within_epoch(self, run: Run) -> None:
        """After a step that did not end its epoch: write one if it is due, and say so."""
        due_steps = self.every and run.step % self.every == 0
        if not (due_steps or self.seconds and time.perf_counter() - self.last >= self.seconds):
            return
        seconds = self.write(run)
        with tqdm.external_write_mode():  # a line of its own, not one through the progress bar
            self.log(f"    checkpoint in epoch {run.epoch + 1} after step {run.progress.batch} of "
                     f"{run.steps_per_epoch} ({seconds:.2f}s to write)")


@contextlib.contextmanager
def _out_dir_lock(out_dir: str):
    """Hold OUT_DIR/.lock while the run lasts: a second run in the same folder would overwrite the first's
    checkpoint and delete its partial writes. The system drops the lock when its process dies, so a killed
    run leaves none behind. Without fcntl (not POSIX) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        f = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:  # the first file a run writes there: an out-dir it cannot write to fails here
        raise ValueError(f"--out-dir {out_dir} cannot be written to ({e.strerror}): pass a folder you can write "
                         "to") from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise CheckpointError(f"{out_dir} is in use by another cadk train (process {f.read().strip() or '?'}): "
                                  "wait for it to end or pass another --out-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def finish(run: Run, log=print) -> dict:
    from .report import plot_run

    cfg = run.cfg
    model = run.model.eval()
    plain = model if cfg.dense else compact(model)
    example = run.example[:1].contiguous(memory_format=torch.channels_last)
    acc_gated = run.evaluate(model)
    acc_plain = acc_gated if cfg.dense else run.evaluate(plain)
    dense_ref = compact(build_model(cfg.model, run.ds.in_channels, run.ds.num_classes,
                                    **({"image_size": run.ds.image_size} if cfg.model == "mlp" else {})))
    dense_flops, dense_params = flop_count(dense_ref.to(example.device), example), param_count(dense_ref)
    flops, params = flop_count(plain, example), param_count(plain)
    # saved from the CPU: the files load on any machine, and .to(device) takes them to a GPU
    paths = save_compact(copy.deepcopy(plain).cpu(), example.cpu(), os.path.join(cfg.out_dir, MODEL_PREFIX))
    report = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "history"},
        "device": str(run.device),
        "test_acc_gated": acc_gated, "test_acc_compact": acc_plain,
        "flops": flops, "params": params, "dense_flops": dense_flops, "dense_params": dense_params,
        "flops_ratio": flops / dense_flops, "params_ratio": params / dense_params,
        "first_epoch_time": run.history[0]["epoch_time"], "last_epoch_time": run.history[-1]["epoch_time"],
        "history": run.history, "artifacts": paths,
    }
    try:
        report["artifacts"]["plot"] = plot_run(report, os.path.join(cfg.out_dir, PLOT))
    except ImportError as e:  # an install without it (pip --no-deps) still gets its model and report
        log(f"report.png not written: {e} (pip install matplotlib)")
    atomic_write_json(os.path.join(cfg.out_dir, REPORT), report)
    log(f"final: test acc {100 * acc_plain:.2f}% (compacted) / {100 * acc_gated:.2f}% (gated) | FLOPs "
        f"{flops / 1e6:.2f}M = {100 * report['flops_ratio']:.1f}% of dense | params {params} = "
        f"{100 * report['params_ratio']:.1f}% | epoch time first {report['first_epoch_time']:.1f}s, last "
        f"{report['last_epoch_time']:.1f}s | wrote {cfg.out_dir}")
    return report
