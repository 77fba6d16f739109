"""Scaling out: data-parallel training under torchrun (2 CPU processes, gloo) matches one process,
and `predict --workers 2` gives exactly the rows of one process, in input order.

Tolerance for training, and why: each rank trains on its half of every global batch, with
BatchNorm over the gathered batch and dropout masks drawn for the whole batch, so the arithmetic
is one process's except for summation order (DDP adds two half-batch gradients where one process
computes one full-batch gradient: ~1e-7 relative per step). Over two epochs of Adam that stays
near 1e-6 in probabilities and losses; we allow 1e-4. Per-rank BatchNorm and dropout (plain DDP)
move probabilities by ~1e-2 on this data, so the bound still tells the two apart. The test pins
fp32: under bf16 autocast each rank's gradient is rounded to bf16 before the sum (0.4%), and N
processes agree with one only to that precision.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import imagegen as g
from kneeosteo.inference.sharded import shard_files
from kneeosteo.interfaces.cli import app, main
from kneeosteo.run import RunDir
from kneeosteo.training import distributed
from kneeosteo.training.distributed import Dist, GlobalDropout
from tinyrun import tiny_run

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4
SETTINGS = dict(image_size=64, copies=1, epochs=2, batch_size=8, patience=100, device="cpu", precision="fp32")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Data, split, and the one-process reference run (one thread, like each torchrun worker)."""
    return tiny_run(tmp_path_factory.mktemp("ddp"), SETTINGS, run_name="one")


def test_two_processes_match_one(ws, monkeypatch, capfd):
    """`train --devices 2` relaunches itself under torchrun; fresh cache: features sharded too.
    The command is called in this process (relaunch_args rebuilds it from the parsed options, as
    for any in-process call); torchrun and its two workers are real processes, and what they
    print reaches this process's stdout (captured at the file-descriptor level)."""
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(ws.root / "cache2"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(REPO)
    out = ws.root / "two"
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                str(ws.data),
                "--split",
                str(ws.split),
                "--config",
                str(ws.cfg),
                "--out",
                str(out),
                "--devices",
                "2",
            ]
        )
    stdout, stderr = capfd.readouterr()
    assert exc.value.code == 0, stderr[-3000:]
    assert stdout.count("run written to") == 1  # rank 0 speaks, rank 1 only computes
    one, two = ws.run, out
    assert RunDir(two).config.record["processes"] == 2 and RunDir(one).config.record["processes"] == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    h1, h2 = _rows(one / "history.csv"), _rows(two / "history.csv")
    assert [r["epoch"] for r in h1] == [r["epoch"] for r in h2] == ["1", "2"]
    for a, b in zip(h1, h2):
        for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert abs(float(a[k]) - float(b[k])) <= TOL, (k, a, b)

    p1, p2 = _rows(one / "predictions.csv"), _rows(two / "predictions.csv")
    assert [(r["path"], r["label"]) for r in p1] == [(r["path"], r["label"]) for r in p2]
    for a, b in zip(p1, p2):
        assert abs(float(a["probability"]) - float(b["probability"])) <= TOL, (a, b)
        if abs(float(a["probability"]) - 0.5) > TOL:
            assert a["prediction"] == b["prediction"]
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert m1["counts"] == m2["counts"]
    assert abs(m1["auc"]["value"] - m2["auc"]["value"]) <= TOL


def test_global_dropout_draws_the_single_process_mask():
    """Rank r's rows of the mask are rows r of the mask one process draws for the whole batch."""
    x = torch.randn(8, 16)
    torch.manual_seed(3)
    ref = nn.Dropout(0.5).train()(x)
    for sizes, rank in (([8], 0), ([4, 4], 0), ([4, 4], 1), ([3, 3, 2], 2)):
        start = sum(sizes[:rank])
        ctx = Dist(rank=rank, world=len(sizes), batch=(sizes, start))
        torch.manual_seed(3)
        rows = x[start : start + sizes[rank]]
        assert torch.equal(GlobalDropout(nn.Dropout(0.5), ctx).train()(rows), ref[start : start + len(rows)])


def test_relaunch_rebuilds_the_command_for_torchrun(ws, monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    res = CliRunner().invoke(
        app,
        [
            "train",
            str(ws.data),
            "--out",
            str(ws.root / "x"),
            "--epochs",
            "3",
            "--no-attention",
            "--zoom",
            "0.9,1.1",
            "--devices",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    cmd = calls[0]
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and "--standalone" in cmd
    args = cmd[cmd.index("kneeosteo") + 1 :]
    assert args[0] == "train" and str(ws.data) in args
    for opt, val in (("--out", str(ws.root / "x")), ("--epochs", "3"), ("--zoom", "0.9,1.1"), ("--devices", "4")):
        assert args[args.index(opt) + 1] == val
    assert "--no-attention" in args and "--resume" not in args

    calls.clear()
    res = CliRunner().invoke(
        app,
        [
            "train",
            str(ws.data),
            "--out",
            str(ws.root / "x"),
            "--devices",
            "8",
            "--nodes",
            "2",
            "--master",
            "node0:29400",
        ],
    )
    assert res.exit_code == 0, res.output
    cmd = calls[0]
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--rdzv_endpoint") + 1] == "node0:29400"


def test_multi_node_needs_a_master_and_a_failed_job_is_one_line(ws, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", str(ws.data), "--out", str(ws.root / "y"), "--devices", "2"]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--nodes", "2"])
    err = capsys.readouterr().err  # a bad invocation (ConfigError): exit 2, one line
    assert exc.value.code == 2 and "--master HOST:PORT" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: 3)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "torchrun exit status 3" in err and len(err.strip().splitlines()) == 1


def test_shards_are_whole_batches_in_order():
    files = [Path(f"{i}.png") for i in range(23)]
    for workers in (1, 2, 3, 5, 40):
        shards = shard_files(files, workers, batch_size=4)
        assert [f for s in shards for f in s] == files and all(shards)
        assert len(shards) <= workers and all(len(s) % 4 == 0 for s in shards[:-1])
    assert shard_files([], 3, 4) == []


def test_sharded_predict_gives_exactly_the_rows_of_one_process(ws, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i, (p, _) in enumerate(g.make_dataset(tmp_path / "more", n_per_class=5, size=64, seed=4).items):
        (images / f"{i:02d}.png").write_bytes(p.read_bytes())
    g.truncated_png(images / "03b.png")  # an unreadable file inside the second batch
    g.text_as_png(images / "07b.png")
    inputs = [ws.data / "osteoporosis", images, tmp_path / "missing.png"]
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}.csv"
        with pytest.raises(SystemExit) as exc:
            main(
                [
                    "predict",
                    "--run",
                    str(ws.run),
                    *map(str, inputs),
                    "--batch-size",
                    "4",
                    "--workers",
                    str(workers),
                    "--out",
                    str(outs[workers]),
                ]
            )
        assert exc.value.code == 0
        outs[workers] = (outs[workers].read_text(), capsys.readouterr().err)
    assert outs[1] == outs[2]  # byte-identical rows, same errors in the same order
    rows = outs[1][0].splitlines()
    assert len(rows) == 1 + 12 + 10
    assert ["03b.png" in outs[1][1], "07b.png" in outs[1][1], "missing.png" in outs[1][1]] == [True] * 3
