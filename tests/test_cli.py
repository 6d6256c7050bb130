"""The main job end to end on a tiny dataset in the real on-disk format."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cadk.cli import main
from test_data import CLASSES, make_fashion_mnist, make_image_folder, needs_pillow

TINY = ["--epochs", "2", "--batch-size", "32", "--max-steps-per-epoch", "3", "--warmup-epochs", "0.3",
        "--prune-every", "1", "--patience", "1", "--lam", "20", "--theta-lr", "0.5", "--threads", "1"]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return str(make_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=96, n_test=40))


def test_train_writes_report_plot_compact_model_and_resumes(fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "resnet20", "--data-dir", fmnist, "--out-dir", str(out), *TINY]) == 0
    log = capsys.readouterr().out
    assert "epoch   2 |" in log and "FLOPs" in log and "blocks" in log and "final:" in log
    report = json.loads((out / "report.json").read_text())
    assert len(report["history"]) == 2
    assert report["test_acc_compact"] == pytest.approx(report["test_acc_gated"], abs=1 / 40 + 1e-9)
    assert report["flops"] <= report["dense_flops"]
    for key in ("checkpoint", "torchscript", "exported", "plot"):
        assert os.path.getsize(report["artifacts"][key]) > 0
    # resume: one more epoch on top of the saved two
    assert main(["train", "--model", "resnet20", "--data-dir", fmnist, "--out-dir", str(out), "--resume",
                 *TINY, "--epochs", "3"]) == 0
    assert len(json.loads((out / "report.json").read_text())["history"]) == 3


def test_dense_run(fmnist, tmp_path):
    out = tmp_path / "dense"
    assert main(["train", "--model", "mlp", "--dense", "--data-dir", fmnist, "--out-dir", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["flops_ratio"] == 1.0


def test_clear_errors(fmnist, tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "a")]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err
    out = tmp_path / "b"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x00corrupt")
    assert main(["train", "--data-dir", fmnist, "--out-dir", str(out), "--resume", *TINY]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_info_and_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "cadk", "info"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "active backend" in res.stdout
    env = dict(os.environ, CADK_BACKEND="reference")
    res = subprocess.run([sys.executable, "-m", "cadk", "info"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "cpu: active backend reference (CADK_BACKEND=reference)" in res.stdout


@pytest.mark.parametrize("damage", ["foreign-dict", "list", "bare-state-dict", "missing-entry", "mismatched-model"])
def test_resume_from_a_foreign_or_incomplete_checkpoint_is_a_clear_error(fmnist, tmp_path, capsys, damage):
    """A checkpoint torch.load reads but that is not a whole cadk checkpoint for this run (another
    program's dict, a bare state_dict, a missing entry, model entries that do not fit) is an error line
    naming the problem, not a traceback."""
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY, "--epochs", "1"]
    assert main(args) == 0
    path = out / "checkpoint.pt"
    good = torch.load(path, weights_only=False)
    content = {"foreign-dict": {"foo": 1}, "list": [1, 2, 3], "bare-state-dict": good["model"],
               "missing-entry": {k: v for k, v in good.items() if k != "opt"},
               "mismatched-model": {**good, "model": {k: v[:1] if v.dim() else v for k, v in good["model"].items()}},
               }[damage]
    torch.save(content, path)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cadk: error:" in err and "Traceback" not in err and "--resume" in err


def test_resume_names_a_settings_mismatch_before_missing_entries(fmnist, tmp_path, capsys):
    """A whole checkpoint of a --dense run (which has no theta optimizer, cost or pruner) resumed without
    --dense is a settings mismatch to name, not an incomplete file to delete."""
    base = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(tmp_path / "run"), *TINY, "--epochs", "1"]
    assert main([*base, "--dense"]) == 0
    capsys.readouterr()
    assert main([*base, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "dense=True" in err and "corrupt" not in err, err


def test_out_of_memory_while_resuming_is_not_called_a_corrupt_checkpoint(fmnist, tmp_path, capsys, monkeypatch):
    """torch.OutOfMemoryError is a RuntimeError, but no fault of the checkpoint: it propagates as itself."""
    base = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(tmp_path / "run"), *TINY, "--epochs", "1"]
    assert main(base) == 0

    def out_of_memory(self, state):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.optim.SGD, "load_state_dict", out_of_memory)
    capsys.readouterr()
    with pytest.raises(torch.OutOfMemoryError):
        main([*base, "--epochs", "2", "--resume"])
    assert "delete it" not in capsys.readouterr().err


def test_settling_inside_the_warmup_is_refused(fmnist, tmp_path, capsys):
    """--epochs 2 with a budget settles at 0.8 epochs by default, inside the 1-epoch warm-up: every theta is
    still 1 and rounding would prune the whole network. An error line says what to change."""
    assert main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(tmp_path / "run"), "--epochs", "2",
                 "--batch-size", "32", "--target-flops", "0.4", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "cadk: error:" in err and "warm-up" in err and "--settle-epoch" in err


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"),
                                        ("--batch-size", "-5"), ("--threads", "-1"),
                                        ("--max-steps-per-epoch", "-1"), ("--lr", "nan"), ("--workers", "-1"),
                                        ("--image-size", "0"), ("--settle-epoch", "nan"), ("--settle-epoch", "inf"),
                                        ("--settle-epoch", "-1"), ("--ramp-epochs", "inf"), ("--lr", "-1"),
                                        ("--weight-decay", "-1"), ("--theta-lr", "-1"), ("--patience", "0"),
                                        ("--prune-every", "0"), ("--prune-eps", "1"), ("--warmup-epochs", "-1"),
                                        ("--lam", "-1"), ("--beta", "2"), ("--target-flops", "0"),
                                        ("--target-params", "1.5"), ("--lam-lr", "-1"),
                                        ("--checkpoint-minutes", "-1"), ("--checkpoint-minutes", "nan"),
                                        ("--checkpoint-every", "-1")])
def test_nonsense_flag_value_is_an_error_naming_the_flag(fmnist, tmp_path, capsys, flag, value):
    """Before: tracebacks (IndexError, ZeroDivisionError, RuntimeError), misleading errors, or a NaN run
    that exited 0; --epochs 0 wrote the model files and no report."""
    out = tmp_path / "o"
    rc = main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY, flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and "cadk: error:" in err and flag in err, err
    assert not out.exists() or not os.listdir(out)


def test_out_dir_that_is_a_file_is_an_error(fmnist, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(tmp_path / "f"), *TINY]) == 2
    assert "--out-dir" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["file-on-its-path", "unwritable"])
def test_out_dir_that_cannot_be_written_is_an_error_line(fmnist, tmp_path, capsys, damage):
    """Before: a traceback (NotADirectoryError from os.makedirs, or the lock file's open failing)."""
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "run" if damage == "file-on-its-path" else tmp_path / "run"
    if damage == "unwritable":  # a folder where the lock file goes fails to open as root too
        (out / ".lock").mkdir(parents=True)
    assert main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"cadk: error: --out-dir {out} cannot be" in err and "Traceback" not in err, err


def test_bad_out_dir_is_reported_before_the_data_loads(tmp_path, capsys):
    """The out-dir is made and locked before the data loads (an ImageNet scan takes minutes); a bad one was
    reported only after that."""
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "run"
    assert main(["train", "--model", "mlp", "--data-dir", str(tmp_path / "missing"), "--out-dir", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"--out-dir {out} cannot be" in err and "missing" not in err, err


def test_resume_keeps_the_settle_point_of_the_run(fmnist, tmp_path, capsys):
    """The settle step is saved: a settled run resumed with more epochs stays settled (it was un-settled and
    rounded a second time), and a run resumed with flags whose settle point has passed settles at once (it
    was counted as settled without ever being rounded)."""
    base = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(tmp_path / "a"), *TINY]
    assert main([*base, "--epochs", "2"]) == 0
    assert "settled at" in capsys.readouterr().out
    assert main([*base, "--epochs", "4", "--settle-epoch", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "settled at" not in out and "settle_epoch" not in out  # settled: a new --settle-epoch changes nothing
    base = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(tmp_path / "b"), *TINY]
    assert main([*base, "--epochs", "2", "--settle-epoch", "5"]) == 0
    assert "settled at" not in capsys.readouterr().out
    assert main([*base, "--epochs", "4", "--settle-epoch", "1", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "settled at" in out and "settle_epoch 5.0 -> 1.0" in out


def test_diverged_training_stops_with_an_error_and_keeps_the_last_checkpoint(fmnist, tmp_path, capsys):
    """A NaN loss stopped nothing before: the run went on and wrote NaN into report.json (not JSON). It now
    ends with an error line naming the step and the fix; the last epoch's checkpoint is left as it was."""
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY]
    assert main([*args, "--epochs", "1", "--dense"]) == 0
    checkpoint = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--dense", "--resume", "--lr", "1e30"]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "--lr" in err
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    report = (out / "report.json").read_text()
    assert "NaN" not in report and "Infinity" not in report


def test_model_without_blocks_logs_no_block_count(fmnist, tmp_path, capsys):
    assert main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(tmp_path / "run"), *TINY,
                 "--epochs", "2"]) == 0
    log = capsys.readouterr().out
    assert "widths" in log and "blocks 0/0" not in log


IMAGES = ["--data", "imagefolder", "--model", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0",
          "--warmup-epochs", "0.3", "--prune-every", "1", "--patience", "1", "--threads", "1"]


@needs_pillow
def test_imagefolder_run_writes_report_and_compacted_model(tmp_path, capsys):
    data, out = str(make_image_folder(tmp_path / "images", val="flat")), tmp_path / "run"
    assert main(["train", *IMAGES, "--data-dir", data, "--epochs", "1", "--out-dir", str(out)]) == 0
    assert "epoch   1 |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["image_size"] == 32 and len(report["history"]) == 1
    assert 0 <= report["test_acc_compact"] <= 1 and report["flops"] <= report["dense_flops"]
    small = torch.jit.load(report["artifacts"]["torchscript"])
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@needs_pillow
def test_resumed_imagefolder_run_sees_the_batches_of_an_uninterrupted_one(tmp_path):
    """Order and crops come from (seed, epoch, index): a run stopped after epoch 1 and resumed ends with the
    numbers of one that ran through (resuming restarts at the epoch boundary)."""
    from cadk.training import CheckpointError, TrainConfig, train

    data = str(make_image_folder(tmp_path / "images"))
    cfg = dict(data="imagefolder", data_dir=data, model="resnet18", image_size=32, batch_size=4, workers=0, epochs=2,
               warmup_epochs=0.3, prune_every=1, patience=1, threads=1)
    whole = train(TrainConfig(**cfg, out_dir=str(tmp_path / "whole")), log=lambda line: None)

    def stop_in_epoch_2(line):
        if line.startswith("epoch   2"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg, out_dir=str(tmp_path / "parts")), log=stop_in_epoch_2)
    resumed = train(TrainConfig(**cfg, out_dir=str(tmp_path / "parts"), resume=True), log=lambda line: None)
    drop = ("epoch_time",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed["history"]] == \
        [{k: v for k, v in h.items() if k not in drop} for h in whole["history"]]
    assert resumed["test_acc_compact"] == whole["test_acc_compact"] and resumed["flops"] == whole["flops"]
    with pytest.raises(CheckpointError, match="image_size=32"):  # other crops than the model was trained on
        train(TrainConfig(**{**cfg, "image_size": 40}, out_dir=str(tmp_path / "parts"), resume=True))


@needs_pillow
def test_corrupt_image_in_a_worker_is_an_error_line_naming_it(tmp_path, capsys):
    data = make_image_folder(tmp_path / "images")
    bad = data / "train" / CLASSES[2] / "zz_broken.JPEG"
    bad.write_bytes(b"\xff\xd8 truncated")
    args = ["train", *IMAGES, "--model", "mlp", "--dense", "--workers", "2", "--epochs", "1"]
    assert main([*args, "--data-dir", str(data), "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"cadk: error: cannot read image {bad}" in err, err
    assert "Traceback" not in err and "DataLoader worker" not in err, err


def test_resumed_run_trains_with_its_own_rates(fmnist, tmp_path, monkeypatch):
    """The error line of a diverged run says to resume with lower rates, but the checkpoint's optimizer and
    cost states brought back the saved --theta-lr, --weight-decay and (fixed) --lam: the new flags were
    ignored while report.json listed them."""
    from cadk.training import Run, TrainConfig, train

    cfg = dict(model="mlp", data_dir=fmnist, batch_size=32, max_steps_per_epoch=2, warmup_epochs=0.3, settle_epoch=0,
               threads=1, out_dir=str(tmp_path / "run"))
    train(TrainConfig(**cfg, epochs=1, theta_lr=0.5, weight_decay=5e-4, lam=20.0), log=lambda *a: None)
    seen = {}
    original = Run.train_epoch

    def spy(self, *args):
        seen.update(theta_lr=self.theta_opt.param_groups[0]["lr"],
                    weight_decay=self.opt.param_groups[0]["weight_decay"], lam=self.cost.lam)
        return original(self, *args)

    monkeypatch.setattr(Run, "train_epoch", spy)
    log = []
    train(TrainConfig(**cfg, epochs=2, theta_lr=1e-4, weight_decay=0.0, lam=0.5, resume=True), log=log.append)
    assert seen == {"theta_lr": 1e-4, "weight_decay": 0.0, "lam": 0.5}
    assert "theta_lr 0.5 -> 0.0001" in log[0] and "epochs 1 -> 2" in log[0]  # the change is named, not silent


@pytest.mark.parametrize("dense", [False, True])
def test_last_batch_of_one_that_batch_norm_cannot_train_on_is_refused_up_front(fmnist, tmp_path, capsys, dense):
    """96 examples in batches of 19 leave one for the last; VGG's last convs see 1x1 maps of 28x28 inputs.
    Before: at the end of the first epoch, a traceback (cadk bn_gate_act: training needs more than one value
    per channel) or, dense, an error line that named neither the flag nor the cause."""
    args = ["train", "--data-dir", fmnist, *TINY, "--max-steps-per-epoch", "0", "--epochs", "1", "--batch-size", "19",
            *(["--dense"] if dense else [])]
    out = tmp_path / "vgg"
    assert main([*args, "--model", "vgg11", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cadk: error:" in err and "--batch-size" in err and "Traceback" not in err, err
    assert not out.exists()
    assert main([*args, "--model", "resnet20", "--out-dir", str(tmp_path / "resnet")]) == 0  # 7x7 maps at the end


def test_resume_on_data_of_another_shape_names_the_data_not_a_corrupt_checkpoint(fmnist, tmp_path, capsys):
    """Before: 'the checkpoint does not fit this run (RuntimeError: ... size mismatch ...); it is corrupt or
    from another version: delete it', for a whole checkpoint resumed with another --data-dir."""
    from test_data import write_idx

    other = tmp_path / "other"
    other.mkdir()
    make_fashion_mnist(other, n_train=96, n_test=40)
    for prefix, n in (("train", 96), ("t10k", 40)):
        write_idx(other / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 16, 16)))
    args = ["train", "--model", "mlp", "--out-dir", str(tmp_path / "run"), *TINY, "--epochs", "1"]
    assert main([*args, "--data-dir", fmnist]) == 0
    capsys.readouterr()
    assert main([*args, "--data-dir", str(other), "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "10 classes of 1-channel 28px images" in err and "16px" in err and "--data-dir" in err, err
    assert "corrupt" not in err and "delete it" not in err, err


def test_resume_with_another_seed_is_refused(fmnist, tmp_path, capsys):
    """The seed only acts at the start (weights, gate keys, data order, all restored from the checkpoint): a
    resumed run with another --seed went on with the old one while report.json claimed the new."""
    base = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(tmp_path / "run"), *TINY, "--epochs", "1"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--epochs", "2", "--seed", "1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cadk: error:" in err and "seed=0" in err, err


def test_non_finite_value_of_any_float_flag_is_refused(fmnist, tmp_path, capsys):
    """A --dense run prices nothing, so its --lam was never checked: NaN went into report.json's config,
    which JSON readers then refuse."""
    out = tmp_path / "o"
    args = ["train", "--model", "mlp", "--dense", "--data-dir", fmnist, "--out-dir", str(out), *TINY]
    rc = main([*args, "--lam", "nan"])
    err = capsys.readouterr().err
    assert rc == 2 and "--lam" in err, err


def test_resume_with_fewer_epochs_than_done_is_refused(fmnist, tmp_path, capsys):
    """It rewrote report.json with 'epochs': 1 over a history of 2 epochs and the model trained for 2."""
    base = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(tmp_path / "run"), *TINY]
    assert main([*base, "--epochs", "2"]) == 0
    report = (tmp_path / "run" / "report.json").read_text()
    capsys.readouterr()
    assert main([*base, "--epochs", "1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cadk: error:" in err and "--epochs" in err and "corrupt" not in err, err
    assert (tmp_path / "run" / "report.json").read_text() == report


def test_resume_with_another_batch_size_is_refused(fmnist, tmp_path, capsys):
    """The schedules count steps: resumed with --batch-size 96 (1 step per epoch instead of 3), the saved step 6
    was past the new run's 3 steps in all and its last epoch trained at the full learning rate again."""
    base = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(tmp_path / "run"), *TINY]
    assert main([*base, "--epochs", "2", "--max-steps-per-epoch", "0"]) == 0
    capsys.readouterr()
    assert main([*base, "--epochs", "3", "--max-steps-per-epoch", "0", "--batch-size", "96", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cadk: error:" in err and "--batch-size" in err and "corrupt" not in err, err


def test_resume_on_fewer_examples_names_the_data(fmnist, tmp_path, capsys):
    """Data of the same shape but fewer examples: before, the error said only to resume with the run's
    --batch-size and --max-steps-per-epoch, which were the run's."""
    other = tmp_path / "other"
    other.mkdir()
    make_fashion_mnist(other, n_train=64, n_test=40)
    base = ["train", "--model", "mlp", "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps-per-epoch", "0"]
    assert main([*base, "--data-dir", fmnist, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*base, "--data-dir", str(other), "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "64 training examples in batches of 32" in err and "--data-dir" in err, err


def test_compacted_now_counts_the_unit_compaction_keeps(fmnist, tmp_path):
    """A gate whose alive units all sit at theta 0 keeps one unit in the compacted model (a layer cannot have
    zero width); the epoch line's 'compacted now' and the history counted none (0% FLOPs while report.json's
    flops_ratio of the very same model was not 0)."""
    from cadk import data as D
    from cadk.compaction import compact, flop_count, param_count
    from cadk.training import Run, TrainConfig

    run = Run(TrainConfig(model="mlp", data_dir=fmnist, settle_epoch=0, out_dir=str(tmp_path)),
              D.load_dataset("fashion-mnist", fmnist))
    dense = compact(run.model)
    with torch.no_grad():
        run.model.layers[1].gate.theta.zero_()
    plain, example = compact(run.model), run.example[:1]
    structure = run.structure()
    assert structure["deployed_flops"] == pytest.approx(flop_count(plain, example) / flop_count(dense, example))
    assert structure["deployed_params"] == pytest.approx(param_count(plain) / param_count(dense))


def test_a_new_start_removes_the_partial_file_of_a_killed_write(fmnist, tmp_path):
    """A run killed while it wrote its checkpoint left the temporary file (as large as a checkpoint) in OUT_DIR
    for good, one more at each such kill."""
    import cadk

    out = tmp_path / "run"
    base = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    killed = ("import os, signal; from cadk.utils import atomic_write; "
              f"atomic_write({str(out / 'checkpoint.pt')!r}, lambda f: (f.write(b'half'), "
              "os.kill(os.getpid(), signal.SIGKILL)))")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(cadk.__file__)))
    assert subprocess.run([sys.executable, "-c", killed], env=env).returncode == -9
    partial = [name for name in os.listdir(out) if name.startswith(".tmp-")]
    assert partial
    assert main([*base, "--epochs", "2", "--resume"]) == 0
    assert not set(partial) & set(os.listdir(out))


def test_report_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    """plot_run switched the process to matplotlib's Agg backend: after an in-process train() (a notebook),
    the user's own figures no longer showed."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot  # noqa: F401  (with pyplot loaded, matplotlib.use switches the backend)

    from cadk.report import plot_run

    old = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        report = {"config": {"model": "mlp", "data": "fashion-mnist"},
                  "history": [{"epoch": 1, "flops": 1.0, "params": 1.0, "test_acc": 0.5, "epoch_time": 0.1}]}
        plot_run(report, str(tmp_path / "report.png"))
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    finally:
        matplotlib.use(old)


def test_long_unmet_budget_keeps_the_thetas_moving(fmnist, tmp_path):
    """While the budget stayed unmet (here: lam rising faster than the thetas can follow), the controller
    raised lam without bound: the theta gradients overflowed float32, Adam's moments went infinite and the
    thetas froze where they stood (or turned NaN, with NaN in report.json) while the run went on and exited 0."""
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY, "--epochs", "8",
                 "--max-steps-per-epoch", "0", "--lam", "0.1", "--theta-lr", "0.05", "--target-params", "0.0001",
                 "--lam-lr", "5", "--settle-epoch", "0"]) == 0
    text = (out / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    expected_params = [epoch["params"] for epoch in json.loads(text)["history"]]
    assert expected_params[-1] < expected_params[4] - 0.2, expected_params


def test_fresh_start_over_a_saved_run_is_refused(fmnist, tmp_path, capsys):
    """A run started again without --resume (after a crash, or another run whose default --out-dir is the same:
    it names no budget) overwrote the saved run's checkpoint after its first epoch, and its report and models
    at the end: the earlier run was lost without a word."""
    out = tmp_path / "run"
    base = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    saved = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "report.json")}
    capsys.readouterr()
    assert main([*base, "--epochs", "1", "--target-flops", "0.5", "--settle-epoch", "0"]) == 2
    err = capsys.readouterr().err
    assert "cadk: error:" in err and "--resume" in err and "--out-dir" in err, err
    assert saved == {name: (out / name).read_bytes() for name in saved}
    assert main([*base, "--epochs", "1", "--resume", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert main([*base, "--epochs", "1", "--target-flops", "0.5", "--settle-epoch", "0", "--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["config"]["target_flops"] == 0.5


@pytest.mark.parametrize("device,says", [("cuda", "sees no CUDA GPU"), ("meta", "cpu or cuda"), ("gpu0", "not a device")])
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_that_is_not_there_is_refused_before_anything_is_written(fmnist, tmp_path, capsys, device, says):
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY, "--device", device]) == 2
    err = capsys.readouterr().err
    assert "cadk: error: --device" in err and says in err, err
    assert not out.exists()


def test_run_on_an_explicit_device_records_it_and_saves_cpu_models(fmnist, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY, "--epochs", "1",
                 "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "cpu" and report["config"]["device"] == "cpu"
    saved = torch.load(report["artifacts"]["checkpoint"], weights_only=False)["state_dict"]
    assert {t.device.type for t in saved.values()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["mlp", "resnet20"])
def test_cuda_run_trains_prunes_resumes_and_saves_cpu_models(fmnist, tmp_path, model):
    out = tmp_path / "run"
    args = ["train", "--model", model, "--data-dir", fmnist, "--out-dir", str(out), *TINY, "--device", "cuda",
            "--target-flops", "0.5", "--settle-epoch", "0"]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "cuda" and len(report["history"]) == 2
    assert report["test_acc_compact"] == report["test_acc_gated"]
    small = torch.jit.load(report["artifacts"]["torchscript"])
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@needs_pillow
def test_cpu_run_on_a_machine_with_a_gpu_pins_no_memory(tmp_path, monkeypatch):
    """The image loaders pinned their batches wherever CUDA was available: a --device cpu run opened a CUDA
    context on GPU 0 (memory taken from whoever uses it; an error where the GPU is in exclusive mode and busy)."""
    import torch.utils.data

    from cadk.training import TrainConfig, train

    pinned, loader = [], torch.utils.data.DataLoader

    def spy(*args, **kwargs):
        pinned.append(kwargs.get("pin_memory", False))
        return loader(*args, **{**kwargs, "pin_memory": False})  # this machine may have no GPU to pin for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.utils.data, "DataLoader", spy)
    data = str(make_image_folder(tmp_path / "images"))
    train(TrainConfig(data="imagefolder", data_dir=data, model="mlp", dense=True, image_size=16, batch_size=4,
                      workers=0, epochs=1, threads=1, device="cpu", out_dir=str(tmp_path / "run")),
          log=lambda line: None)
    assert pinned and not any(pinned)


def test_overwrite_stopped_in_its_first_epoch_leaves_nothing_of_the_replaced_run(fmnist, tmp_path, capsys):
    """--overwrite kept the replaced run's checkpoint until its own first one and its report and models until its
    end: stopped before (Ctrl-C, a crash), the out-dir still held the old run, which the next --resume went on with
    under the new flags, and report.json described the old run beside the new run's checkpoint."""
    from cadk.training import TrainConfig, train

    out = tmp_path / "run"
    base = ["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY, "--epochs", "1"]
    assert main(base) == 0

    def stop_in_epoch_1(line):
        if line.startswith("epoch   1"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(model="mlp", data_dir=fmnist, out_dir=str(out), epochs=1, batch_size=32,
                          max_steps_per_epoch=3, warmup_epochs=0.3, threads=1, lam=5.0, overwrite=True),
              log=stop_in_epoch_1)
    assert not [name for name in os.listdir(out) if name.startswith(("checkpoint", "report", "model_compact"))]
    capsys.readouterr()
    assert main([*base, "--lam", "5", "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_run_on_a_second_gpu_makes_it_the_current_device(fmnist, tmp_path, monkeypatch):
    """Triton kernels launch on the current CUDA device and stream whatever device their tensors are on, and the
    loaders pin batches for the current device: --device cuda:1 left GPU 0 current, so the Triton backend ran
    its kernels on GPU 0 with pointers into GPU 1. Simulated: this machine may have no GPU, let alone two."""
    import contextlib

    from cadk import training

    current = [torch.device("cuda:0")]

    @contextlib.contextmanager
    def device(d):
        current.append(torch.device(d))
        try:
            yield
        finally:
            current.pop()

    class Built(Exception):
        pass

    def run(cfg, ds, device=None):
        raise Built(current[-1])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(training, "Run", run)
    with pytest.raises(Built) as info:
        training.train(training.TrainConfig(model="mlp", data_dir=fmnist, device="cuda:1", out_dir=str(tmp_path)))
    assert info.value.args[0] == torch.device("cuda:1") and current == [torch.device("cuda:0")]


@pytest.mark.skipif(sys.platform == "win32", reason="the out-dir lock uses fcntl")
def test_second_run_in_an_out_dir_in_use_is_refused(fmnist, tmp_path, capsys):
    """Two runs started at once in one out-dir (the default names no budget) both trained, each overwriting
    the other's checkpoint, and one could delete the other's half-written file mid-write."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # the first run, holding the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        (out / ".tmp-of-the-first-run").write_bytes(b"half a checkpoint")
        assert main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY]) == 2
        err = capsys.readouterr().err
        assert "cadk: error:" in err and "in use by another cadk train (process 4242)" in err, err
        assert (out / ".tmp-of-the-first-run").exists() and not (out / "checkpoint.pt").exists()
    assert main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY, "--epochs", "1"]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_pillow
def test_cuda_imagefolder_run_with_workers_and_pinned_batches(tmp_path):
    data, out = str(make_image_folder(tmp_path / "images")), tmp_path / "run"
    args = ["train", *IMAGES, "--workers", "2", "--data-dir", data, "--out-dir", str(out), "--epochs", "1"]
    assert main([*args, "--device", "cuda"]) == 0  # the last --workers counts: batches pinned from workers
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "cuda" and report["config"]["workers"] == 2


def test_run_without_matplotlib_writes_everything_but_the_plot(fmnist, tmp_path, monkeypatch, capsys):
    """An install made with pip --no-deps (as on GPU boxes with their own torch) may lack matplotlib: the run
    had trained to the end and then failed before writing report.json."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--data-dir", fmnist, "--out-dir", str(out), *TINY, "--epochs", "1"]) == 0
    assert "report.png not written" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "plot" not in report["artifacts"] and not (out / "report.png").exists()


# ---- checkpoints within an epoch ------------------------------------------------------------------------
class Crash(Exception):
    """Stands for a kill: raised in the middle of a run, after a step."""


def _crash_after_step(monkeypatch, step):
    from cadk.training import Run

    original = Run._train_step

    def step_then_crash(self, xb, yb):
        stats = original(self, xb, yb)
        if self.step == step:
            raise Crash
        return stats

    monkeypatch.setattr(Run, "_train_step", step_then_crash)


def _same_run(whole, parts):
    """Report, history (but times), final gated model and generator states of two runs are bitwise equal."""
    a, b = (json.loads((out / "report.json").read_text()) for out in (whole, parts))
    drop = ("epoch_time",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in a["history"]] == \
        [{k: v for k, v in h.items() if k not in drop} for h in b["history"]]
    for key in ("test_acc_gated", "test_acc_compact", "flops", "params"):
        assert a[key] == b[key], key
    a, b = (torch.load(out / "checkpoint.pt", weights_only=False) for out in (whole, parts))
    assert a["model"].keys() == b["model"].keys() and a["step"] == b["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "the final models differ"
    assert torch.equal(a["gen"], b["gen"]) and torch.equal(a["torch_rng"]["cpu"], b["torch_rng"]["cpu"])
    assert "progress" not in a and "progress" not in b  # the last checkpoint is an epoch's end


# 96 examples in batches of 16: 6 steps per epoch; a checkpoint every 4 steps (4, then 8 = step 2 of epoch 2)
WITHIN = ["--model", "resnet20", "--epochs", "2", "--batch-size", "16", "--checkpoint-every", "4",
          "--checkpoint-minutes", "0", "--threads", "1"]
CASES = {  # what the lost steps and the resumed part of the epoch hold, and the step after which the run stops
    "warm-up": (["--warmup-epochs", "1.5", "--settle-epoch", "0"], 5),
    # pruning before and after the checkpoint at step 8; settling at step 9, between it and the stop at step 10
    "pruning-and-settling": (["--warmup-epochs", "0.3", "--prune-every", "1", "--patience", "1", "--lam", "1",
                              "--theta-lr", "0.5", "--target-flops", "0.5", "--settle-epoch", "1.5"], 10),
}


@pytest.mark.parametrize("case", CASES)
def test_run_stopped_within_an_epoch_resumes_from_its_checkpoint_exactly(fmnist, tmp_path, monkeypatch, capsys, case):
    """A run killed between checkpoints within an epoch and resumed ends with the model, history and report
    of one that ran through: the same batches and crops, gate draws, rates and structure from the step
    after the checkpoint on, and the epoch's loss, accuracy and pruning lines include its steps before it."""
    flags, stop = CASES[case]
    base = ["train", "--data-dir", fmnist, *WITHIN, *flags]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*base, "--out-dir", str(whole)]) == 0
    if case == "pruning-and-settling":  # the interrupted epoch has both, before and after the checkpoint
        events = json.loads((whole / "report.json").read_text())["history"][1]["pruned"]
        assert any("settled" in e for e in events) and len(events) > 3, events
    capsys.readouterr()
    with monkeypatch.context() as m:
        _crash_after_step(m, stop)
        with pytest.raises(Crash):
            main([*base, "--out-dir", str(parts)])
    epoch, batch = divmod(stop // 4 * 4, 6)
    saved = torch.load(parts / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == epoch and saved["progress"]["batch"] == batch
    assert f"checkpoint in epoch {epoch + 1} after step {batch} of 6" in capsys.readouterr().out
    assert main([*base, "--out-dir", str(parts), "--resume"]) == 0
    assert f"resumed from {parts / 'checkpoint.pt'} in epoch {epoch + 1} after step {batch} of 6" in \
        capsys.readouterr().out
    _same_run(whole, parts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_stopped_within_an_epoch_continues_the_gate_draws(fmnist, tmp_path, monkeypatch, capsys):
    """On a GPU the gates draw from the CUDA generator, whose state a checkpoint within an epoch restores: the
    resumed run ends with the generator states of one that ran through. (Its weights may differ in the last
    bits, and so its structure: cuDNN and atomic sums need not be deterministic.)"""
    flags, stop = CASES["pruning-and-settling"]
    base = ["train", "--data-dir", fmnist, *WITHIN, *flags, "--device", "cuda"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*base, "--out-dir", str(whole)]) == 0
    with monkeypatch.context() as m:
        _crash_after_step(m, stop)
        with pytest.raises(Crash):
            main([*base, "--out-dir", str(parts)])
    assert main([*base, "--out-dir", str(parts), "--resume"]) == 0
    a, b = (torch.load(out / "checkpoint.pt", weights_only=False) for out in (whole, parts))
    assert a["step"] == b["step"] and torch.equal(a["gen"], b["gen"])
    assert all(torch.equal(x, y) for x, y in zip(a["torch_rng"]["cuda"], b["torch_rng"]["cuda"]))


@needs_pillow
def test_image_folder_run_stopped_within_an_epoch_resumes_exactly(tmp_path, monkeypatch):
    """Streamed batches skip what the checkpoint's steps read, without decoding it; the loader's start
    (which draws a seed from torch's generator) leaves the gate draws of an uninterrupted run, with worker
    processes too."""
    data = str(make_image_folder(tmp_path / "images"))  # 12 training images in batches of 2: 6 steps per epoch
    base = ["train", *IMAGES, "--data-dir", data, "--batch-size", "2", "--epochs", "2", "--checkpoint-every", "4",
            "--lam", "20", "--theta-lr", "0.5", "--settle-epoch", "1.5"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*base, "--out-dir", str(whole)]) == 0
    events = json.loads((whole / "report.json").read_text())["history"][1]["pruned"]
    assert any("settled" in e for e in events) and len(events) > 3, events
    with monkeypatch.context() as m:
        _crash_after_step(m, 10)
        with pytest.raises(Crash):
            main([*base, "--out-dir", str(parts)])
    assert torch.load(parts / "checkpoint.pt", weights_only=False)["progress"]["batch"] == 2
    assert main([*base, "--out-dir", str(parts), "--resume", "--workers", "2"]) == 0  # batches are the workers'
    _same_run(whole, parts)


def test_checkpoint_minutes_writes_within_epochs_and_the_write_changes_nothing(fmnist, tmp_path, capsys):
    """A checkpoint due after every step (--checkpoint-minutes tiny) is written within each epoch, but not at
    its last step (the epoch's own follows), and the run computes what one without them does."""
    base = ["train", "--model", "mlp", "--data-dir", fmnist, *TINY]
    assert main([*base, "--out-dir", str(tmp_path / "plain"), "--checkpoint-minutes", "0"]) == 0
    assert "checkpoint in epoch" not in capsys.readouterr().out
    assert main([*base, "--out-dir", str(tmp_path / "often"), "--checkpoint-minutes", "1e-9"]) == 0
    log = capsys.readouterr().out
    assert [line.split("(")[0].strip() for line in log.splitlines() if "checkpoint in epoch" in line] == \
        [f"checkpoint in epoch {e} after step {s} of 3" for e in (1, 2) for s in (1, 2)]
    _same_run(tmp_path / "plain", tmp_path / "often")


def test_resume_within_an_epoch_checks_the_steps_and_epochs(fmnist, tmp_path, monkeypatch, capsys):
    """A checkpoint written after step 2 of epoch 2 is refused with another --batch-size (its steps would fall
    elsewhere in the epochs) or with --epochs 1 (the run would report a second epoch), naming the flag."""
    base = ["train", "--data-dir", fmnist, "--out-dir", str(tmp_path / "run"), *WITHIN, "--model", "mlp",
            "--settle-epoch", "0"]
    with monkeypatch.context() as m:
        _crash_after_step(m, 9)
        with pytest.raises(Crash):
            main(base)
    capsys.readouterr()
    assert main([*base, "--batch-size", "32", "--resume"]) == 2
    assert "had 6 steps each, this run's have 3" in capsys.readouterr().err
    assert main([*base, "--epochs", "1", "--resume"]) == 2
    assert "1 epochs done and part of epoch 2" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 0


def test_resume_in_target_mode_does_not_name_lam_as_a_change(fmnist, tmp_path):
    """With a budget, lam is the controller's state, restored from the checkpoint: a new --lam changes nothing.
    The log said 'from here on with ... lam 0.1 -> 7.0' while the run went on with the saved lam."""
    from cadk.training import Run, TrainConfig, train

    cfg = dict(model="mlp", data_dir=fmnist, batch_size=32, max_steps_per_epoch=2, warmup_epochs=0.3, settle_epoch=0,
               threads=1, target_flops=0.5, out_dir=str(tmp_path / "run"))
    train(TrainConfig(**cfg, epochs=1, lam=0.1), log=lambda *a: None)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["cost"]["lam"]
    seen = {}
    original = Run.train_epoch

    def spy(self, *args):
        seen["lam"] = self.cost.lam
        return original(self, *args)

    log = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Run, "train_epoch", spy)
        train(TrainConfig(**cfg, epochs=2, lam=7.0, resume=True), log=log.append)
    assert seen["lam"] == saved != 7.0
    assert "epochs 1 -> 2" in log[0] and "lam" not in log[0]
