"""The training CLI on 2 gloo ranks on CPU (``mnet_ext.train`` under DDP): replicas agree, SyncBatchNorm equals one
process on the global batch, rank 0 alone writes the checkpoint, resumption is exact, checkpoints cross world sizes,
a rank that fails ends every rank, and the issue's ``torchrun`` command line works.

Ranks are spawned processes that join a gloo group from torchrun's environment variables
(``tests.dist_helpers.spawn``), so the package sees what torchrun gives it; one test runs torchrun itself. Starting
a rank costs ~10 s of imports on a loaded 2-core machine (torch, torch._dynamo), so one spawn (the module fixture
``ranks``) runs every scenario in turn and each test checks its scenario's results. Every spawn has a deadline: a
hang fails the tests instead of blocking the suite. Tiny settings as in tests/test_train.py (MobileNetV3-Small
x0.25, 32x32, 4 classes).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import mnet_ext
from mnet_ext import train as T
from tests.dist_helpers import WORLD, spawn
from tests.helpers import scaled_error
from tests.test_train import CPU_BACKEND, _one_thread, tiny_config  # noqa: F401 (_one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


def _result(tmp: Path, name: str, rank: int) -> Path:
    return tmp / f"{name}.rank{rank}.pt"


def _scenarios(rank: int, tmp: Path) -> None:
    """Each scenario in turn; a failure is recorded for its test, and (the ranks agreeing on it) ends the run, since
    the ranks might no longer meet in the same collectives."""
    for name, scenario in SCENARIOS.items():
        try:
            scenario(rank, tmp)
            error = None
        except Exception as exc:  # recorded for the test that checks this scenario
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
        (tmp / f"{name}.rank{rank}.done").write_text(error or "")
        failed: list[str | None] = [None] * WORLD
        dist.all_gather_object(failed, error)
        if any(failed):
            return


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """A directory with every scenario's results from one 2-rank spawn."""
    tmp = tmp_path_factory.mktemp("ddp")
    T.train(tiny_config(**RUN, stop_after=1, checkpoint=str(tmp / "single.pt")))  # for _resume_ranks
    try:
        spawn(_scenarios, tmp, timeout=240)
    except AssertionError as exc:  # a rank that failed a scenario alone leaves the other waiting: say which
        done = {f.name: f.read_text() for f in sorted(tmp.glob("*.done"))}
        raise AssertionError(f"{exc}; scenarios finished: {done}") from None
    return tmp


def _check_scenario(tmp: Path, name: str) -> None:
    for rank in range(WORLD):
        done = tmp / f"{name}.rank{rank}.done"
        assert done.exists(), f"scenario {name} did not run on rank {rank} (an earlier one failed)"
        assert not done.read_text(), done.read_text()


# 12 samples / global batch 4 (2 per rank) = 3 steps per epoch: the resumed half crosses an epoch boundary.
# Dropout stays on (V3's classifier): the ranks' random streams are part of what resumption must restore.
RUN = dict(steps=4, synthetic_size=12, batch_size=2, warmup_steps=1, lr=0.05, ema_decay=0.9)


def _resume_ranks(rank: int, tmp: Path) -> None:
    straight = T.train(tiny_config(**RUN))
    # Each rank names its own file: a file from rank 1 would mean rank 1 wrote a checkpoint.
    ckpt = str(tmp / ("ckpt.pt" if rank == 0 else "ckpt.rank1.pt"))
    T.train(tiny_config(**RUN, stop_after=2, checkpoint=ckpt))
    torch.manual_seed(1234 + rank)  # the resumed run must not depend on the RNG it starts with
    resumed = T.train(tiny_config(**RUN, resume=str(tmp / "ckpt.pt")))
    with pytest.warns(UserWarning, match="written by 1 rank"):  # a single-process checkpoint loads in 2 ranks
        crossed = T.train(tiny_config(**RUN, resume=str(tmp / "single.pt")))
    torch.save({"straight": straight["model"].state_dict(), "resumed": resumed["model"].state_dict(),
                "straight_ema": straight["ema"].state_dict(), "resumed_ema": resumed["ema"].state_dict(),
                "straight_loss": straight["loss_history"], "resumed_loss": resumed["loss_history"],
                "crossed_steps": crossed["steps"]}, _result(tmp, "resume", rank))


def test_ddp_ranks_agree_checkpoint_on_rank0_resume_exact(ranks):
    """4 steps straight on 2 ranks, then 2 steps + checkpoint + 2 resumed steps: every rank's parameters, buffers
    and EMA are bit-identical across the ranks (DDP) and between the straight and resumed runs (data position and
    each rank's RNG restored); rank 0 alone wrote the checkpoint, whose format does not depend on the world size
    (it loads in one process, and one process's loads in two)."""
    tmp_path = ranks
    _check_scenario(tmp_path, "resume")
    assert not (tmp_path / "ckpt.rank1.pt").exists(), "rank 1 wrote a checkpoint"
    results = [torch.load(_result(tmp_path, "resume", r), weights_only=True) for r in range(WORLD)]
    for key in ("straight", "straight_ema"):
        for name, value in results[0][key].items():
            assert torch.equal(value, results[1][key][name]), f"{key} {name} differs between the ranks"
    for rank, result in enumerate(results):
        assert result["resumed_loss"] == result["straight_loss"], rank
        for key in ("", "_ema"):
            for name, value in result["straight" + key].items():
                assert torch.equal(value, result["resumed" + key][name]), f"rank {rank}: resumed{key} {name}"
        assert result["crossed_steps"] == 4
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["world_size"] == WORLD and len(ckpt["rng"]) == WORLD and ckpt["step"] == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # the ranks' streams differ
    T.build_model(tiny_config(), torch.device("cpu")).load_state_dict(ckpt["model"])  # strict: no "module." prefix
    with pytest.warns(UserWarning, match="written by 2 rank"):  # step 2 of 4: it continues in one process
        assert T.train(tiny_config(**RUN, resume=str(tmp_path / "ckpt.pt")))["steps"] == 4


def _sync_bn_ranks(rank: int, tmp: Path) -> None:
    job = T.distributed.environment()
    device = torch.device("cpu")
    # fp64: a 2-rank step must equal one process's step on the concatenated batch to rounding (float64 runs the
    # fused layers on the reference backend)
    cfg = tiny_config(batch_size=2, synthetic_size=8, dropout=0.0, backend="reference", sync_bn=True)
    torch.manual_seed(0)  # the same model on both ranks (the one-process copy is taken before DDP's broadcast)
    model = T.build_model(cfg, device).double()
    single = copy.deepcopy(model)
    T.distributed.convert_sync_batchnorm(model, device)
    assert any(isinstance(m, T.CPUSyncBatchNorm) for m in model.modules())
    assert all(m.process_group is not None for m in model.modules() if isinstance(m, mnet_ext.FusedConvBNAct))
    ddp = T.distributed.wrap(model, device, job)
    data, _ = T.build_datasets(cfg)
    mine = list(T.ResumableSampler(len(data), 2, cfg.seed, rank, WORLD))
    whole = list(T.ResumableSampler(len(data), 2 * WORLD, cfg.seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for step in range(len(whole) // (2 * WORLD)):  # 2 steps: running statistics and momentum compound
        for net, optimizer, keys, batch in ((ddp, opt, mine, 2), (single, opt_single, whole, 2 * WORLD)):
            samples = [data[k] for k in keys[step * batch:(step + 1) * batch]]
            images = torch.stack([s[0] for s in samples]).double()
            labels = torch.tensor([s[1] for s in samples])
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(images), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        mean = losses[-2].clone()
        dist.all_reduce(mean)
        assert abs(mean.item() / WORLD - losses[-1].item()) <= 1e-12 * losses[-1].item(), f"loss step {step}"
    # rtol 1e-9 (fp64 order noise compounds over 2 steps). The biases of BatchNorms that feed a 1x1 conv and another
    # BatchNorm get no gradient but rounding (the next BN removes any per-channel shift): they sit at ~1e-17, so
    # their own scale cannot judge them; atol 1e-12 is far below any real update (lr 0.2 x gradients >= 1e-6).
    for name, value in single.state_dict().items():
        got = model.state_dict()[name]
        assert torch.allclose(got.double(), value.double(), rtol=1e-9, atol=1e-12), \
            f"{name}: {scaled_error(got.double(), value.double()):.2e} of its scale {value.double().abs().max():.2e}"
    # fp32, the CLI's own path: the first step's loss over 2 ranks is the global batch's
    torch.save(T.train(tiny_config(batch_size=2, steps=1, dropout=0.0, sync_bn=True))["loss_history"],
               _result(tmp, "sync_loss", rank))


def test_sync_bn_step_equals_single_process_global_batch(ranks):
    """With --sync-bn, 2 ranks x 2 images train exactly as one process on the 4 images (fp64: the parameters and
    running statistics after 2 SGD steps within 1e-9, the mean of the ranks' losses within 1e-12): fused layers and
    native BatchNorms (CPUSyncBatchNorm on CPU) both see the global batch, and the sampler's rank slices make up the
    single process's batches. Then the CLI path in fp32: its first loss (the ranks' mean) equals one process's on
    the global batch to fp32 rounding, as tests/test_train.py bounds fused against native (1e-5)."""
    _check_scenario(ranks, "sync_bn")
    single = T.train(tiny_config(batch_size=2 * WORLD, steps=1, dropout=0.0))["loss_history"]
    for rank in range(WORLD):
        assert torch.load(_result(ranks, "sync_loss", rank))[0] == pytest.approx(single[0], rel=1e-5)


def _bad_path_ranks(rank: int, tmp: Path) -> None:
    data = "/nonexistent/images" if rank == 1 else None  # only rank 1's data is missing
    with pytest.raises(T.RankFailedError, match=r"setup failed on 1 of 2 ranks: rank 1: FileNotFoundError: "
                                                r"--data: '/nonexistent/images' is not a directory") as info:
        T.train(tiny_config(data=data, steps=2))
    assert info.value.failed_ranks == [1]
    argv = ["--device", "cpu", "--steps", "2", "--no-progress", "--model", "mobilenet_v3_small", "--width-mult",
            "0.25", "--resolution", "32", "--batch-size", "2", "--num-classes", "4", "--backend", CPU_BACKEND]
    assert T.main([*argv, *(["--data", data] if data else [])]) == 1


def test_failed_rank_ends_every_rank_with_its_error(ranks):
    """A data path that exists on rank 0 but not on rank 1: both ranks raise RankFailedError naming rank 1 and its
    error (and the CLI returns 1) within the spawn's deadline, instead of rank 0 waiting in DDP's first broadcast."""
    _check_scenario(ranks, "bad_path")


SCENARIOS = {"resume": _resume_ranks, "sync_bn": _sync_bn_ranks, "bad_path": _bad_path_ranks}


@pytest.mark.slow
def test_torchrun_command_line(tmp_path):
    """The issue's command line under torchrun (2 CPU processes, tiny settings): a checkpoint at step 2, then
    ``--resume`` continues it to step 4; one summary line per run (rank 0 prints)."""
    tiny = ["--model", "mobilenet_v3_small", "--width-mult", "0.25", "--resolution", "32", "--batch-size", "2",
            "--num-classes", "4", "--synthetic-size", "8", "--no-progress", "--backend", CPU_BACKEND]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    outputs = []
    for extra in (["--stop-after", "2"], ["--resume", "ckpt.pt"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "mnet_ext.train", "--device", "cpu", "--sync-bn", "--steps", "4", "--checkpoint", "ckpt.pt", *tiny,
               *extra]
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stdout + run.stderr
        outputs.append(run.stdout)
    assert [out.count("done:") for out in outputs] == [1, 1]
    assert "done: 2/4 steps" in outputs[0] and "done: 4/4 steps" in outputs[1] and "2 processes" in outputs[1]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["loss_history"]) == 4
