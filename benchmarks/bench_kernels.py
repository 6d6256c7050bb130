"""Forward+backward time of cadk's gated layers against masked-dense and compact-dense baselines.

For each layer and keep ratio (kept fraction of input AND output channels, as between two pruned
layers) it times, in one run and round-robin so drift hits all variants alike (each round in a fresh
random order: a variant's time depends on what the one before it left in the caches):
  gated[<backend>]  the cadk op (ReLU + gate sampled from theta) on each backend for the device;
  masked            the full-size dense op, then a 0/1 output-channel mask (what pruning by masks,
                    e.g. torch.nn.utils.prune, costs);
  floor             the plain dense op on the compacted shapes (small weights, no gate): the floor.
  full-size         the floor's op on a weight and bias gathered from the full-size parameters every
                    step, its gradients written back into full-size zero gradients, in plain PyTorch:
                    the floor under the contract the gated ops keep (parameters and gradients stay
                    full-size, so optimizer state and DDP buckets keep their shapes), without gates.
and prints medians with the ratios gated/floor, gated/masked and gated/full-size. `--layers residual` times a residual
block's gated output instead (the Residual class below: fused op, unfused ops, masked, floor), `conv-bn` a
conv-BN-ReLU layer (the ConvBN class: the fused BN op, the unfused ops, masked, floor). `sequence` is the
linear layer on [N, T, features] inputs, as GatedLinear runs them (one gate per example and unit, the positions
through a 1x1 gated conv on a channels-last view); N x T equals the linear layer's batch.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--small] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import importlib
import random
import statistics
import time

import torch
import torch.nn.functional as F

import cadk.kernels as kernels
from cadk.kernels.reference import gate_examples, linear_over_positions
from cadk.utils import atomic_write_json, keep_freed_memory

KEEPS = (1.0, 0.75, 0.5, 0.25, 0.1)
BACKENDS = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


SIZES = {
    # Per-call overhead: the host work around a layer's kernels, which small networks pay per layer.
    "tiny": {"linear": dict(batch=2, c_in=8, c_out=8),
             "sequence": dict(batch=2, positions=3, c_in=8, c_out=8),
             "conv3x3": dict(batch=1, c_in=4, c_out=4, hw=4),
             "conv1x1": dict(batch=1, c_in=4, c_out=4, hw=4),
             "residual": dict(batch=1, c_in=4, c_out=4, hw=4)},
    "small": {"linear": dict(batch=128, c_in=256, c_out=256),
              "sequence": dict(batch=4, positions=32, c_in=256, c_out=256),
              "conv3x3": dict(batch=16, c_in=32, c_out=32, hw=16),
              "conv1x1": dict(batch=16, c_in=64, c_out=64, hw=8),
              "residual": dict(batch=16, c_in=32, c_out=32, hw=16)},
    "default": {"linear": dict(batch=512, c_in=1024, c_out=1024),
                "sequence": dict(batch=8, positions=64, c_in=1024, c_out=1024),
                "conv3x3": dict(batch=128, c_in=64, c_out=64, hw=32),
                "conv1x1": dict(batch=32, c_in=256, c_out=256, hw=14),
                "residual": dict(batch=128, c_in=64, c_out=64, hw=32)},
    # Enough work to keep a data-centre GPU busy, so launch and host overheads do not dominate.
    "large": {"linear": dict(batch=4096, c_in=4096, c_out=4096),
              "sequence": dict(batch=64, positions=64, c_in=4096, c_out=4096),
              "conv3x3": dict(batch=128, c_in=128, c_out=128, hw=56),
              "conv1x1": dict(batch=128, c_in=1024, c_out=1024, hw=14),
              "residual": dict(batch=128, c_in=128, c_out=128, hw=56)},
}
for _shapes in SIZES.values():  # a conv-BN-ReLU layer on the 3x3 conv's shapes
    _shapes["conv-bn"] = _shapes["conv3x3"]


def alive_subset(full: int, keep: float, gen: torch.Generator) -> torch.Tensor:
    count = max(1, round(keep * full))
    return torch.randperm(full, generator=gen)[:count].sort().values


class Layer:
    """Tensors of one (layer, keep) point and a forward+backward closure per variant."""

    def __init__(self, kind: str, spec: dict, keep: float, device, dtype, fmt, gen, frozen: bool = False):
        self.kind, self.fmt = kind, fmt
        self.frozen = (1, 2) if frozen else ()  # leaves that need no gradient: weight and bias, when frozen
        c_in, c_out, n = spec["c_in"], spec["c_out"], spec["batch"]
        self.alive_in = alive_subset(c_in, keep, gen).to(device)
        self.alive_out = alive_subset(c_out, keep, gen).to(device)
        self.cdim = -1 if kind == "sequence" else 1  # the channel dim of activations
        spatial = (spec["hw"], spec["hw"]) if kind.startswith("conv") else ()
        k = 1 if kind == "conv1x1" else 3
        taps = (k, k) if spatial else ()
        self.padding = k // 2  # the output keeps the input's size
        opts = dict(device=device, dtype=dtype)
        self.weight = torch.randn(c_out, c_in, *taps, **opts) * (c_in * (k * k if taps else 1)) ** -0.5
        self.bias = torch.randn(c_out, **opts) * 0.1
        self.theta = torch.full((c_out,), 0.5, device=device)
        self.seed = torch.tensor(12345, dtype=torch.int64, device=device)  # where training keeps it: the gate's device
        self.x_full = self._format(torch.randn(*self._shape(n, c_in, spatial, spec), **opts))
        self.mask_out = torch.zeros(c_out, **opts)
        self.mask_out[self.alive_out] = 1
        dead_in = torch.ones(c_in, dtype=torch.bool, device=device).index_fill_(0, self.alive_in, False)
        self.x_full.index_fill_(self.cdim, dead_in.nonzero().flatten(), 0)
        self.x = self._format(self.x_full.index_select(self.cdim, self.alive_in))
        self.w_compact = self._format(self.weight[self.alive_out][:, self.alive_in].contiguous())
        self.b_compact = self.bias[self.alive_out].contiguous()
        self.weight = self._format(self.weight)
        out_spatial = spatial  # stride 1, padding 1
        self.grad_y = self._format(torch.randn(*self._shape(n, len(self.alive_out), out_spatial, spec), **opts))
        self.grad_full = self._format(torch.randn(*self._shape(n, c_out, out_spatial, spec), **opts))

    def _shape(self, n: int, channels: int, spatial: tuple, spec: dict) -> tuple:
        return (n, spec["positions"], channels) if self.kind == "sequence" else (n, channels, *spatial)

    def _format(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=self.fmt) if t.dim() == 4 else t

    def _dense(self, x, w, b):
        return F.conv2d(x, w, b, padding=self.padding) if self.kind.startswith("conv") else F.linear(x, w, b)

    def gated(self, backend: str):
        """backend "triton:fused" / "triton:torch": the Triton backend with that LINEAR_MATMUL."""
        backend, _, matmul = backend.partition(":")
        module = backend_module(backend)
        leaves = [self.x, self.weight, self.bias, self.theta]

        def step():
            x, w, b, th = leaves
            if self.kind.startswith("conv"):
                y = module.gated_conv2d(x, w, b, th, self.alive_in, self.alive_out, self.seed, (1, 1),
                                        (self.padding,) * 2, (1, 1), "relu", True)
            elif self.kind == "sequence":  # as GatedLinear runs [N, T, features]
                y = linear_over_positions(module.gated_conv2d, module.gated_linear, x, w, b, th, self.alive_in,
                                          self.alive_out, self.seed, "relu", True)
            else:
                default = getattr(module, "LINEAR_MATMUL", None)
                if matmul:
                    module.LINEAR_MATMUL = matmul
                try:
                    y = module.gated_linear(x, w, b, th, self.alive_in, self.alive_out, self.seed, "relu", True)
                finally:
                    if matmul:
                        module.LINEAR_MATMUL = default
            y.backward(self.grad_y)
        return _with_leaves(leaves, step, self.frozen)

    def masked(self):
        leaves = [self.x_full, self.weight, self.bias]
        shape = (-1,) if self.cdim == -1 else (1, -1) + (1,) * (self.x_full.dim() - 2)

        def step():
            y = F.relu(self._dense(*leaves)) * self.mask_out.view(shape)
            y.backward(self.grad_full)
        return _with_leaves(leaves, step, self.frozen)

    def floor(self):
        leaves = [self.x, self.w_compact, self.b_compact]

        def step():
            F.relu(self._dense(*leaves)).backward(self.grad_y)
        return _with_leaves(leaves, step, self.frozen)

    def full_size(self):
        leaves = [self.x, self.weight, self.bias]
        ao, ai = self.alive_out, self.alive_in
        flat = (ao[:, None] * self.weight.shape[1] + ai).reshape(-1)  # linear: one take and one put

        def step():
            x, weight, bias = leaves
            with torch.no_grad():  # the fastest plain gathers measured here, as a hand-written compaction
                if weight.dim() == 2:
                    w = weight.view(-1).index_select(0, flat).view(len(ao), len(ai))
                else:
                    w = self._format(weight.index_select(0, ao).index_select(1, ai))
                w.requires_grad_(not self.frozen)
                b = bias[ao].requires_grad_(not self.frozen)
            F.relu(self._dense(x, w, b)).backward(self.grad_y)
            if self.frozen:
                return
            if weight.dim() == 2:
                weight.grad = torch.zeros_like(weight).view(-1).index_copy_(0, flat, w.grad.view(-1)).view_as(weight)
            else:
                weight.grad = torch.zeros_like(weight).index_put_((ao[:, None], ai), w.grad)
            bias.grad = torch.zeros_like(bias).index_copy_(0, ao, b.grad)
        return _with_leaves(leaves, step, self.frozen)


class ConvBN:
    """A conv-BN-ReLU layer (3x3 conv without bias, BatchNorm2d in training, ReLU, unit gate), as
    GatedConv2d(batch_norm=True) runs it: gated[<backend>] the gated conv, then the fused bn_gate_act
    (statistics over the alive channels, gate and ReLU in one pass); unfused[<backend>] the gated conv,
    then F.batch_norm on the alive channels' parameters, ReLU and the backend's gate_apply; masked the
    full-size conv, BN and ReLU times a 0/1 channel mask; floor the compacted conv, BN and ReLU."""

    def __init__(self, spec: dict, keep: float, device, dtype, fmt, gen):
        self.conv = Layer("conv3x3", spec, keep, device, dtype, fmt, gen)
        # BN parameters and statistics in float32 (float64 for float64 data), as nn.BatchNorm2d keeps them
        c_out, opts = spec["c_out"], dict(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        self.gamma, self.beta = torch.rand(c_out, **opts) + 0.5, torch.randn(c_out, **opts) * 0.1
        self.running = [(torch.zeros(c_out, **opts), torch.ones(c_out, **opts)) for _ in range(4)]
        ao = self.conv.alive_out
        self.gamma_compact, self.beta_compact = self.gamma[ao].clone(), self.beta[ao].clone()

    @staticmethod
    def _bn_relu(z, gamma, beta, stats):
        return F.relu(F.batch_norm(z, *stats, gamma, beta, training=True))

    def _gated_conv(self, module, x, w):
        c = self.conv
        return module.gated_conv2d(x, w, None, None, c.alive_in, c.alive_out, c.seed, (1, 1), (1, 1), (1, 1),
                                   "none", True)

    def gated(self, backend: str):
        module, c = backend_module(backend), self.conv
        leaves, stats = [c.x, c.weight, self.gamma, self.beta, c.theta], self.running[0]

        def step():
            x, w, gamma, beta, th = leaves
            y = module.bn_gate_act(self._gated_conv(module, x, w), gamma, beta, *stats, th, c.alive_out, c.seed,
                                   0.1, 1e-5, "relu", True)
            y.backward(c.grad_y)
        return _with_leaves(leaves, step)

    def unfused(self, backend: str):
        module, c = backend_module(backend), self.conv
        leaves = [c.x, c.weight, self.gamma, self.beta, c.theta]
        stats = [s[c.alive_out] for s in self.running[1]]  # F.batch_norm updates copies of the alive entries

        def step():
            x, w, gamma, beta, th = leaves
            pre = self._bn_relu(self._gated_conv(module, x, w), gamma.index_select(0, c.alive_out),
                                beta.index_select(0, c.alive_out), stats)
            module.gate_apply(pre, th, c.alive_out, c.seed, True).backward(c.grad_y)
        return _with_leaves(leaves, step)

    def masked(self):
        c, stats = self.conv, self.running[2]
        leaves, mask = [c.x_full, c.weight, self.gamma, self.beta], c.mask_out.view(1, -1, 1, 1)

        def step():
            x, w, gamma, beta = leaves
            (self._bn_relu(F.conv2d(x, w, padding=1), gamma, beta, stats) * mask).backward(c.grad_full)
        return _with_leaves(leaves, step)

    def floor(self):
        c = self.conv
        leaves, stats = [c.x, c.w_compact, self.gamma_compact, self.beta_compact], [s[c.alive_out] for s in self.running[3]]

        def step():
            x, w, gamma, beta = leaves
            self._bn_relu(F.conv2d(x, w, padding=1), gamma, beta, stats).backward(c.grad_y)
        return _with_leaves(leaves, step)


class Residual:
    """A residual block's output relu(shortcut + xi[n] * branch) over the stream's kept channels:
    gated[<backend>] the fused op; unfused[<backend>] the backend's gate_apply, then add and ReLU (what a
    block cost before the fused op); masked the same sum at full width, the gate a plain multiply;
    floor the compacted block's relu(shortcut + branch)."""

    def __init__(self, spec: dict, keep: float, device, dtype, fmt, gen):
        n, c, hw = spec["batch"], spec["c_out"], spec["hw"]
        alive = alive_subset(c, keep, gen)
        opts = dict(device=device, dtype=dtype)

        def make(channels):
            return torch.randn(n, channels, hw, hw, **opts).contiguous(memory_format=fmt)
        self.shortcut, self.branch = make(alive.numel()), make(alive.numel())
        self.shortcut_full, self.branch_full = make(c), make(c)
        self.theta = torch.full((1,), 0.9, device=device)
        self.alive = torch.zeros(1, dtype=torch.int64, device=device)
        self.seed = torch.tensor(12345, dtype=torch.int64, device=device)  # where training keeps it: the gate's device
        self.xi = (torch.rand(n, 1, 1, 1, generator=gen) < 0.9).to(**opts)
        self.grad_y = torch.randn_like(self.shortcut)
        self.grad_full = torch.randn_like(self.shortcut_full)

    def gated(self, backend: str):
        module = backend_module(backend)
        leaves = [self.shortcut, self.branch, self.theta]

        def step():
            s, b, th = leaves
            module.gated_residual(s, b, th, self.alive, self.seed, True).backward(self.grad_y)
        return _with_leaves(leaves, step)

    def unfused(self, backend: str):
        module = backend_module(backend)
        leaves = [self.shortcut, self.branch, self.theta]

        def step():
            s, b, th = leaves
            gated = gate_examples(module.gate_apply, b, th, self.alive, self.seed, True)
            F.relu(s + gated).backward(self.grad_y)
        return _with_leaves(leaves, step)

    def masked(self):
        leaves = [self.shortcut_full, self.branch_full]

        def step():
            s, b = leaves
            F.relu(s + self.xi * b).backward(self.grad_full)
        return _with_leaves(leaves, step)

    def floor(self):
        leaves = [self.shortcut, self.branch]

        def step():
            s, b = leaves
            F.relu(s + b).backward(self.grad_y)
        return _with_leaves(leaves, step)


def _with_leaves(tensors, step, frozen=()):
    """Make `tensors` fresh leaves in place, requiring grad except at the positions in `frozen`, and
    return a step that clears their grads first."""
    for i, t in enumerate(tensors):
        tensors[i] = t.detach().requires_grad_(i not in frozen)

    def run():
        for t in tensors:
            t.grad = None
        step()
    run.leaves = tensors  # for checks of what a step computes
    return run


def _default_repeats(kind: str, device: str, size: str) -> int:
    """Enough repeats for a stable median on a shared machine: the CPU's linear steps take milliseconds
    and vary by several percent from step to step; its default and large convs take 0.1 s and more."""
    if device == "cpu" and size in ("default", "large"):
        return 7 if kind == "conv3x3" else 41
    return 15


def time_round_robin(steps: dict, device, warmup: int, repeats: int) -> dict:
    """Median ms of each step. Rounds run the steps in a fresh seeded random order, so no variant
    always follows the same one; Python's garbage collector stays off while timing, as in timeit."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples = {name: [] for name in steps}
    order, rng = list(steps), random.Random(0)
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                sync()
                start = time.perf_counter()
                steps[name]()
                sync()
                samples[name].append(time.perf_counter() - start)
    finally:
        if collecting:
            gc.enable()
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def profile(steps: dict, device, iters: int = 5) -> None:
    """Where each variant's time goes: kernels launched, device time and host time per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, step in steps.items():
        with torch_profile(activities=activities) as prof:
            for _ in range(iters):
                step()
            if cuda:
                torch.cuda.synchronize()
        print(f"--- profile {name}: {iters} steps")
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60))


def backend_module(name: str):
    name = name.partition(":")[0]
    return importlib.import_module("cadk.kernels." + (name if name == "reference" else f"{name}_backend"))


def backends_for(device: str) -> list[str]:
    dev = torch.device(device)
    registered = kernels.available_backends()
    return [name for name in BACKENDS[dev.type]
            if name in registered and getattr(backend_module(name), "supports", lambda d: True)(dev)]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="default", choices=sorted(SIZES),
                   help="layer shapes: tiny (per-call overhead), small (a quick run), default, large (fills a GPU)")
    p.add_argument("--small", action="store_true", help="same as --size small")
    p.add_argument("--profile", action="store_true",
                   help="also print a torch.profiler table of each variant at the first layer and keep")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--memory-format", default="channels_last", choices=["channels_last", "contiguous"],
                   help="layout of conv activations and weights")
    p.add_argument("--layers", default="linear,conv3x3", help="comma list of linear, conv3x3, conv1x1, conv-bn, residual, sequence")
    p.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    p.add_argument("--frozen-weight", action="store_true",
                   help="linear and conv layers with weight and bias that need no gradient (a frozen layer, or "
                        "thetas learnt on fixed weights), in every variant; the input still needs one (conv-bn "
                        "and residual keep every gradient)")
    p.add_argument("--backends", default=None,
                   help="comma list (default: all available for the device); triton:fused and triton:torch "
                        "time the Triton backend's linear layer with that LINEAR_MATMUL")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=None,
                   help="default 15 (on the CPU at the default and large sizes: 7 for conv3x3, 41 for the others)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="write the results to this path")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default of returning freed memory to the system: page faults then add "
                        "noise that differs from one process to the next (see cadk.utils.keep_freed_memory)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    backends = args.backends.split(",") if args.backends else backends_for(args.device)
    size = "small" if args.small else args.size
    specs = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    results = []
    malloc = "keeps-freed" if args.device == "cpu" and not args.system_malloc and keep_freed_memory() else "system"
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"format={args.memory_format} size={size} backends={backends} malloc={malloc}"
          + (" frozen-weight" if args.frozen_weight else ""))
    print(f"{'layer':8} {'keep':>5} {'variant':20} {'ms':>9} {'/floor':>7} {'/masked':>8} {'/full-size':>10}")
    for kind in args.layers.split(","):
        repeats = args.repeats or _default_repeats(kind, args.device, size)
        for keep in map(float, args.keeps.split(",")):
            if kind in ("residual", "conv-bn"):
                layer = (Residual if kind == "residual" else ConvBN)(specs[kind], keep, args.device, dtype, fmt, gen)
                plain = [b for b in backends if ":" not in b]  # no matmul here for triton:<matmul> to choose
                steps = {f"gated[{b}]": layer.gated(b) for b in plain}
                steps.update({f"unfused[{b}]": layer.unfused(b) for b in plain})
            else:
                layer = Layer(kind, specs[kind], keep, args.device, dtype, fmt, gen, args.frozen_weight)
                steps = {f"gated[{b}]": layer.gated(b) for b in backends if kind == "linear" or ":" not in b}
                steps["full-size"] = layer.full_size()
            steps.update(masked=layer.masked(), floor=layer.floor())
            ms = time_round_robin(steps, args.device, args.warmup, repeats)
            if args.profile and not results:
                profile(steps, args.device)
            for name, t in ms.items():
                gated = name.startswith(("gated", "unfused"))
                row = dict(layer=kind, keep=keep, variant=name, ms=t, device=args.device, dtype=args.dtype,
                           threads=torch.get_num_threads(), shape=specs[kind], malloc=malloc,
                           memory_format=args.memory_format, warmup=args.warmup, repeats=repeats,
                           frozen_weight=args.frozen_weight and isinstance(layer, Layer),  # where it applies
                           vs_floor=t / ms["floor"] if gated else None,
                           vs_masked=t / ms["masked"] if gated else None,
                           vs_full_size=t / ms["full-size"] if gated and "full-size" in ms else None)
                results.append(row)
                ratios = f"{row['vs_floor']:7.2f} {row['vs_masked']:8.2f}" if gated else ""
                if row["vs_full_size"] is not None:
                    ratios += f" {row['vs_full_size']:10.2f}"
                print(f"{kind:8} {keep:5.2f} {name:20} {t:9.3f} {ratios}")
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
