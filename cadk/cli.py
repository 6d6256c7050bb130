"""Command line: `cadk train ...` (the main job) and `cadk info`."""
from __future__ import annotations

import argparse
import os
import sys


def _info() -> int:
    import platform

    import torch

    from . import __version__, kernels

    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    print(f"cadk {__version__} | python {platform.python_version()} | torch {torch.__version__} | triton {triton_v}")
    print(f"CUDA available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    print(f"backends registered: {', '.join(kernels.available_backends())}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    forced = os.environ.get("CADK_BACKEND", "auto")
    for d in devices:
        print(f"  {d.type}: active backend {kernels.backend_for(d)}"
              + (f" (CADK_BACKEND={forced})" if forced != "auto" else ""))
    if "triton" in kernels.available_backends():
        from .kernels import triton_backend

        print(f"triton gated_linear matmul: {triton_backend.LINEAR_MATMUL} (CADK_TRITON_LINEAR=auto|torch|fused)")
    return 0


def _train_parser(sub) -> None:
    from .data import DATASETS
    from .training import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train + prune + compact a gated model on real data, with a report")
    p.add_argument("--model", default=d.model, help="resnet20/32/44/56/110, resnet18/34/50, vgg11/16, mlp")
    p.add_argument("--data", default=d.data, choices=DATASETS,
                   help="imagenet: ILSVRC2012 class folders; imagefolder: any class-folder dataset (README)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="imagenet/imagefolder: side of the square crops the model sees")
    p.add_argument("--workers", type=int, default=None,
                   help="imagenet/imagefolder: processes decoding images (default: min(8, CPU count); 0: none, "
                        "decode in the training process)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--lam", type=float, default=d.lam, help="accuracy vs complexity (initial value with a target)")
    p.add_argument("--target-flops", type=float, default=None, help="FLOPs budget as a fraction of dense; adapts lam")
    p.add_argument("--target-params", type=float, default=None, help="params budget as a fraction of dense")
    p.add_argument("--alpha", type=float, default=d.alpha, help="layer vs unit pruning (scales layer gates' price)")
    p.add_argument("--beta", type=float, default=d.beta, help="FLOPs (1) vs parameters (0) in the cost")
    p.add_argument("--lam-lr", type=float, default=d.lam_lr,
                   help="target mode: relative step of lam per step (lam *= exp(lam_lr * error))")
    p.add_argument("--ramp-epochs", type=float, default=d.ramp_epochs,
                   help="target mode: epochs after the warm-up over which the budget anneals from 1 to the target "
                        "(default: 80%% of the time between warm-up and settling)")
    p.add_argument("--settle-epoch", type=float, default=d.settle_epoch,
                   help="round the structure here (theta > threshold meeting the budget) and fix it "
                        "(default: at 40%% of the epochs; 0: never)")
    p.add_argument("--theta-optimizer", choices=["sgd", "adam"], default=d.theta_optimizer)
    p.add_argument("--theta-lr", type=float, default=d.theta_lr)
    p.add_argument("--prune-eps", type=float, default=d.prune_eps)
    p.add_argument("--patience", type=int, default=d.patience, help="steps at theta=0 before pruning")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--prune-every", type=int, default=d.prune_every)
    p.add_argument("--dense", action="store_true", help="train the same architecture without gates")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default of returning freed memory to the system; by default this "
                        "process keeps it, which saves the page faults of each step's activations "
                        "(cadk.utils.keep_freed_memory)")
    p.add_argument("--out-dir", default=None, help="where checkpoints, report and compacted model go "
                   "(default: runs/MODEL-DATA-cadk-sSEED, -dense- with --dense)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes,
                   help="within an epoch, write a checkpoint once this many minutes have passed since the last "
                        "(default: %(default)g; 0: at epoch ends only)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="within an epoch, write a checkpoint every this many steps (default: 0, none)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an OUT_DIR that holds one (without it, that is refused)")
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cadk", description="complexity-aware training for PyTorch")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions and active kernel backends")
    _train_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return _info()
    from .data import DatasetError
    from .training import CheckpointError, TrainConfig, TrainingDiverged, train
    from .utils import keep_freed_memory

    if not args.system_malloc:
        keep_freed_memory()
    skip = ("cmd", "system_malloc")
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k not in skip and v is not None})
    if args.out_dir is None:
        cfg.out_dir = f"runs/{cfg.model}-{cfg.data}-{'dense' if cfg.dense else 'cadk'}-s{cfg.seed}"
    try:
        train(cfg)
    except (DatasetError, CheckpointError, TrainingDiverged, ValueError) as e:
        print(f"cadk: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
