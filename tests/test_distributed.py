"""Training on two processes through torchrun (gloo, one thread each): the same answer as one
process, global ActNorm initialisation, exact resume after a kill, faults decided together, and a
rank that dies or hangs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _kill_sweep import sweep
from conftest import write_tiny_dataset

from couplings import checkpoint, data
from couplings.cli import main
from couplings.models import build_model
from couplings.rundir import RunDir
from couplings.transforms import ActNorm

pytestmark = pytest.mark.processes  # every test here starts torchrun (COUPLINGS_STRESS, conftest.py)

TINY = ["--dataset", "tiny", "--set", "size=small", "--set", "hidden_units=32", "--set", "val_size=50",
        "--set", "samples_per_epoch=4", "--batch-size", "40", "--device", "cpu", "--quiet"]  # 6 steps per epoch

# The child every rank runs: `couplings` with dataset "tiny" registered, after an optional prelude
# (test hooks below) that may patch the training step.
_CHILD = """\
import json, os, sys
from couplings import data
from couplings.cli import main
data.DATASETS["tiny"] = data.DatasetSpec(name="tiny", md5=json.loads(sys.argv[1]))
RANK = int(os.environ["RANK"])
{prelude}
sys.exit(main(sys.argv[2:]))
"""

# Counts optimizer steps; `on_step(n)` runs before step n (from 1) and may replace its objective.
_STEP_HOOK = """\
from couplings.training import loop
_real_step, _calls = loop.optimizer_step, [0]
def _step(optimizer, objective, **kwargs):
    _calls[0] += 1
    objective = on_step(_calls[0], objective)
    return _real_step(optimizer, objective, **kwargs)
loop.optimizer_step = _step
"""

# Saves every rank's final weights to $DUMP/rank<R>.pt, to check that the ranks agree.
_DUMP_WEIGHTS = """\
import torch
from couplings.training import pixel
_real_fit = pixel.fit
def _fit(ctx):
    _real_fit(ctx)
    torch.save(ctx.model.state_dict(), os.path.join(os.environ["DUMP"], f"rank{RANK}.pt"))
pixel.fit = _fit
"""

# Writes the names of the gloo threads still running at exit to $DUMP/threads<R>.json.
_GLOO_THREADS_AT_EXIT = """\
import atexit
def _gloo_threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{t}/comm").read().strip())
        except OSError:  # a thread that ended after the listing: an exception here would skip the dump
            pass
    with open(os.path.join(os.environ["DUMP"], f"threads{RANK}.json"), "w") as f:
        json.dump(sorted(name for name in names if "gloo" in name), f)
atexit.register(_gloo_threads)
"""


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, dict]:
    """The synthetic dataset "tiny" under tmp_path/data: (root, md5 of its files)."""
    return tmp_path / "data", write_tiny_dataset(tmp_path / "data").md5


def _torchrun_command(tmp_path: Path, md5: dict, argv: list[str], prelude: str = "", nproc: int = 2) -> list[str]:
    script = tmp_path / f"child{abs(hash(prelude))}.py"
    script.write_text(_CHILD.format(prelude=textwrap.dedent(prelude)))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(script), json.dumps(md5), *argv]


def _env(root: Path, **extra: str) -> dict:
    return {**os.environ, "COUPLINGS_DATA": str(root), "OMP_NUM_THREADS": "1", **extra}


def _torchrun(tmp_path, tiny, argv, prelude="", env=None, timeout=120) -> subprocess.CompletedProcess:
    root, md5 = tiny
    return subprocess.run(_torchrun_command(tmp_path, md5, argv, prelude), env=_env(root, **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def _assert_same_weights(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tolerance)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def _killed_when(cmd: list[str], env: dict, ready, sig: int, timeout: float = 90,
                 whole_tree: bool = False) -> subprocess.CompletedProcess:
    """Runs torchrun ``cmd`` in its own process group and, once ``ready()``, sends ``sig`` to
    that group (as a terminal's Ctrl-C reaches torchrun, which passes it on to its workers), or
    with ``whole_tree`` to torchrun and every worker at once (as when a machine loses power)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run never got ready"
        time.sleep(0.05)
    if whole_tree:
        for pid in _process_tree(proc.pid):
            os.kill(pid, sig)
    else:
        os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _column(run: Path, name: str) -> list:
    return [json.loads(line)[name] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_step(path: Path) -> int:
    try:
        return checkpoint.load(path).step
    except (checkpoint.CheckpointError, OSError):
        return -1


SLOW_STEPS = "import time\ndef on_step(n, objective):\n    time.sleep(0.15)\n    return objective\n" + _STEP_HOOK
# Both ranks stop before step 5, the one after the mid-epoch checkpoint of step 4, and wait to be killed.
PARKED_AT_STEP_5 = "import time\ndef on_step(n, objective):\n    if n == 5:\n        time.sleep(600)\n    return objective\n" + _STEP_HOOK


def test_two_ranks_train_like_one_process_with_the_same_global_batch(tiny, tmp_path, monkeypatch):
    """NICE for 12 steps of global batch 40: 2 ranks of 20 against 1 process of 40."""
    two, one = tmp_path / "two", tmp_path / "one"
    result = _torchrun(tmp_path, tiny, ["train", "nice", "--out", str(two), *TINY, "--epochs", "2"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(two)  # printed by rank 0 only
    monkeypatch.setenv("COUPLINGS_DATA", str(tiny[0]))
    monkeypatch.setitem(data.DATASETS, "tiny", data.DatasetSpec("tiny", tiny[1]))
    assert main(["train", "nice", "--out", str(one), *TINY, "--epochs", "2"]) == 0
    a, b = checkpoint.load(two / "last.pt"), checkpoint.load(one / "last.pt")
    assert a.step == b.step == 12 and a.world_size == 2 and b.world_size == 1
    # Float rounding only (measured: at most 3e-8 after 5 steps): each rank sums half the batch.
    _assert_same_weights(a.model_state, b.model_state, rtol=1e-5, atol=1e-6)
    for name in ("train_loss", "val_bpd"):  # the logged loss is the global batch's
        assert _column(two, name) == pytest.approx(_column(one, name), rel=1e-5)
    assert "2 processes (torchrun)" in json.loads((two / "config.json").read_text())["hardware"]

    # Resuming with another world size is refused with a clear line, before anything is written.
    assert main(["train", "nice", "--out", str(two), "--resume", "--epochs", "3", "--quiet"]) == 2
    # A global batch the ranks cannot share equally is refused too.
    odd = _torchrun(tmp_path, tiny, ["train", "nice", "--out", str(tmp_path / "odd"), *TINY, "--batch-size", "41"])
    assert odd.returncode != 0 and "batch_size 41 must be a multiple of the 2 processes" in odd.stderr


def test_actnorm_initialisation_under_two_ranks_equals_one_process_over_the_same_global_batch(tmp_path):
    prelude = """\
    import torch
    import torch.distributed as dist
    from couplings import distributed
    from couplings.models import build_model
    from couplings.transforms import ActNorm, base
    distributed.start(torch.device("cpu"))
    base.set_share_mean(distributed.mean_over_ranks)  # as the trainer does under torchrun
    torch.manual_seed(0)
    model = build_model("glow", {"steps": 2, "hidden": 8})
    pixels = torch.randint(0, 256, (8, 1, 28, 28), generator=torch.Generator().manual_seed(1))
    noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.pixel_log_prob(distributed.shard(pixels), distributed.shard(noise))
    state = {k: v for k, v in model.state_dict().items() if "bias" in k or "log_scale" in k}
    torch.save(state, sys.argv[2] + f"/rank{RANK}.pt")
    distributed.stop()
    sys.exit(0)
    """
    script = tmp_path / "actnorm.py"
    script.write_text(_CHILD.format(prelude=textwrap.dedent(prelude)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), "{}", str(tmp_path)], env=_env(tmp_path), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr

    torch.manual_seed(0)
    model = build_model("glow", {"steps": 2, "hidden": 8})
    assert any(isinstance(m, ActNorm) for m in model.modules())
    pixels = torch.randint(0, 256, (8, 1, 28, 28), generator=torch.Generator().manual_seed(1))
    noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.pixel_log_prob(pixels, noise)  # one process, the whole batch
    single = {k: v for k, v in model.state_dict().items() if "bias" in k or "log_scale" in k}
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    _assert_same_weights(ranks[0], ranks[1], rtol=0, atol=0)
    _assert_same_weights(ranks[0], single, rtol=1e-5, atol=1e-5)
    # One rank's share alone gives other statistics: the comparison above can fail.
    first = next(f"{name}.log_scale" for name, m in model.named_modules() if isinstance(m, ActNorm))
    torch.manual_seed(0)
    half = build_model("glow", {"steps": 2, "hidden": 8})
    with torch.no_grad():
        half.pixel_log_prob(pixels[:4], noise[:4])
    assert not torch.allclose(half.state_dict()[first], single[first], atol=1e-5)


def test_the_process_group_and_its_threads_are_gone_before_the_interpreter_exits(tiny, tmp_path):
    """Left to the interpreter's teardown, the gloo threads (of a group kept alive by
    torch.distributed.nn, which the first optimizer imports) aborted a rank now and then on a
    loaded machine ("terminate called without an active exception")."""
    result = _torchrun(tmp_path, tiny, ["train", "nice", "--out", str(tmp_path / "run"), *TINY, "--max-steps", "2"],
                       _GLOO_THREADS_AT_EXIT, env={"DUMP": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    dumps = [tmp_path / f"threads{r}.json" for r in (0, 1)]
    assert all(d.exists() for d in dumps), f"an exit handler did not run: {result.stderr[-2000:]}"
    assert [json.loads(d.read_text()) for d in dumps] == [[], []]


def test_a_ddp_run_killed_mid_epoch_and_resumed_equals_an_uninterrupted_one(tiny, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    argv = [*TINY, "--epochs", "2", "--checkpoint-every", "2"]
    result = _torchrun(tmp_path, tiny, ["train", "nice", "--out", str(straight), *argv])
    assert result.returncode == 0, result.stderr

    root, md5 = tiny
    # Killed once the checkpoint of step 4 is written, while the ranks wait before step 5: a kill
    # timed by the clock instead (once last.pt is past step 3) sometimes landed after the end of
    # the epoch on a loaded machine.
    cmd = _torchrun_command(tmp_path, md5, ["train", "nice", "--out", str(killed), *argv], PARKED_AT_STEP_5)
    _killed_when(cmd, _env(root), lambda: _checkpoint_step(killed / "last.pt") == 4, signal.SIGKILL, whole_tree=True)
    stopped_at = checkpoint.load(killed / "last.pt")
    assert stopped_at.position is not None and stopped_at.step == 4, stopped_at.step  # inside an epoch

    result = _torchrun(tmp_path, tiny, ["train", "nice", "--out", str(killed), "--resume", "--quiet"])
    assert result.returncode == 0, result.stderr
    a, b = checkpoint.load(straight / "last.pt"), checkpoint.load(killed / "last.pt")
    assert a.step == b.step == 12
    _assert_same_weights(a.model_state, b.model_state, rtol=0, atol=0)
    for x, y in zip(a.optimizer_state["state"].values(), b.optimizer_state["state"].values()):
        _assert_same_weights(x, y, rtol=0, atol=0)


def _kill_tree(pid: int) -> None:
    """SIGKILLs ``pid`` and all its descendants at once, and returns once every one has exited
    (a zombie has released its files and its lock on the run directory)."""
    tree = _process_tree(pid)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 60
    for p in tree:
        while True:
            try:
                state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state == "Z":
                break
            assert time.monotonic() < deadline, f"process {p} outlived SIGKILL"
            time.sleep(0.01)


TORCHRUN_KILLS = 20


@pytest.mark.skipif(not os.environ.get("COUPLINGS_SLOW_TESTS"), reason="about 5 min on 2 busy cores; set COUPLINGS_SLOW_TESTS=1")
def test_a_sweep_of_kills_of_torchrun_and_its_ranks_then_resume_ends_bitwise_equal(tiny, tmp_path):
    """The kill sweep of tests/test_write_faults.py on two processes: 20 SIGKILLs of torchrun and
    both ranks at once, at random moments of one tiny run whose every write pauses half-way (so
    that many land inside a checkpoint, metrics or sample write of rank 0), each followed by
    ``--resume`` under torchrun. The final weights and Adam state must equal an uninterrupted
    two-process run's, bit for bit, and each epoch must be logged once."""
    root, md5 = tiny
    argv = [*TINY, "--epochs", "20", "--checkpoint-every", "1"]  # 120 steps, a checkpoint after each
    env = _env(root, COUPLINGS_TEST_WRITE_PAUSE="0.03")
    straight, run, log = tmp_path / "straight", tmp_path / "killed", tmp_path / "child.log"
    done = subprocess.run(_torchrun_command(tmp_path, md5, ["train", "nice", "--out", str(straight), *argv]), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    def start(resume: bool, log: Path) -> subprocess.Popen:
        cmd = _torchrun_command(tmp_path, md5, ["train", "nice", "--out", str(run), *argv, *(["--resume"] if resume else [])])
        with open(log, "w") as err:
            return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    line = sweep(start, lambda process: _kill_tree(process.pid), run, log, TORCHRUN_KILLS, timeout=300)
    print(f"torchrun kill sweep: {line}")
    seed = line.split(",")[0]
    a, b = checkpoint.load(straight / "last.pt"), checkpoint.load(run / "last.pt")
    assert a.step == b.step == 120 and b.world_size == 2
    _assert_same_weights(a.model_state, b.model_state, rtol=0, atol=0)
    for x, y in zip(a.optimizer_state["state"].values(), b.optimizer_state["state"].values()):
        _assert_same_weights(x, y, rtol=0, atol=0)
    assert [r["step"] for r in RunDir(run).read_metrics()] == list(range(6, 121, 6)), seed
    assert not list(run.rglob(".*.tmp*"))


def test_sigint_to_the_torchrun_group_checkpoints_once_and_the_run_resumes(tiny, tmp_path):
    run = tmp_path / "run"
    root, md5 = tiny
    cmd = _torchrun_command(tmp_path, md5, ["train", "nice", "--out", str(run), *TINY, "--epochs", "20"], SLOW_STEPS)
    result = _killed_when(cmd, _env(root), lambda: _checkpoint_step(run / "last.pt") >= 6, signal.SIGINT)
    assert result.stderr.count("stopped by SIGINT") == 1, result.stderr  # rank 0 says it, once
    assert "checkpointed in" in result.stderr
    state = checkpoint.load(run / "last.pt")  # intact
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == state.step > 6  # the stopped epoch was logged and checkpointed
    result = _torchrun(tmp_path, tiny, ["train", "nice", "--out", str(run), "--resume", "--epochs", str(state.epoch + 1),
                                        "--quiet"])
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(run / "last.pt").epoch == state.epoch + 1


@pytest.mark.parametrize("model", ["nice", "realnvp"])  # Real NVP: per-rank batch norm, running averages from rank 0
def test_a_fault_on_one_rank_is_skipped_on_both_and_the_ranks_stay_in_sync(model, tiny, tmp_path):
    run = tmp_path / "run"
    prelude = ("def on_step(n, objective):\n    return objective * float('nan') if RANK == 1 and n in (3, 8) else objective\n"
               + _STEP_HOOK + _DUMP_WEIGHTS)
    options = TINY if model == "nice" else [*TINY[:4], *TINY[6:]]  # hidden_units is NICE's
    result = _torchrun(tmp_path, tiny, ["train", model, "--out", str(run), *options, "--epochs", "2"], prelude,
                       env={"DUMP": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in metrics] == [1, 1]  # step 3 in epoch 1, step 8 in epoch 2
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]  # weights and buffers
    _assert_same_weights(ranks[0], ranks[1], rtol=0, atol=0)
    assert checkpoint.load(run / "last.pt").step == 12


def test_a_rank_that_dies_stops_the_other_with_a_clear_line_and_an_intact_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    prelude = ("import signal\ndef on_step(n, objective):\n"
               "    if RANK == 1 and n == 5:\n        os.kill(os.getpid(), signal.SIGKILL)\n    return objective\n" + _STEP_HOOK)
    started = time.monotonic()
    result = _torchrun(tmp_path, tiny, ["train", "nice", "--out", str(run), *TINY, "--epochs", "3", "--checkpoint-every", "2"],
                       prelude)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    assert "rank 0: error: rank 0 of 2:" in result.stderr, result.stderr
    assert "another rank stopped" in result.stderr and "the last good checkpoint is" in result.stderr
    assert checkpoint.load(run / "last.pt").step == 4  # verified: intact


def test_a_rank_that_hangs_stops_the_other_after_the_timeout(tiny, tmp_path):
    run = tmp_path / "run"
    prelude = ("import time\ndef on_step(n, objective):\n"
               "    if RANK == 1 and n == 3:\n        time.sleep(8)\n    return objective\n" + _STEP_HOOK)
    result = _torchrun(tmp_path, tiny, ["train", "nice", "--out", str(run), *TINY, "--epochs", "3", "--checkpoint-every", "2"],
                       prelude, env={"COUPLINGS_DIST_TIMEOUT": "2"})
    assert result.returncode != 0
    assert "rank 0: error: rank 0 of 2: averaging the gradients failed" in result.stderr, result.stderr
    assert "within 2 s" in result.stderr
    assert checkpoint.load(run / "last.pt").step == 2


@pytest.mark.network
@pytest.mark.parametrize("launch", ["module", "script"])
def test_torchrun_launches_the_installed_command_and_the_module(launch, tmp_path):
    """`torchrun -m couplings ...` and `torchrun --no-python couplings ...`, on MNIST."""
    run = tmp_path / "run"
    program = ["-m", "couplings"] if launch == "module" else ["--no-python", str(Path(sys.executable).parent / "couplings")]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *program, "train", "nice", "--set", "size=small", "--set", "val_size=100", "--max-steps", "2",
                             "--set", "samples_per_epoch=4", "--device", "cpu", "--quiet", "--out", str(run)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(run / "last.pt").world_size == 2
