"""torchrun: 2 processes take the steps 1 process takes (SFT, and the reflection updates of every method on
the same cached collect data; with --fsdp too), gather every rank's tasks, and only rank 0 writes.

The micro config has 7 trajectories in batches of 3 (batch_size for SFT, traj_batch for the reflection
updates): the last batch of each pass has 1 item, so rank 1 runs its stand-in at weight 0. Measured on
CPU (gloo, --amp none): per-step losses agree to <= 3e-7 relative and gradient norms to <= 3e-7 (SFT,
DPO, ETO, D) and 7e-6 (PPO); metrics that are differences of summed log-probs (DPO's implicit rewards,
PPO's KL and rewards) to <= 5e-5. The test allows 1e-4 relative (1e-8 absolute), and for DPO's implicit
rewards also 1e-5 absolute: each is beta times a difference of two log-prob sums over a whole
trajectory, so float32 rounding of the sums (~1e-7 of hundreds) is ~1e-6 of the difference however small
the difference is; on an AVX2-only CPU (the figures above are from an AVX-512 one) ETO's
rewards/rejected differed by 4.1e-6 absolute, 1.3e-4 relative, its loss by 3e-6 relative."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest

from test_implicit import MICRO, _metrics, _run

ARGS = [*MICRO, "--n_train", "7", "--traj_batch", "3", "--amp", "none", "--log_every", "1"]
STEPWISE = {"rewards/accuracy", "disc/acc_expert", "disc/acc_agent", "policy/clip_frac"}  # jump at float noise
SUM_DIFFERENCES = {"rewards/chosen", "rewards/rejected", "rewards/margins"}  # beta * (summed log-probs - ref's)


def _torchrun(script: str, args: list[str], n: int = 2, timeout: int = 300) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                        "--master_port", str(port), script, *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def _task_ids(root: str, folder: str) -> list[str]:
    return [t["task"]["id"] for t in json.load(open(os.path.join(root, folder, "trajectories.json")))]


def _files(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _assert_same_steps(one: list[dict], two: list[dict]) -> None:
    assert [x["step"] for x in one] == [x["step"] for x in two] and one
    for x, y in zip(one, two):
        assert x.keys() == y.keys()
        for k in x.keys() - STEPWISE:
            abs_tol = 1e-5 if k in SUM_DIFFERENCES else 1e-8
            assert math.isclose(x[k], y[k], rel_tol=1e-4, abs_tol=abs_tol), (x["step"], k, x[k], y[k])


@pytest.fixture(scope="module")
def novices(tmp_path_factory):
    """The same SFT in 1 process (a) and under torchrun with 2 (b); b's stdout."""
    a, b = (str(tmp_path_factory.mktemp(n)) for n in ("one", "two"))
    _run(["sft", *ARGS, "--out", a], script="stepagent.py")
    return a, b, _torchrun("stepagent.py", ["sft", *ARGS, "--out", b])


def test_sft_two_processes_take_the_one_process_steps(novices):
    a, b, stdout = novices
    la, lb = ([json.loads(x) for x in open(os.path.join(d, "sft_metrics.jsonl"))] for d in (a, b))
    assert len(la) == len(lb) == 8  # 6 steps (2 epochs x 3 batches) + 2 epoch lines: rank 1 wrote none
    _assert_same_steps([x for x in la if "event" not in x], [x for x in lb if "event" not in x])
    assert _files(a) == _files(b)  # the same files, and no stray ones
    # the test evaluation gathered both ranks' tasks; only rank 0 printed
    assert json.load(open(os.path.join(b, "eval", "sft-test", "summary.json")))["n"] == 2
    assert _task_ids(b, "eval/sft-test") == _task_ids(a, "eval/sft-test")  # gathered in the tasks' order
    assert stdout.count("novice test: success") == 1 and stdout.count('"env": "hotpotqa"') == 1


@pytest.fixture(scope="module")
def one_process(novices, tmp_path_factory):
    """get(script, method, extra): the method's 1-iteration run in 1 process from the novice, made once."""
    runs = {}

    def get(script: str, method: str, extra: list[str]) -> str:
        if method not in runs:
            runs[method] = str(tmp_path_factory.mktemp(method) / "run")
            shutil.copytree(novices[0], runs[method])
            _run([*ARGS, *extra, "--iterations", "1", "--out", runs[method]], script=script)
        return runs[method]
    return get


# train_irl.py --reward outcome is left out for time: its collect is rollout + old_logps (as ETO's and
# StepAgent-Inverse's) and its update Inverse.pg_step
METHODS = [("train_implicit.py", "implicit", []), ("train_implicit.py", "eto", ["--level", "trajectory"]),
           ("train_irl.py", "inverse", [])]


@pytest.mark.parametrize("script,method,extra", METHODS + [("train_implicit.py", "implicit", ["--fsdp", "true"])],
                         ids=["implicit", "eto", "inverse", "implicit-fsdp"])
def test_reflection_two_processes_take_the_one_process_steps(novices, one_process, tmp_path, script, method, extra):
    """Iteration 1 trains on the 1-process run's collect-1.pt (sampling differs per rank, the data
    must not): the same updates. Iteration 2 collects under torchrun: every rank's share gathered.
    --fsdp true: the policy sharded by FSDP2 (CPU, gloo), compared with the same 1-process run."""
    a, b = one_process(script, method, [x for x in extra if x not in ("--fsdp", "true")]), str(tmp_path / "two")
    shutil.copytree(novices[0], b)  # the same novice
    os.makedirs(os.path.join(b, method))
    shutil.copy(os.path.join(a, method, "collect-1.pt"), os.path.join(b, method))
    stdout = _torchrun(script, [*ARGS, *extra, "--iterations", "2", "--out", b])
    ma, mb = _metrics(os.path.join(a, method)), _metrics(os.path.join(b, method))
    steps = [[x for x in m if "step" in x and "event" not in x and x["iteration"] == 1] for m in (ma, mb)]
    _assert_same_steps(*steps)
    # b's iteration 2 inspected / explored the same trajectories as a's iteration 1 (all 7, each
    # rank its share, gathered) and wrote the line once; b did not collect iteration 1
    events = [[x for x in m if x.get("event") in ("inspect", "explore")] for m in (ma, mb)]
    assert len(events[0]) == len(events[1]) == 1
    key = "tasks" if method == "eto" else "states"
    assert events[0][0][key] == events[1][0][key] > 0
    assert [x["iteration"] for x in mb if x.get("event") == "iteration"] == [1, 2]
    assert stdout.count(" iter 2 |") == 1
    assert json.load(open(os.path.join(b, method, "eval-iter2-test", "summary.json")))["n"] == 2
    assert _task_ids(b, f"{method}/eval-iter2-test") == _task_ids(a, f"{method}/eval-iter1-test")  # in order
    # each rank kept its share of the collect and the evaluations in a partial file of its own, then dropped it
    assert not [f for f in _files(b) if "partial.pt" in f]


FSDP_RESUME = '''
import os, sys
sys.path.insert(0, os.getcwd())
import torch
import model as M
import parallel as P

P.dist_setup("cpu")
args = M.ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, intermediate_size=64,
                   max_seq_len=64)
x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def make():
    m = P.fsdp_wrap(M.Transformer.from_args(args, seed=0))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


def step(m, opt):
    opt.zero_grad()
    m(x).logsumexp(-1).mean().backward()
    opt.step()


a, opt_a = make()
step(a, opt_a)
step(a, opt_a)
state = P.optim_state(a, opt_a)  # gathered in full, as last/optimizer.pt
if P.is_main():
    torch.save(state, sys.argv[1])
torch.distributed.barrier()
b, opt_b = make()  # a resumed run: the saved weights, then the saved optimiser state
b.load_state_dict(a.state_dict())
P.load_optim_state(b, opt_b, sys.argv[1])
for p, q in zip(a.parameters(), b.parameters()):
    sa, sb = opt_a.state[p], opt_b.state[q]
    assert all(torch.equal(sa[k].to_local(), sb[k].to_local()) for k in ("exp_avg", "exp_avg_sq")), "moments"
    assert float(sa["step"]) == float(sb["step"]) == 2.0
step(a, opt_a)
step(b, opt_b)  # the next step is the uninterrupted run's, to the bit
assert all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(a.parameters(), b.parameters())), "weights"
print("resumed the same")
P.dist_end()
'''


def test_fsdp_optimizer_state_saved_in_full_resumes_each_ranks_shard(tmp_path):
    """--fsdp saves AdamW's state gathered in full (parallel.optim_state) and a resume shards it back
    (load_optim_state): each rank's moments are the ones it had, and the next step is the same."""
    script = tmp_path / "fsdp_resume.py"
    script.write_text(FSDP_RESUME)
    assert "resumed the same" in _torchrun(str(script), [str(tmp_path / "optimizer.pt")])
