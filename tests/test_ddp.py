"""DistributedDataParallel with gated models: two CPU processes on gloo train, prune and compare.

One spawn runs every scenario (a process start costs seconds); each rank saves what it saw and the
tests compare the ranks."""
from __future__ import annotations

import copy
import datetime
import inspect
import os

import pytest
import torch
import torch.distributed as dist

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import cadk  # noqa: E402
from cadk.models.resnet import GatedResNet  # noqa: E402
from cadk.nn import GatedBasicBlock, UnitGate, gates_of  # noqa: E402

WORLD = 2
BATCH = 8  # full batch; each rank gets BATCH // WORLD examples

# Rank-local buffers during training (BN statistics); the older flag is deprecated from torch 2.13.
LOCAL_BUFFERS = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                 else {"broadcast_buffers": False})


# ---- models and data ------------------------------------------------------------------------------
def _resnet() -> GatedResNet:
    """Two basic blocks: BN, an identity and a projection shortcut, shared stream gates, layer gates."""
    torch.manual_seed(0)
    return GatedResNet(GatedBasicBlock, [1, 1], [4, 8], 1, 3, False)


def _mlp():
    """Its 1024x64 weight is large enough for the C++ kernels' reused gradient buffers (>= 256 KiB)."""
    torch.manual_seed(0)
    return cadk.build_model("mlp", 1, 3, image_size=8, hidden=(1024, 16))


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(WORLD)[rank]


# ---- what each rank runs --------------------------------------------------------------------------
def _zero_unit_thetas(model) -> None:
    """Theta 0 for two units of every unit gate, alike on every rank: the pruner's next step removes them."""
    with torch.no_grad():
        for g in gates_of(model):
            if g.kind == "unit":
                g.theta[:2] = 0.0


def _zero_block_theta(model) -> None:
    _zero_unit_thetas(model)
    with torch.no_grad():
        model.blocks[0].layer_gate.theta.zero_()


def _snapshot(model, optimizers) -> dict:
    """Everything that must agree across ranks, by name (alive_idx is a plain attribute, not a buffer)."""
    names = {p: n for n, p in model.named_parameters()}
    state = {f"param {n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"grad {n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    state.update({f"buffer {n}": b.clone() for n, b in model.named_buffers()})
    state.update({f"alive_idx {n}": m.alive_idx.clone() for n, m in model.named_modules() if isinstance(m, UnitGate)})
    for i, opt in enumerate(optimizers):
        for p, s in opt.state.items():
            state.update({f"opt{i} {k} {names[p]}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return state


def _train(rank: int, model, ddp_kwargs: dict, prune=_zero_unit_thetas, rank_gates=False, steps=7) -> dict:
    """cadk's training step (as cadk train runs it, warm-up step included) under DDP; prunes at step 2."""
    weights, gates = cadk.split_parameters(model)
    ddp = DDP(model, **ddp_kwargs)
    cost = cadk.ComplexityCost(ddp, torch.randn(1, 1, 8, 8), lam=2.0, alpha=0.0)  # alpha=0: blocks stay
    opt = torch.optim.SGD(weights, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    theta_opt = cadk.ThetaAdam(gates, lr=0.2)
    pruner = cadk.Pruner(ddp, patience=1, warmup_steps=1, every=1)
    events = []
    for step in range(steps):
        torch.manual_seed(1000 * rank * rank_gates + step)  # the gates' draws: alike, or each rank its own
        x, y = (_shard(t, rank) for t in _batch(step))
        opt.zero_grad(set_to_none=True)
        theta_opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        if step == 0:  # warm-up: no theta update
            for g in gates:
                g.theta.grad = None
        else:
            cost.add_grad_()
        opt.step()
        theta_opt.step()
        if step == 2:
            prune(model)
        events += pruner.step([opt, theta_opt])
    return {"state": _snapshot(model, [opt, theta_opt]), "events": events, "ddp": ddp}


def _synced_buffers(ddp) -> dict:
    """Buffers after one more forward through DDP, which broadcasts rank 0's buffers first unless told
    not to (no_grad and eval: nothing changes them after the broadcast)."""
    ddp.eval()
    with torch.no_grad():
        ddp(torch.zeros(1, 1, 8, 8))
    return {f"buffer {n}": b.clone() for n, b in ddp.module.named_buffers()}


def _grads(model, x, y, seed: int, net=None) -> dict:
    """model's gradients, named as in model, after a step through `net` (model itself, or its DDP wrapper)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    F.cross_entropy((net or model)(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _set_thetas(model, binary: bool) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in gates_of(model):
            u = torch.rand(gate.num_units, generator=g)
            gate.theta.copy_((u > 0.3).float() if binary else 0.3 + 0.7 * u)
            gate.theta[0] = 1.0  # every unit gate keeps a unit on


def _grad_check(rank: int, model, train: bool, binary: bool, full_batch: bool) -> dict:
    """Largest |DDP gradient - reference| and |DDP gradient - this rank's own gradient|, relative to the
    largest gradient entry. Reference: the full batch in one process, or (BN in training mode normalises
    per rank) the mean over ranks of one process's gradients on each shard, drawn with the same seed."""
    _set_thetas(model, binary)
    single = copy.deepcopy(model).train(train)
    ddp = DDP(model.train(train))
    x, y = _batch(99)
    ddp_grad = _grads(model, _shard(x, rank), _shard(y, rank), seed=7, net=ddp)
    shards = [_grads(single, _shard(x, r), _shard(y, r), seed=7) for r in range(WORLD)]
    ref = _grads(single, x, y, seed=7) if full_batch else {n: sum(s[n] for s in shards) / WORLD for n in ddp_grad}
    scale = max(float(g.abs().max()) for g in ref.values())
    gap = {n: float((ddp_grad[n] - ref[n]).abs().max()) / scale for n in ref}
    own = max(float((ddp_grad[n] - shards[rank][n]).abs().max()) for n in ref) / scale
    return {"gap": gap, "own_gap": own}


def _stale_alive_idx(rank: int, refresh: bool) -> dict:
    """A pruned checkpoint restored on rank 0 only: DDP's construction broadcasts rank 0's parameters and
    buffers, which is enough for plain modules. Returns (alive_idx, nonzero(alive_mask)) per gate."""
    pruned = _resnet()
    pruned.stem.gate.prune(torch.tensor([0, 1]))
    model = _resnet()
    if rank == 0:
        model.load_state_dict(pruned.state_dict())
    DDP(model)
    if refresh:
        for g in gates_of(model):
            g.refresh()
    return {n: (g.alive_idx.tolist(), torch.nonzero(g.alive_mask).flatten().tolist())
            for n, g in model.named_modules() if isinstance(g, UnitGate)}


def _run(fn, *args, **kwargs) -> dict:
    """A scenario's result, or the error it raised (the same on every rank for DDP's own checks)."""
    try:
        return {"error": None, "value": fn(*args, **kwargs)}
    except Exception as e:  # noqa: BLE001 - recorded for the test to report
        return {"error": f"{type(e).__name__}: {e}", "value": None}


def _scenarios(rank: int) -> dict:
    res = {
        "default": _run(_train, rank, _resnet(), {}),
        "bucket_view": _run(_train, rank, _resnet(), {"gradient_as_bucket_view": True}),
        "local_buffers": _run(_train, rank, _resnet(), {"gradient_as_bucket_view": True, **LOCAL_BUFFERS}),
        "mlp": _run(_train, rank, _mlp(), {}),
        "mlp_rank_gates": _run(_train, rank, _mlp(), {"gradient_as_bucket_view": True}, rank_gates=True),
        "block_find_unused": _run(_train, rank, _resnet(), {"find_unused_parameters": True}, _zero_block_theta),
        "grad_mlp_binary": _run(_grad_check, rank, _mlp(), train=True, binary=True, full_batch=True),
        "grad_resnet_train": _run(_grad_check, rank, _resnet(), train=True, binary=False, full_batch=False),
        "grad_resnet_eval": _run(_grad_check, rank, _resnet(), train=False, binary=False, full_batch=True),
        "stale_alive_idx": _run(_stale_alive_idx, rank, refresh=False),
        "refreshed_alive_idx": _run(_stale_alive_idx, rank, refresh=True),
    }
    for name in ("default", "local_buffers"):
        if res[name]["error"] is None:
            res[name]["value"]["synced_buffers"] = _synced_buffers(res[name]["value"]["ddp"])
    # last: DDP's reducer error leaves that wrapper unusable
    res["block_static"] = _run(_train, rank, _resnet(), {}, _zero_block_theta)
    for r in res.values():
        if isinstance(r["value"], dict):
            r["value"].pop("ddp", None)
    return res


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_scenarios(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---- checks ---------------------------------------------------------------------------------------
def _mismatches(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys(), set(a.keys()) ^ set(b.keys())
    return [k for k in a if not torch.equal(a[k], b[k])]


def _is_bn_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var"))


class ScenarioError(RuntimeError):
    pass


def _values(ranks, name: str) -> list:
    """Each rank's result of scenario `name`; raises ScenarioError with the first rank's error."""
    for rank, r in enumerate(ranks):
        if r[name]["error"] is not None:
            raise ScenarioError(f"rank {rank}: {r[name]['error']}")
    return [r[name]["value"] for r in ranks]


def _assert_pruned_alike(runs) -> None:
    assert runs[0]["events"], "no pruning event happened"
    assert all(r["events"] == runs[0]["events"] for r in runs)


@pytest.mark.parametrize("name", ["default", "bucket_view", "mlp", "block_find_unused"])
def test_ranks_agree_after_training_and_pruning(ranks, name):
    """Parameters, gradients, thetas, alive sets, optimizer state and gate buffers are bitwise equal;
    BN running statistics hold each rank's last batch until DDP broadcasts rank 0's at the next forward."""
    runs = _values(ranks, name)
    _assert_pruned_alike(runs)
    diff = _mismatches(runs[0]["state"], runs[1]["state"])
    assert [k for k in diff if not _is_bn_stat(k)] == []
    if "synced_buffers" in runs[0]:
        assert _mismatches(runs[0]["synced_buffers"], runs[1]["synced_buffers"]) == []


def test_block_pruned_with_find_unused_parameters(ranks):
    run = _values(ranks, "block_find_unused")[0]
    assert run["state"]["alive_idx blocks.0.layer_gate"].numel() == 0
    assert any("blocks.0.layer_gate" in e for e in run["events"])


def test_ranks_agree_with_rank_local_buffers(ranks):
    """No buffer broadcast at forward: gate buffers (alive_mask, zero_steps, seed) stay equal by themselves;
    BN running statistics are each rank's own, and stay different (which shows the comparison sees them)."""
    runs = _values(ranks, "local_buffers")
    _assert_pruned_alike(runs)
    diff = _mismatches(runs[0]["state"], runs[1]["state"])
    assert diff and all(_is_bn_stat(k) for k in diff), diff
    synced = _mismatches(runs[0]["synced_buffers"], runs[1]["synced_buffers"])
    assert synced and all(_is_bn_stat(k) for k in synced), synced


def test_ranks_agree_with_their_own_gate_draws(ranks):
    """Each rank draws its own gates (seeded by rank): thetas, hence pruning, still agree, since their
    gradients are averaged; the draws themselves (sample_seed) differ."""
    runs = _values(ranks, "mlp_rank_gates")
    _assert_pruned_alike(runs)
    diff = _mismatches(runs[0]["state"], runs[1]["state"])
    assert diff and all(k.endswith("sample_seed") for k in diff), diff


@pytest.mark.parametrize("name", ["grad_mlp_binary", "grad_resnet_train", "grad_resnet_eval"])
def test_gradient_equals_single_process(ranks, name):
    """DDP's gradient (every parameter, thetas included) is the single-process reference of _grad_check;
    a rank's own shard gradient is far from it, so the tolerance would catch a missing or partial
    all-reduce."""
    for r in _values(ranks, name):
        assert max(r["gap"].values()) < 1e-5, {k: v for k, v in r["gap"].items() if v >= 1e-5}
        assert r["own_gap"] > 1e-2


def _assert_alive_idx_follows_mask(gates: dict) -> None:
    assert gates["stem.gate"][1] == [2, 3]  # rank 0's pruned mask reached every rank
    assert all(idx == from_mask for idx, from_mask in gates.values()), gates


def test_refreshing_gates_after_wrapping_restores_alive_idx(ranks):
    for gates in _values(ranks, "refreshed_alive_idx"):
        _assert_alive_idx_follows_mask(gates)


def test_alive_idx_follows_broadcast_alive_mask(ranks):
    """A rank-0-only load reaches the other ranks through DDP's initial broadcast, which writes alive_mask in
    place: the index lists the layers read follow it."""
    for gates in _values(ranks, "stale_alive_idx"):
        _assert_alive_idx_follows_mask(gates)


def test_block_pruning_with_default_ddp(ranks):
    """A pruned block's branch still gets (zero) gradients, so find_unused_parameters=False works."""
    runs = _values(ranks, "block_static")
    _assert_pruned_alike(runs)
    assert [k for k in _mismatches(runs[0]["state"], runs[1]["state"]) if not _is_bn_stat(k)] == []


def test_compacting_a_wrapped_model_gives_the_plain_model(tmp_path):
    """cadk.compact(DDP(model)) returned a copy of the DDP wrapper around the compacted modules, holding the
    original's reducer and process group; the DDP and DataParallel wrappers are now left out."""
    model = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,))
    model.layers[0].gate.prune([1])
    x = torch.randn(2, 1, 4, 4)
    want = model.eval()(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for wrapped in (DDP(model), torch.nn.DataParallel(model)):
            plain = cadk.compact(wrapped)
            assert not any(isinstance(m, (DDP, torch.nn.DataParallel)) for m in plain.modules())
            torch.testing.assert_close(plain(x), want)
    finally:
        dist.destroy_process_group()
