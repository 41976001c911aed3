"""results.py: the mean ± spread helper by hand; the table command end to end on a micro config
(numbers in RESULTS.md = the run folders' summary.json files, rerun trains nothing, missing cells
marked); a micro K sweep. A micro model learns nothing: the numbers checked are plumbing."""
import glob
import hashlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys

import pytest

import report as RP
import results as R
from test_implicit import MICRO, _run
import sft as SFT
import stepagent as S

SPLITS = ("test", "test_unseen")
# MICRO with the table's --envs / --seeds in place of --env: hotpotqa, 2 seeds, 2 test tasks, 2 iterations
TABLE = [*MICRO[2:], "--envs", "hotpotqa", "--seeds", "0,1", "--traj_batch", "3"]


def test_mean_spread_by_hand():
    m, sd = RP.mean_spread([0.1, 0.2, 0.6])  # mean 0.3; squared deviations 0.04 + 0.01 + 0.09 = 0.14, / (3 - 1)
    assert abs(m - 0.3) < 1e-12 and abs(sd - math.sqrt(0.07)) < 1e-12
    assert RP.mean_spread([0.5]) == (0.5, None) and RP.mean_spread([1.0, 1.0]) == (1.0, 0.0)
    assert RP.fmt({0: 0.1, 1: 0.2, 2: 0.6}, 3) == "0.300 ± 0.265"
    assert RP.fmt({0: 0.25}, 1) == "0.250"
    assert RP.fmt({1: 0.1}, 2) == "0.100 (1/2 seeds)" and RP.fmt({}, 2) == "—"


def _summary_path(out, seed, run, split):
    cell = os.path.join(out, f"hotpotqa-seed{seed}")
    folder = os.path.join("eval", f"sft-{split}") if run == "novice" else os.path.join(run, f"eval-iter2-{split}")
    return os.path.join(cell, folder, "summary.json")


def _expected(out, run, split, metric, seeds=(0, 1)):
    """The cell as the summary files on disk give it, computed here with the statistics module."""
    vals = []
    for s in seeds:
        p = _summary_path(out, s, run, split)
        if os.path.exists(p):
            d = json.load(open(p))
            assert (d["split"], d["n"], d["seed"]) == (split, 2, s)
            vals.append(d[metric])
    if not vals:
        return "—"
    text = f"{statistics.mean(vals):.3f}" if len(vals) == 1 else f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"
    return text if len(vals) == len(seeds) else f"{text} ({len(vals)}/{len(seeds)} seeds)"


def _rows(md, env="hotpotqa"):
    """The env's table of RESULTS.md (or of one section of it): row label -> its cells."""
    lines = md.split(f"### {env}\n")[1].strip().split("\n\n")[0].splitlines()[2:]
    return {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines)}


def _check_table(out, md):
    rows = _rows(md)
    assert list(rows) == ["novice (SFT)", "SFT-continued", "ETO", "outcome-PPO", "StepAgent-Implicit", "StepAgent-Inverse"]
    for run in R.ROWS:
        want = [_expected(out, run, split, metric) for split in SPLITS for metric in ("success_rate", "avg_reward")]
        assert rows[R.LABEL[run]][:4] == want, run
    return rows


def _invalid_rows(md, env="hotpotqa"):
    block = md.split(f"### {env}\n")[1].split("| method | test steps |")[1].split("\n\n")[0]
    return {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in block.splitlines()[2:])}


def _invalid_expected(out, run, seeds=(0, 1)):
    """Mean steps and invalid share per split, counted here from trajectories.json by the observations' text."""
    cells = []
    for split in SPLITS:
        steps, shares = [], []
        for s in seeds:
            folder = os.path.dirname(_summary_path(out, s, run, split))
            obs = [t["value"] for r in json.load(open(os.path.join(folder, "trajectories.json")))
                   for t in r["conversations"][2::2]]
            bad = ("Observation: Invalid action", "Observation: No page is open")
            shares.append(sum(o.startswith(bad) for o in obs) / len(obs))
            steps.append(json.load(open(os.path.join(folder, "summary.json")))["avg_steps"])
        cells += [f"{statistics.mean(steps):.2f}", f"{statistics.mean(shares):.2f}"]
    return cells


def _tasks_text(out, a, b, split="test", seeds=(0, 1)):
    """The verdicts' per-task part: tasks only a solved, only b solved (by id, summed over seeds)."""
    def ok(run, seed):
        path = os.path.join(os.path.dirname(_summary_path(out, seed, run, split)), "trajectories.json")
        return {r["task"]["id"] for r in json.load(open(path)) if r["reward"] == 1.0}  # hotpotqa: success = exact match
    x = sum(len(ok(a, s) - ok(b, s)) for s in seeds)
    y = sum(len(ok(b, s) - ok(a, s)) for s in seeds)
    return f"tasks solved by it alone {x}, by the other alone {y}: sign test p = {RP.sign_test(x, y):.2g}"


def test_sign_test_by_hand():
    # 3 vs 13 discordant: 2 * (C(16,0) + C(16,1) + C(16,2) + C(16,3)) / 2^16 = 2 * 697 / 65536
    assert RP.sign_test(3, 13) == RP.sign_test(13, 3) == 2 * 697 / 65536
    assert RP.sign_test(0, 6) == 2 / 64 and RP.sign_test(5, 5) == 1.0 and RP.sign_test(0, 0) == 1.0


def test_verdicts_show_reward_where_success_ties():
    # one seed, every method at 0 success: the reward on the seeds both have is what tells them apart
    keys = [*R.OURS, *R.BASELINES]
    cells = {(k, "test"): {0: 0.0} for k in keys}
    rewards = {(k, "test"): {0: 0.1 + 0.01 * i} for i, k in enumerate(keys)}
    ours, base = R.OURS[0], R.BASELINES[0]
    cells[ours, "test"] = {0: 0.0, 1: 0.5}  # a seed the baseline lacks: judged on seed 0 alone
    rewards[ours, "test"] = {0: 0.25, 1: 0.9}
    lines = {x.split(":")[0]: x for x in RP.verdicts(cells, 2, ("test",), rewards=rewards)}
    first = lines[f"- {R.LABEL[ours]} vs {R.LABEL[base]}"]
    assert first.endswith("test (seed 0 so far) success 0.000 vs 0.000, **does not beat it** "
                          f"(equal; average reward 0.250 vs {rewards[base, 'test'][0]:.3f})")
    cells[ours, "test"] = {0: 0.5}  # success differs: judged on it, no reward shown
    lines = {x.split(":")[0]: x for x in RP.verdicts(cells, 1, ("test",), rewards=rewards)}
    assert "reward" not in lines[f"- {R.LABEL[ours]} vs {R.LABEL[base]}"]
    del rewards[base, "test"]  # a reward missing: nothing to show, the success verdict stands alone
    cells[ours, "test"] = {0: 0.0}
    lines = {x.split(":")[0]: x for x in RP.verdicts(cells, 1, ("test",), rewards=rewards)}
    assert lines[f"- {R.LABEL[ours]} vs {R.LABEL[base]}"].endswith("success 0.000 vs 0.000, **does not beat it** (equal)")
    a, b = [55 / 200, 59 / 200, 33 / 200], [59 / 200, 34 / 200, 54 / 200]  # 147 tasks each, summed in other orders
    assert sum(a) / 3 != sum(b) / 3  # floats: the two means differ in the last bit
    cells = {**cells, (ours, "test"): dict(enumerate(a)), (base, "test"): dict(enumerate(b))}
    line = {x.split(":")[0]: x for x in RP.verdicts(cells, 3, ("test",))}[f"- {R.LABEL[ours]} vs {R.LABEL[base]}"]
    assert "success 0.245 vs 0.245, **does not beat it** (equal; 1/3 seeds higher" in line


def _fingerprint(out):
    files = sorted(glob.glob(os.path.join(out, "*", "*", "metrics.jsonl")) + glob.glob(os.path.join(out, "*", "*", "last", "*")))
    return {f: hashlib.md5(open(f, "rb").read()).hexdigest() for f in files}


def _edit(path, **kv):
    d = json.load(open(path))
    json.dump({**d, **kv}, open(path, "w"))


def test_updates_count_only_a_finished_iteration(tmp_path):
    """A run stopped inside its last iteration has no budget to report yet ("—"), not its steps so far."""
    run = tmp_path / "implicit"
    run.mkdir()
    steps = [{"step": s, "iteration": 1 + (s > 2), "losses/dpo": 0.6} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in steps))
    assert RP.updates(str(tmp_path), "implicit", 1) is None and RP.updates(str(tmp_path), "implicit", 2) is None
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "iteration", "iteration": 1, "test_success": 0.1}) + "\n")
    assert RP.updates(str(tmp_path), "implicit", 1) == 2 and RP.updates(str(tmp_path), "implicit", 2) is None
    # a step logged twice (killed after logging it, before saving it; the rerun did it again) counts once
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + "".join(lines))
    assert RP.updates(str(tmp_path), "implicit", 1) == 2
    # the novice likewise: 2 pretraining + 4 SFT epochs (novice.json), stopped after epoch 3 of them
    (tmp_path / "sft").mkdir()
    (tmp_path / "novice.json").write_text(json.dumps({"preset": "tiny", "sft_epochs": 4, "pretrain_epochs": 2}))
    for epoch, want in ((3, None), (6, 750)):
        (tmp_path / "sft" / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "step": 125 * epoch}))
        assert RP.updates(str(tmp_path), "novice", 2) == want


def test_signals_by_hand(tmp_path):
    """Training signals: an update signal is the median of an iteration's first and last EDGE updates, an
    event's its value; an unfinished iteration is left out; the table averages over the seeds present."""
    cfg = R.TableConfig(out=str(tmp_path), envs="hotpotqa", seeds="0,1", iterations=2)
    for seed, shift in ((0, 0.0), (1, 1.0)):
        run = tmp_path / f"hotpotqa-seed{seed}" / "inverse"
        run.mkdir(parents=True)
        d = [{"step": s, "iteration": 1, "losses/disc": 9.0} for s in (1, 2)]  # D steps carry no clip_frac
        pg = [{"step": 2 + s, "iteration": 1, "policy/clip_frac": (50 if s == 5 else s) + shift}
              for s in range(1, 8)]  # 1, 2, 3, 4, 50, 6, 7 (+1): a spike the medians pass over
        ev = [{"event": "disc", "iteration": 1, "disc/acc_expert": 0.25 + shift, "losses/disc": 0.5},
              {"event": "iteration", "iteration": 1}, {"step": 10, "iteration": 2, "policy/clip_frac": 100.0}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in d + ev[:1] + pg + ev[1:]))
    got = RP.signals(str(tmp_path / "hotpotqa-seed0"), "inverse")
    assert list(got) == ["1"]  # iteration 2 has not finished
    assert got["1"]["clip fraction"] == [3.0, 6.0]  # median(1, 2, 3, 4, 50), median(3, 4, 50, 6, 7)
    assert got["1"]["D accuracy on expert actions"] == 0.25 and got["1"]["D loss"] == 0.5
    assert "D accuracy on agent actions" not in got["1"]
    rows = {x.split(" | ")[1]: x for x in RP.signals_section(cfg, "hotpotqa") if x.startswith("| StepAgent-Inverse")}
    assert rows["clip fraction"] == "| StepAgent-Inverse | clip fraction | 3.5 → 6.5 | — |"  # seeds 3 -> 6, 4 -> 7
    assert rows["D accuracy on expert actions"] == "| StepAgent-Inverse | D accuracy on expert actions | 0.75 | — |"
    assert set(rows) == {"clip fraction", "D accuracy on expert actions", "D loss"}


def test_table_end_to_end(tmp_path):
    out, res = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md")
    cmd = ["table", *TABLE, "--out", out, "--results", res]
    _run(cmd, script="results.py")
    md = open(res).read()
    assert f"Command: `python results.py {shlex.join(cmd)}`" in md
    # each method's equivalent script command carries the table's fp32 (the scripts' default is auto)
    eto = next(x for x in md.splitlines() if x.startswith("- ETO: "))
    assert eto.startswith("- ETO: `python train_implicit.py --level trajectory ") and " --amp none " in eto
    rows = _check_table(out, md)
    assert "All cells computed." in md and "Not computed yet" not in md
    # equal budget: SFT-continued takes ceil(6 experts / traj_batch 3) = 2 updates per iteration, 2 iterations
    assert rows["SFT-continued"][4] == "4"
    sft = [json.loads(x) for x in open(os.path.join(out, "hotpotqa-seed1", "sft-continued", "metrics.jsonl"))]
    assert [x["trajectories"] for x in sft if "losses/sft" in x] == [3, 3, 3, 3]
    assert "StepAgent-Implicit, inspection 2 (2 seeds)" in md  # match rate per step index
    signal = [x for x in md.split("### hotpotqa")[1].splitlines() if x.startswith("| ") and " | DPO loss | " in x]
    assert [x.split(" | ")[0] for x in signal] == ["| ETO", "| StepAgent-Implicit"]  # and D's accuracy per iteration:
    assert next(x for x in md.splitlines() if "| D accuracy on expert actions |" in x).count(" | ") == 3
    assert _invalid_rows(md) == {R.LABEL[run]: _invalid_expected(out, run) for run in R.ROWS}
    # an evaluation made before summary.json recorded invalid_share: counted from its trajectories
    path = _summary_path(out, 0, "eto", "test")
    d = json.load(open(path))
    del d["invalid_share"]
    json.dump(d, open(path, "w"))
    trajs = os.path.join(os.path.dirname(path), "trajectories.json")
    recs = json.load(open(trajs))
    recs[0]["conversations"][2]["value"] = "Observation: Could not find Zqx. Similar: []."  # a valid search
    json.dump(recs, open(trajs, "w"))
    _run(["report", "--out", out, "--results", res], script="results.py")
    eto = _invalid_rows(open(res).read())["ETO"]
    assert eto == _invalid_expected(out, "eto") and eto != _invalid_rows(md)["ETO"]
    md = open(res).read()

    # rerun: nothing is trained again
    before = _fingerprint(out)
    assert len([f for f in before if f.endswith("metrics.jsonl")]) == 10  # 5 methods x 2 seeds
    stdout = _run(["table", *TABLE, "--out", out, "--results", res], script="results.py")
    assert "novice already trained" in stdout and "after update" not in stdout  # no reflection half done
    assert _fingerprint(out) == before

    # numbers that differ per seed, one cell gone and one half gone: `report` re-reads the files
    for seed, (succ, rew) in enumerate([(0.5, 0.25), (0.0, 0.75)]):
        _edit(_summary_path(out, seed, "eto", "test"), success_rate=succ, avg_reward=rew)
    for seed, succ in enumerate([1.0, 0.5]):
        _edit(_summary_path(out, seed, "implicit", "test"), success_rate=succ)
    for seed, succ in enumerate([0.0, 1.0]):
        _edit(_summary_path(out, seed, "inverse", "test"), success_rate=succ)
    for seed, run, solved in ((0, "implicit", [0]), (1, "eto", [0, 1]), (1, "implicit", [1])):  # per-task counts
        trajs = os.path.join(os.path.dirname(_summary_path(out, seed, run, "test")), "trajectories.json")
        recs = json.load(open(trajs))
        for i in solved:
            recs[i].update(success=True, reward=1.0)
        json.dump(recs, open(trajs, "w"))
    for seed in (0, 1):
        os.remove(_summary_path(out, seed, "ppo-outcome", "test_unseen"))
    os.remove(_summary_path(out, 1, "inverse", "test_unseen"))
    for seed, amp in enumerate(["none", "bf16"]):  # novices trained on machines that --amp auto sent different ways
        _edit(os.path.join(out, f"hotpotqa-seed{seed}", "sft", "trainer_state.json"), amp=amp)
    _run(["report", "--out", out, "--results", res], script="results.py")
    md = open(res).read()
    assert ("Training precision of the novices (`amp` in sft/trainer_state.json; the methods train in what the "
            "command's --amp picks on the same machine): fp32 on seed 0; bf16 autocast (fp32 weights) on seed 1.") in md
    rows = _check_table(out, md)
    assert rows["ETO"][:2] == [f"0.250 ± {math.sqrt(0.125):.3f}", f"0.500 ± {math.sqrt(0.125):.3f}"]
    assert rows["outcome-PPO"][2:4] == ["—", "—"] and rows["StepAgent-Inverse"][2].endswith("(1/2 seeds)")
    assert "Not computed yet: outcome-PPO test_unseen (seed 0, 1); StepAgent-Inverse test_unseen (seed 1)." in md
    verdict = {x.split(":")[0]: x for x in md.splitlines() if x.startswith("- StepAgent-")}
    # paired by seed: 1.0 - 0.5 and 0.5 - 0.0 beat ETO on both seeds though the means' spreads overlap
    # (the summaries were edited, the trajectories not: the per-task counts are the trajectories')
    assert verdict["- StepAgent-Implicit vs ETO"].startswith(
        "- StepAgent-Implicit vs ETO: test success 0.750 vs 0.250, beats it on every seed "
        f"(2/2 seeds higher; paired difference +0.500 ± 0.000; {_tasks_text(out, 'implicit', 'eto')}); test_unseen success")
    assert "tasks solved by it alone 1, by the other alone 1: sign test p = 1" in verdict["- StepAgent-Implicit vs ETO"]
    # test_unseen on the seeds both have (inverse's seed 1 is gone): the micro models solve none there
    inv, eto = (json.load(open(_summary_path(out, 0, r, "test_unseen"))) for r in ("inverse", "eto"))
    assert inv["success_rate"] == eto["success_rate"] == 0.0
    reward = f"average reward {inv['avg_reward']:.3f} vs {eto['avg_reward']:.3f}"  # shown where success is equal
    assert verdict["- StepAgent-Inverse vs ETO"] == (  # 0.0 - 0.5 and 1.0 - 0.0
        "- StepAgent-Inverse vs ETO: test success 0.500 vs 0.250, higher on average, not on every seed "
        f"(1/2 seeds higher; paired difference +0.250 ± {math.sqrt(1.125):.3f}; {_tasks_text(out, 'inverse', 'eto')}); "
        "test_unseen (seed 0 so far) success 0.000 vs 0.000, **does not beat it** "
        f"(equal; {reward}; {_tasks_text(out, 'inverse', 'eto', 'test_unseen', seeds=(0,))})")
    assert verdict["- StepAgent-Inverse vs outcome-PPO"].endswith("; test_unseen: not computed yet")
    assert "| ETO | 0.500 | 0.000 |" in md and "| StepAgent-Implicit | 1.000 | 0.500 |" in md  # per seed

    # the table command fills the missing cells (evaluations only) and leaves the training alone
    _run(["table", *TABLE, "--out", out, "--results", res], script="results.py")
    md = open(res).read()
    assert "All cells computed." in md and _fingerprint(out) == before
    _check_table(out, md)

    # the run folders gone (a fresh clone): results/records.json beside RESULTS.md gives the same report
    records = tmp_path / "results" / "records.json"
    shutil.move(out, out + "-elsewhere")
    _run(["report", "--out", out, "--results", res], script="results.py")
    assert open(res).read() == md
    # ... but only to a command with the options that made them: other options are other runs
    saved = json.loads(records.read_text())
    other = json.loads(records.read_text())
    other["commands"]["table"][0] += ["--beta", "0.5"]
    records.write_text(json.dumps(other))
    _run(["report", "--out", out, "--results", res], script="results.py")
    changed = open(res).read()
    assert "Not computed yet: every cell" in changed and set(_rows(changed)["ETO"]) == {"—"}
    # no records and no run folders: the previous RESULTS.md's section is kept, and says so
    open(res, "w").write(md)
    records.write_text(json.dumps({"commands": saved["commands"], "cells": {}}))
    _run(["report", "--out", out, "--results", res], script="results.py")
    kept = open(res).read()
    assert RP.KEPT_NOTE in kept and kept.replace(RP.KEPT_NOTE + "\n\n", "") == md


def test_sweep_k_micro(tmp_path, monkeypatch):
    """K = 1 and 2 for both StepAgent methods: the inverse one skips K = 1; without matplotlib a note."""
    out, res, block = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md"), tmp_path / "block"
    i = MICRO.index("--iterations")
    args = [*MICRO[2:i], *MICRO[i + 2:], "--envs", "hotpotqa", "--seeds", "0", "--traj_batch", "3", "--iterations", "1",
            "--ks", "1,2"]
    _run(["sweep", "--what", "k", *args, "--out", out, "--results", res], script="results.py")
    cell = os.path.join(out, "hotpotqa-seed0")
    assert sorted(os.listdir(cell)) == sorted(["base", "data", "eval", "implicit", "implicit-k1", "inverse", "novice.json",
                                               "sft", "sft_metrics.jsonl", "tokenizer"])  # K = 2 is --k's own run
    assert json.load(open(os.path.join(cell, "implicit-k1", "config.json")))["k"] == 1
    md = open(res).read()
    k1 = json.load(open(os.path.join(cell, "implicit-k1", "eval-iter1-test", "summary.json")))["success_rate"]
    k2 = json.load(open(os.path.join(cell, "inverse", "eval-iter1-test", "summary.json")))["success_rate"]
    assert f"| hotpotqa | StepAgent-Implicit | {k1:.3f} |" in md and f"| hotpotqa | StepAgent-Inverse | n/a | {k2:.3f} |" in md
    assert "## Methods on the built-in environments" in md  # the table section, all missing: honest, not absent
    assert "Not computed yet: every cell" in md
    if importlib.util.find_spec("matplotlib"):
        assert "![test success against the practice number K](results/sweep-k.png)" in md
        assert open(tmp_path / "results" / "sweep-k.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # its run folders gone (a fresh clone): records.json keeps them relative to the sweep's own --out,
    # so a report from another --out (the default folder, say, where the table is made) still finds them
    shutil.move(out, out + "-elsewhere")
    _run(["report", "--out", str(tmp_path / "table-runs"), "--results", res], script="results.py")
    assert open(res).read().split("## Sweep")[1] == md.split("## Sweep")[1]
    shutil.move(out + "-elsewhere", out)
    # the plot needs matplotlib; without it (an import that fails) the report says so and still writes
    block.mkdir()
    (block / "matplotlib.py").write_text("raise ImportError('blocked for the test')\n")
    monkeypatch.setenv("PYTHONPATH", str(block))
    _run(["report", "--out", out, "--results", res], script="results.py")
    assert "(No plot: matplotlib is not installed" in open(res).read()


def test_table_methods_runs_a_subset_and_reports_the_rest_missing(tmp_path):
    out, res = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md")
    _run(["table", *TABLE, "--methods", "sft-continued", "--out", out, "--results", res], script="results.py")
    for cell in glob.glob(os.path.join(out, "hotpotqa-seed*")):
        trained = sorted(d for d in os.listdir(cell) if os.path.exists(os.path.join(cell, d, "metrics.jsonl")))
        assert trained == ["sft-continued"]
    assert len(glob.glob(os.path.join(out, "hotpotqa-seed*"))) == 2
    rows = _check_table(out, open(res).read())
    assert rows["SFT-continued"][0] != "—" and rows["ETO"][:4] == ["—"] * 4
    r = subprocess.run([sys.executable, "results.py", "table", "--methods", "implicit,inverted"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "inverted" in r.stderr and "Traceback" not in r.stderr


def test_a_cell_made_in_parts_on_machines_without_runs(tmp_path):
    """runs/ lost between two pieces of a table: the second trains the novice again; the first piece's
    records stand in for its runs where the retrained novice has the same weights, are dropped where it
    has other weights, and are kept but not shown where nothing tells (a record from before digests, its
    novice's recorded test evaluation played otherwise here); shown, with the digest from then on, where the
    novice here plays the novice test evaluation recorded with them."""
    out, res, records = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md"), tmp_path / "results" / "records.json"
    _run(["table", *TABLE, "--methods", "sft-continued", "--out", out, "--results", res], script="results.py")
    first = _rows(open(res).read())

    def runs_kept(seed):
        return sorted(k for sec in json.load(open(records))["cells"].values() for k in sec
                      if k.startswith(f"hotpotqa-seed{seed}/sft-continued/"))
    kept = {seed: runs_kept(seed) for seed in (0, 1)}
    assert kept[0] and kept[1]
    shutil.move(out, out + "-lost")  # the next machine has the records, not the folders
    cells = json.loads(records.read_text())
    novice_test = "hotpotqa-seed1/eval/sft-test"
    for sec in cells["cells"].values():  # seed 1's SFT-continued and novice as recorded before digests were,
        sec.pop("hotpotqa-seed1/sft-continued#novice")
        sec.pop(novice_test + "#novice")
        sec[novice_test + "/summary.json"]["avg_steps"] += 1  # by a novice that played otherwise
    records.write_text(json.dumps(cells))
    _run(["table", *TABLE, "--methods", "eto", "--out", out, "--results", res], script="results.py")
    assert not os.path.exists(os.path.join(out, "hotpotqa-seed0", "sft-continued"))
    for seed in (0, 1):  # the novice came out the same: what the records' runs started from
        a, b = (open(os.path.join(o, f"hotpotqa-seed{seed}", "sft", "model.safetensors"), "rb").read()
                for o in (out + "-lost", out))
        assert a == b
    md = open(res).read()
    one = _expected(out + "-lost", "sft-continued", "test", "success_rate", seeds=(0,))
    assert _rows(md)["SFT-continued"][0] == f"{one} (1/2 seeds)" and "SFT-continued test (seed 1)" in md
    assert _rows(md)["novice (SFT)"] == first["novice (SFT)"] and "—" not in _rows(md)["ETO"][:4]
    assert runs_kept(0) == kept[0] and runs_kept(1) == kept[1]
    # while the novice trains again, nothing to compare with: not shown, but carried to records.json
    state = os.path.join(out, "hotpotqa-seed0", "sft", "trainer_state.json")
    saved = open(state).read()
    _edit(state, epoch=1)
    _run(["report", "--out", out, "--results", res], script="results.py")
    assert "SFT-continued test (seed 0, 1)" in open(res).read() and runs_kept(0) == kept[0]
    open(state, "w").write(saved)
    _run(["report", "--out", out, "--results", res], script="results.py")
    assert _rows(open(res).read())["SFT-continued"][0] == f"{one} (1/2 seeds)"
    # a novice with other weights (another machine's kernels, another code): the folder is the truth
    path = os.path.join(out, "hotpotqa-seed0", "sft", "model.safetensors")
    from safetensors.torch import load_file, save_file
    w = load_file(path)
    name = sorted(w)[0]
    w[name] = w[name] + 1e-3
    save_file(w, path, metadata={"format": "pt"})
    _run(["report", "--out", out, "--results", res], script="results.py")
    assert set(_rows(open(res).read())["SFT-continued"][:4]) == {"—"}
    assert runs_kept(0) == [] and runs_kept(1) == kept[1]
    # seed 1's novice test evaluation as recorded before digests by a novice that played as this one
    # (its time aside): the run recorded beside it is taken to have started from the novice here
    cells = json.loads(records.read_text())
    for sec in cells["cells"].values():
        sec.pop(novice_test + "#novice")
        sec[novice_test + "/summary.json"]["seconds"] += 5
    records.write_text(json.dumps(cells))
    _run(["report", "--out", out, "--results", res], script="results.py")
    one = _expected(out + "-lost", "sft-continued", "test", "success_rate", seeds=(1,))
    assert _rows(open(res).read())["SFT-continued"][0] == f"{one} (1/2 seeds)" and runs_kept(1) == kept[1]
    sec, = json.load(open(records))["cells"].values()
    assert sec["hotpotqa-seed1/sft-continued#novice"] == sec[novice_test + "#novice"] == RP.novice_digest(
        os.path.join(out, "hotpotqa-seed1"))


def test_table_with_a_model_folder_preset_on_an_env_without_test_unseen(tmp_path):
    """--preset <folder> on textworld-express (no test_unseen split): the cells go to
    <out>/<folder name>/<env>-seed<seed>, RESULTS.md gets a section of its own beside the tiny table's,
    test_unseen is n/a there (never evaluated), and the verdicts are on test alone."""
    pytest.importorskip("textworld_express")
    # a micro from-scratch model in the Hugging Face layout, standing in for a real checkpoint
    cfg = S.Config(env="hotpotqa", n_train=6, out=str(tmp_path / "make"), vocab_size=300, dim=32, n_layers=1, n_heads=2)
    SFT._make_tiny_base(cfg, SFT.expert_data(cfg), str(tmp_path / "micro-llama"))
    out, res = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md")
    i = MICRO.index("--iterations")
    args = [*MICRO[2:i], *MICRO[i + 2:], "--iterations", "1", "--envs", "textworld-express", "--seeds", "0",
            "--traj_batch", "3", "--methods", "implicit", "--preset", str(tmp_path / "micro-llama")]
    _run(["table", *args, "--out", out, "--results", res], script="results.py")
    cell = os.path.join(out, "micro-llama", "textworld-express-seed0")
    assert os.path.exists(os.path.join(cell, "implicit", "iter1", "config.json"))
    assert not glob.glob(os.path.join(out, "**", "*test_unseen*"), recursive=True)
    md = open(res).read()
    assert "## Methods on the built-in environments" in md  # the tiny table's section (nothing run: all missing)
    section = md.split(f"## Methods with the {tmp_path / 'micro-llama'} preset")[1]
    rows = _rows(section, "textworld-express")
    got = json.load(open(os.path.join(cell, "implicit", "eval-iter1-test", "summary.json")))
    assert rows["StepAgent-Implicit"][:4] == [f"{got['success_rate']:.3f}", f"{got['avg_reward']:.3f}", "n/a", "n/a"]
    assert "Not computed yet: SFT-continued test (seed 0); ETO test (seed 0);" in section  # test_unseen not listed
    assert "test_unseen" not in "".join(x for x in section.splitlines() if x.startswith("- StepAgent-"))
    # steps and invalid share with one seed, seed 0 (a table that once dropped, its only key being falsy)
    block = section.split("| method | test steps | test invalid |")[1].split("\n\n")[0].splitlines()
    assert f"| StepAgent-Implicit | {got['avg_steps']:.2f} | {got['invalid_share']:.2f} |" in block


def test_commands_are_recorded_per_option_set(tmp_path):
    """A table run piece by piece records one command covering its envs and seeds; a preset's runs
    with other options (a second env with its own task counts) keep a section each; other options
    on the same env replace the recorded command; the earlier one-command format still reads."""
    tw = ["table", "--preset", "smollm2", "--envs", "textworld-express", "--seeds", "0", "--n_test", "50",
          "--methods", "implicit"]
    sw = ["table", "--preset", "smollm2", "--envs", "scienceworld", "--seeds", "0", "--n_test", "30"]
    rec = {"table-smollm2": tw}  # the earlier format
    assert R.commands(rec, "table-smollm2") == [tw]
    rec["table-smollm2"] = R.record_command(rec, "table-smollm2", sw)
    assert rec["table-smollm2"] == [tw, sw]
    more = R.record_command(rec, "table-smollm2", [*sw[:5], "--seeds", "2", "--n_test", "30", "--methods", "eto"])
    assert more == [tw, [*sw[:6], "0,2", "--n_test", "30"]]  # seeds joined, --methods dropped
    assert R.record_command(rec, "table-smollm2", [*sw[:7], "--n_test", "40"]) == [tw, [*sw[:7], "--n_test", "40"]]
    # the tiny table run env by env: its default envs and seeds, recorded as the bare command
    table = []
    for env in ("webshop", "household", "hotpotqa"):
        for seed in ("0", "1,2"):
            table = R.record_command({"table": table}, "table", ["table", "--envs", env, "--seeds", seed])
    assert table == [["table"]]
    sweep = R.record_command({}, "sweep-k", ["sweep", "--what", "k", "--envs", "webshop", "--ks", "1,2"])
    assert R.record_command({"sweep-k": sweep}, "sweep-k", ["sweep", "--what", "k", "--envs", "hotpotqa", "--ks", "4"]) \
        == [["sweep", "--what", "k", "--envs", "hotpotqa", "--ks", "4"]]  # a sweep keeps one command
    # the report: a section per recorded preset command, each with its own task count
    out, res = tmp_path / "runs", str(tmp_path / "RESULTS.md")
    out.mkdir()
    (out / "commands.json").write_text(json.dumps({"table-smollm2": [[*c, "--out", str(out)] for c in (tw, sw)]}))
    _run(["report", "--out", str(out), "--results", res], script="results.py")
    md = open(res).read()
    for env, n in (("textworld-express", 50), ("scienceworld", 30)):
        section = md.split(f"## Methods with the smollm2 preset: {env}\n")[1].split("\n## ")[0]
        assert f"{n} test and {n} test_unseen tasks" in section and f"### {env}" in section
        assert "Not computed yet: every cell" in section


def test_previous_keeps_a_section_or_one_env_block_with_a_note(monkeypatch):
    """What `report` keeps where it reads nothing: the earlier RESULTS.md's section with the same heading
    and command (a sweep), or that section's block for one env (a table whose other envs are here)."""
    head = ["## Methods on the built-in environments", "", "Command: `python results.py table`"]
    old = ["# Results", "", *head, "", "Seeds 0.", "", "### webshop", "", "| a |", "", "### hotpotqa", "", "| b |", "",
           "## Sweep: test success against iterations", "", "Command: `python results.py sweep`", "", "| c |", ""]
    monkeypatch.setitem(RP._REC, "before", "\n".join(old))
    assert RP.previous(head, "webshop") == ["", "### webshop", "", RP.KEPT_NOTE, "", "| a |"]
    assert RP.previous(head, "hotpotqa") == ["", "### hotpotqa", "", RP.KEPT_NOTE, "", "| b |"]
    assert RP.previous(head, "household") is None
    assert RP.previous([*head[:2], "Command: `python results.py table --seeds 0`"]) is None  # another command
    section = RP.previous(head)
    assert section == [*head, "", RP.KEPT_NOTE, "", *old[6:15]]
    monkeypatch.setitem(RP._REC, "before", "\n".join(["# Results", "", *section]))
    assert RP.previous(head) == section  # kept again: still one note


def test_a_block_made_in_part_keeps_the_previous_kept_text_beneath(monkeypatch):
    """An env block whose cells are made here for some seeds only keeps the previous RESULTS.md's kept
    text of that env beneath it (cells made elsewhere before records.json existed), the same on every
    later report, until every cell is made; a block that was made, not kept, brings nothing along."""
    head = ["## Methods on the built-in environments", "", "Command: `python results.py table`"]
    old = ["# Results", "", *head, "", "Seeds 0, 1.", "", "### webshop", "", RP.KEPT_NOTE, "", "| a |", "",
           "### hotpotqa", "", "| b |", ""]
    monkeypatch.setitem(RP._REC, "before", "\n".join(old))
    assert RP.kept_part(head, "webshop") == ["", RP.KEPT_PART, "", "| a |"]
    assert RP.kept_part(head, "hotpotqa") == [] and RP.kept_part(head, "household") == []
    block = ["", "### webshop", "", "| made here, seed 0 |", "", "Not computed yet: ... (seed 1)."]
    again = ["# Results", "", *head, "", "Seeds 0, 1.", *block, *RP.kept_part(head, "webshop"), "", "### hotpotqa", "",
             "| b |", ""]
    monkeypatch.setitem(RP._REC, "before", "\n".join(again))
    assert RP.kept_part(head, "webshop") == ["", RP.KEPT_PART, "", "| a |"]  # the next report: the same, not nested

    # in table_section: seed 0's cells read here (values stubbed: each read counts as found), seed 1's not
    def values(cfg, env, name, split, metric, it=None, dim=None):
        RP._REC["found"] += 1
        return {} if split == "dev" else {0: 0.5}
    monkeypatch.setattr(RP, "values", values)
    monkeypatch.setattr(RP, "updates", lambda cell, name, iterations: None)
    monkeypatch.setattr(RP, "match_section", lambda cfg, env: [])
    monkeypatch.setattr(RP, "precision_line", lambda cfg, env: [])
    kept_hotpotqa = ["# Results", "", *head, "", "Seeds 0, 1.", "", "### hotpotqa", "", RP.KEPT_NOTE, "", "| old |", ""]
    monkeypatch.setitem(RP._REC, "before", "\n".join(kept_hotpotqa))
    lines = RP.table_section(R.TableConfig(envs="hotpotqa", seeds="0,1"), ["table"])  # seed 1 missing
    assert "| novice (SFT) | 0.500 (1/2 seeds) |" in "\n".join(lines) and lines[-4:] == ["", RP.KEPT_PART, "", "| old |"]
    lines = RP.table_section(R.TableConfig(envs="hotpotqa", seeds="0"), ["table"])  # every cell made: it goes
    assert "All cells computed." in lines and RP.KEPT_PART not in lines


def test_kept_part_from_a_section_kept_whole_and_a_sweep_made_in_part(monkeypatch, tmp_path):
    """A table section kept whole (one KEPT_NOTE above every env block) gives each block's text; a sweep
    made in part keeps its earlier kept text, and its earlier plot is not drawn over."""
    head = ["## Methods on the built-in environments", "", "Command: `python results.py table`"]
    old = ["# Results", "", *head, "", RP.KEPT_NOTE, "", "Seeds 0, 1.", "", "### webshop", "", "| a |", "",
           "### hotpotqa", "", "| b |", ""]
    monkeypatch.setitem(RP._REC, "before", "\n".join(old))
    assert RP.kept_part(head, "hotpotqa") == ["", RP.KEPT_PART, "", "| b |"]
    assert RP.kept_part(head, "webshop") == ["", RP.KEPT_PART, "", "| a |"]

    argv = ["sweep", "--what", "size", "--envs", "hotpotqa", "--seeds", "0", "--dims", "128,256"]
    cfg = R.TableConfig(what="size", envs="hotpotqa", seeds="0", dims="128,256")
    sweep_head = ["## Sweep: test success against model size (tiny-preset width)", "",
                  f"Command: `python results.py {' '.join(argv)}`"]
    monkeypatch.setitem(RP._REC, "before", "\n".join(["# Results", "", *sweep_head, "", RP.KEPT_NOTE, "", "| old |",
                                                     "", "![plot](results/sweep-size.png)", ""]))
    monkeypatch.setattr(RP, "values", lambda cfg, env, name, split, metric, it=None, dim=None:
                        {0: 0.5} if dim == 256 else {})  # dim 128 not made here
    lines = RP.sweep_section(cfg, argv, str(tmp_path), "results")
    assert lines[-6:] == ["", RP.KEPT_PART, "", "| old |", "", "![plot](results/sweep-size.png)"]
    assert "| hotpotqa | novice (SFT) | — | 0.500 |" in lines and not (tmp_path / "sweep-size.png").exists()
    monkeypatch.setattr(RP, "values", lambda cfg, env, name, split, metric, it=None, dim=None: {0: 0.5})
    lines = RP.sweep_section(cfg, argv, str(tmp_path), "results")  # every point made: the kept text goes
    assert RP.KEPT_PART not in lines
