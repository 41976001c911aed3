"""Run folders hold no code: every run-state file is read as tensors and plain containers, and a
crafted, damaged or truncated one stops the run with one line naming it and what to do."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import parallel as P
import runtime as RT
from test_implicit import MICRO, _run


class Crafted:
    """A pickle that, loaded with weights_only=False, would create `marker` (stands for any code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refused(args, path: str, fix: str):
    r = subprocess.run([sys.executable, "train_implicit.py", *args], capture_output=True, text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last.startswith(f"error: {path}: ") and last.endswith(fix), last


def test_a_crafted_or_damaged_run_file_of_each_kind_is_refused_and_runs_no_code(tmp_path):
    out, marker = str(tmp_path / "run"), str(tmp_path / "code-ran")
    args = [*MICRO, "--traj_batch", "3", "--out", out]
    _run([*args, "--iterations", "1"])
    run = os.path.join(out, "implicit")
    last, sft = os.path.join(run, "last"), os.path.join(out, "sft")
    torch_files = [  # (file, what the line says to do); the run resumed with --iterations 2 reads each
        ("implicit/collect-2.pt", "delete it to collect this iteration again"),
        ("implicit/collect-2-partial.pt", "delete it to start that part over"),
        ("implicit/scores-collect-2-partial.pt", "delete it to start that part over"),  # kept_map's, beside it
        ("implicit/last/method.pt", f"delete {last} to rerun this method from the novice"),
        ("implicit/last/optimizer.pt", f"delete {last} to rerun this method from the novice"),
        ("implicit/eval-iter2-dev/partial.pt", "delete it to start that part over"),  # an evaluation's
    ]
    json_files = [  # cut off mid-write (a kill, a full disk)
        ("sft/trainer_state.json", f"delete {sft} to train the novice again"),
        ("novice.json", "delete it (this run's options then go unchecked against the novice's)"),
        ("eval/sft-test/summary.json", "delete it to evaluate again"),
        ("implicit/config.json", "delete it to resume with this run's options"),
        ("implicit/last/trainer_state.json", f"delete {last} to rerun this method from the novice"),
    ]
    for name, fix in torch_files + json_files:
        path = os.path.join(out, name)
        kept = path + ".kept"
        if os.path.exists(path):
            shutil.copy(path, kept)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for bad in ("crafted", "truncated") if name.endswith(".pt") else ("cut",):
            if bad == "crafted":
                torch.save(Crafted(marker), path)
            else:
                with open(path, "wb") as f:
                    f.write(b"PK\x03\x04 half of a file" if bad == "truncated" else b'{"epoch": 1, "st')
            _refused(args, path, fix)
            assert not os.path.exists(marker), name  # refused before any code in it could run
        os.remove(path)
        if os.path.exists(kept):
            os.replace(kept, path)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 99, "losses/d')  # a torn last line: dropped with a note, the run goes on
    # and with every file back, the run goes on to iteration 2
    r = subprocess.run([sys.executable, "train_implicit.py", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "its last line was cut off (a kill or a full disk); dropped" in r.stdout + r.stderr
    assert os.path.exists(os.path.join(run, "iter2", "model.safetensors"))
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    assert all(json.loads(x)["step"] != 99 for x in lines if '"step"' in x)


def test_truncate_log_drops_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    good = [json.dumps({"step": i, "loss": 0.5}) for i in (1, 2, 3)]
    open(path, "w").write("\n".join(good) + '\n{"step": 4, "lo')
    assert [x["step"] for x in RT.truncate_log(path, 3, False)] == [1, 2, 3]
    assert open(path).read() == "\n".join(good) + "\n"
    open(path, "w").write(good[0] + "\n{oops\n" + good[1] + "\n")
    with pytest.raises(SystemExit, match=f"error: {path}: line 2 is not JSON"):
        RT.truncate_log(path, 3, False)


def test_load_state_and_optimizer_state_refuse_code_in_one_line(tmp_path):
    marker, path = str(tmp_path / "code-ran"), str(tmp_path / "state.pt")
    torch.save(Crafted(marker), path)
    with pytest.raises(SystemExit, match=f"error: {path}: not a run-state file this project can read .*; do this"):
        RT.load_state(path, "do this")
    model = torch.nn.Linear(2, 2)
    model.device = torch.device("cpu")
    with pytest.raises(SystemExit, match=f"error: {path}: cannot read the optimiser state .*; delete"):
        P.load_optim_state(model, torch.optim.AdamW(model.parameters()), path)
    torch.save({"key": {}, "results": []}, path)  # a torch file, but not a partial file's fields
    with pytest.raises(SystemExit, match=f"error: {path}: not a partial file of this project"):
        RT.Partial(path, {"items": []})
    assert not os.path.exists(marker)
    good = {"key": {"items": ["a"]}, "done": 1, "results": [[{"x": 1}], 2], "seconds": 1.5, "generator": None}
    torch.save(good, path)  # what Partial.save writes loads as it was
    kept = RT.Partial(path, {"items": ["a"]})
    assert (kept.done, kept.results, RT.partial_seconds(path)) == (1, [[{"x": 1}], 2], 1.5)
