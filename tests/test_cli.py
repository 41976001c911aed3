"""Subprocess smoke runs of every command on a micro config: exit codes, the files they promise,
and resume behaviour. A micro model learns nothing; these check plumbing, not quality."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import runtime as RT
import stepagent as S

MICRO = ["--env", "hotpotqa", "--n_train", "8", "--n_dev", "2", "--n_test", "3", "--sft_epochs", "1", "--pretrain_epochs", "1",
         "--dim", "32", "--n_layers", "1", "--n_heads", "2", "--vocab_size", "300", "--max_new_tokens", "8",
         "--batch_size", "4", "--k", "2", "--eval_batch", "4"]


def run(*args, timeout=300):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    stdout = run("stepagent.py", "sft", *MICRO, "--out", out)
    assert "novice test: success" in stdout
    return out


def test_grad_accum_takes_the_step_of_one_big_batch(tmp_path):
    """8 trajectories as one batch, or as 8 accumulated batches of 1: the same optimiser steps, the loss
    a mean over every target token of the step whichever micro-batch holds it (not a mean of the
    micro-batches' means, which weights a short trajectory's tokens more)."""
    from safetensors.torch import load_file
    args = [*MICRO, "--sft_epochs", "2", "--n_dev", "1", "--n_test", "1", "--log_every", "1",
            "--amp", "none"]  # compared at fp32 tolerance: fp32 on every CPU (auto is bf16 where native)
    outs = [str(tmp_path / "one"), str(tmp_path / "accum")]
    run("stepagent.py", "sft", *args, "--batch_size", "8", "--out", outs[0])
    run("stepagent.py", "sft", *args, "--batch_size", "1", "--grad_accum", "8", "--out", outs[1])
    w = [load_file(os.path.join(o, "sft", "model.safetensors")) for o in outs]
    assert max((w[0][k] - w[1][k]).abs().max().item() for k in w[0]) < 1e-5
    steps = [[json.loads(x) for x in open(os.path.join(o, "sft_metrics.jsonl")) if '"grad_norm"' in x] for o in outs]
    assert len(steps[0]) == len(steps[1]) == 3  # 1 pretrain + 2 SFT epochs, one step each
    for a, b in zip(*steps):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    # a run killed in its last epoch, after that epoch's lines were logged but before its save: the
    # resumed run logs them again, and the file keeps them once (as an uninterrupted run's)
    state_path = os.path.join(outs[0], "sft", "trainer_state.json")
    json.dump({**json.load(open(state_path)), "epoch": 2, "step": 2, "dev": {}}, open(state_path, "w"))
    run("stepagent.py", "sft", *args, "--batch_size", "8", "--out", outs[0])
    lines = [json.loads(x) for x in open(os.path.join(outs[0], "sft_metrics.jsonl"))]
    assert [x["step"] for x in lines if "grad_norm" in x] == [1, 2, 3]
    assert [x["epoch"] for x in lines if x.get("event") == "sft_epoch"] == [2, 3]


def test_sft_writes_checkpoint_metrics_and_eval(run_dir):
    state = json.load(open(os.path.join(run_dir, "sft", "trainer_state.json")))
    assert state["epoch"] == 2 and state["step"] == 4  # (1 pretrain + 1 SFT epoch) x 8 trajectories / batch 4
    assert os.path.exists(os.path.join(run_dir, "sft", "optimizer.pt"))
    summary = json.load(open(os.path.join(run_dir, "eval", "sft-test", "summary.json")))
    assert summary["n"] == 3 and 0.0 <= summary["avg_reward"] <= 1.0
    # where it computed: one machine for both pretrain and SFT epochs, named with torch's CPU kernels
    assert state["machines"] == [summary["machine"]]
    assert summary["machine"]["kernels"] == torch.backends.cpu.get_cpu_capability()
    trajs = json.load(open(os.path.join(run_dir, "eval", "sft-test", "trajectories.json")))
    assert len(trajs) == 3 and all(t["conversations"][0]["from"] == "human" for t in trajs)
    epochs = [json.loads(x) for x in open(os.path.join(run_dir, "sft_metrics.jsonl")) if "sft_epoch" in x]
    assert len(epochs) == 1 and "dev_success" in epochs[0]
    # a second run finds the finished novice and does not train again
    assert "novice already trained" in run("stepagent.py", "sft", *MICRO, "--out", run_dir)


def test_inspect_and_eval_commands(run_dir):
    run("stepagent.py", "inspect", *MICRO, "--out", run_dir)
    steps = [json.loads(x) for x in open(os.path.join(run_dir, "inspect.jsonl"))]
    assert steps and all(len(s["agent"]) == 2 for s in steps)
    assert all(isinstance(a["match"], bool) and a["logprob"] <= 0 for s in steps for a in s["agent"])
    data = os.path.join(run_dir, "data")
    experts = json.load(open(os.path.join(data, os.listdir(data)[0])))
    n_actions = sum(sum(c["from"] == "gpt" for c in r["conversations"]) for r in experts)
    assert len(steps) == n_actions  # one record per expert state (all fit the context)
    assert {s["traj_id"] for s in steps} == {r["id"] for r in experts}
    out = run("stepagent.py", "eval", *MICRO, "--out", run_dir, "--split", "test_unseen")
    assert '"split": "test_unseen"' in out
    # both commands kept their finished part in a partial file and dropped it once done
    assert not [f for _, _, fs in os.walk(run_dir) for f in fs if "partial" in f]


def test_bad_option_is_one_line_error(run_dir):
    r = subprocess.run([sys.executable, "stepagent.py", "sft", "--bogus", "1"], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown option '--bogus'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "stepagent.py", "eval", "--k", "many"], capture_output=True, text=True)
    assert r.returncode != 0 and "--k expects a int" in r.stderr


def test_model_sample_command(run_dir):
    r = subprocess.run([sys.executable, "generate.py", "--model", os.path.join(run_dir, "sft"), "--prompt",
                        "Question: who?", "--max_new_tokens", "5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "tokens/s]" in r.stderr
    r = subprocess.run([sys.executable, "generate.py", "--model", "/nonexistent", "--prompt", "x"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "config.json: missing" in r.stderr and "Traceback" not in r.stderr
    for extra in (["--prompt", "who? " * 3000], ["--prompt", "who?", "--max_new_tokens", "100000"]):  # past the context
        r = subprocess.run([sys.executable, "generate.py", "--model", os.path.join(run_dir, "sft"), *extra],
                           capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and "Traceback" not in r.stderr and last.startswith("error: prompt (")
        assert last.endswith("exceeds the context (2048); shorten the prompt or --max_new_tokens, or load with a "
                             "larger --context")



def test_a_broken_checkpoint_is_one_line_from_eval_and_a_train_script(run_dir, tmp_path):
    """A checkpoint with a truncated weights file, or a config.json field of the wrong type, given to
    stepagent.py eval or as a train script's --preset: one line naming the file (and field)."""
    good = os.path.join(run_dir, "sft")
    cases = []
    for name, edit, msg in (("truncated", "model.safetensors", "model.safetensors: cannot read safetensors"),
                            ("wrong-type", "config.json", "config.json: field 'hidden_size' is '32'; a whole number")):
        bad = str(tmp_path / name)
        shutil.copytree(good, bad)
        path = os.path.join(bad, edit)
        if edit == "config.json":
            cfg = json.load(open(path))
            json.dump({**cfg, "hidden_size": str(cfg["hidden_size"])}, open(path, "w"))
        else:
            open(path, "wb").write(open(path, "rb").read()[:100])
        cases += [(["stepagent.py", "eval", *MICRO, "--model", bad, "--out", str(tmp_path / f"eval-{name}")], msg),
                  (["train_implicit.py", *MICRO, "--preset", bad, "--out", str(tmp_path / f"train-{name}")], msg)]
    for argv, msg in cases:
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and "Traceback" not in r.stderr and msg in last and last.startswith("error: "), last

def test_sft_with_every_trajectory_past_the_context_says_so_in_one_line(tmp_path):
    """--max_seq_len below every expert trajectory's length: nothing to train on, one line (it used to
    end in an UnboundLocalError inside train_sft)."""
    r = subprocess.run([sys.executable, "stepagent.py", "sft", *MICRO, "--max_seq_len", "40", "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: all 8 expert trajectories exceed the context (40 "
                                                         "tokens): nothing to train on; raise --max_seq_len")


def test_sft_reuses_its_novice_and_refuses_other_options(tmp_path):
    """A finished novice is found again by the same command; one asked for with another SFT option in
    the same --out is refused in one line (not silently reused, nor trained further on another
    schedule); another --amp reuses it with a note (the precision of what trains next)."""
    out = str(tmp_path / "r")
    run("stepagent.py", "sft", *MICRO, "--out", out, "--n_test", "1")
    first = json.load(open(os.path.join(out, "sft", "trainer_state.json")))
    opts = json.load(open(os.path.join(out, "novice.json")))
    assert (opts["sft_epochs"], opts["n_train"], opts["dim"], opts["amp"]) == (1, 8, 32, first["amp"])
    assert "novice already trained" in run("stepagent.py", "sft", *MICRO, "--out", out, "--n_test", "1")
    i = MICRO.index("--sft_epochs")
    for flag, value, was in [("--sft_epochs", "2", "1"), ("--dim", "48", "32"), ("--sft_lr", "0.001", "0.003")]:
        argv = [*MICRO[:i], "--sft_epochs", value if flag == "--sft_epochs" else "1", *MICRO[i + 2:]]
        if flag != "--sft_epochs":
            argv += [flag, value]
        r = subprocess.run([sys.executable, "stepagent.py", "sft", *argv, "--out", out, "--n_test", "1"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert f"holds a novice made with {flag} {was}, not {value}; rerun with {flag} {was} to go on with it" in r.stderr
    other = {"bf16": "none", "none": "bf16"}[first["amp"]]
    stdout = run("stepagent.py", "sft", *MICRO, "--out", out, "--n_test", "1", "--amp", other)
    assert "novice already trained" in stdout and f"trained with --amp {first['amp']}; this run trains with --amp {other}" in stdout
    assert json.load(open(os.path.join(out, "sft", "trainer_state.json"))) == first


def test_help_lists_every_option_with_its_default_and_comment():
    import dataclasses

    import results as R
    import train_irl as TR

    r = subprocess.run([sys.executable, "train_irl.py", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and '"env":' not in r.stdout, r.stderr  # the options, no resolved config: nothing ran
    lines = {x.split()[0]: x for x in r.stdout.splitlines()[1:]}
    assert list(lines) == [f"--{f.name}" for f in dataclasses.fields(TR.IRLConfig)]
    assert lines["--kl_estimator"].split()[1] == "k3" and lines["--kl_estimator"].endswith("k3_iw (k3 weighted by pi / pi_ref)")
    assert lines["--whole_ids"].split()[1] == "true" and lines["--model"].split()[1] == "''"
    assert lines["--seed"].split() == ["--seed", "0"]  # no comment beside the field, none shown
    table = {x.split()[0]: x for x in RT.config_help(R.TableConfig).splitlines()[1:]}
    assert table["--n_test"].split()[1:] == "200 test and test_unseen tasks per evaluation".split()  # the subclass's
    for cmd in (["results.py", "report", "--help"], ["stepagent.py", "--help"]):  # report's output is not swallowed
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
        assert r.returncode == 0 and ("--results RESULTS.md" in r.stdout if "report" in cmd else "usage:" in r.stdout)
    for cmd in (["train_irl.py", "--help"], ["stepagent.py", "-h"], ["results.py", "--help"]):
        p = subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.stdout.close()  # the reader gone before the child writes, as `--help | head -1` after its line
        err = p.stderr.read()
        assert p.wait() == 0 and "Traceback" not in err, err


def test_impossible_options_are_refused_before_any_work(tmp_path):
    import results as R
    import train_implicit as TI
    import train_irl as TR

    out = str(tmp_path / "run")
    model_dir = str(tmp_path / "a-model")  # a model folder (config.json): --model's check passes
    os.makedirs(model_dir)
    open(os.path.join(model_dir, "config.json"), "w").write("{}")
    cases = [(TI.main, ["--env", "nosuch"], "--env 'nosuch': choose webshop, household"),
             (TR.main, ["--preset", str(tmp_path / "nope")], "--preset '"),
             (S.main, ["eval", "--model", str(tmp_path / "nope")], "--model '"),
             (TI.main, ["--dim", "100", "--n_heads", "3"], "--dim 100: must split into --n_heads 3 heads of an even size"),
             (TI.main, ["--dim", "99", "--n_heads", "3"], "--dim 99"),  # divides, but into heads of 33
             (TI.main, ["--k", "0"], "--k 0: must be at least 1"),
             (TR.main, ["--traj_batch", "0"], "--traj_batch 0: must be at least 1"),
             (S.main, ["sft", "--device", "gpu"], "--device 'gpu': "),
             (R.main, ["table", "--envs", "webshop,nosuch"], "--envs 'webshop,nosuch': 'nosuch' is not one of"),
             (R.main, ["table", "--seeds", "0,one"], "--seeds '0,one': expected comma-separated whole numbers"),
             (R.main, ["sweep", "--what", "k", "--ks", "0,2"], "--ks '0,2': each at least 1"),
             (R.main, ["sweep", "--what", "size", "--dims", "128,100"], "--dims '128,100': each a width that splits"),
             # a str option's choices (Config.CHOICES and its subclasses'), refused by parse_config for every entry point
             (TI.main, ["--level", "steps"], "--level 'steps': choose step, trajectory"),
             (TR.main, ["--reward", "logitt"], "--reward 'logitt': choose logit, logd, log1md, outcome"),
             (TR.main, ["--disc_data", "some"], "--disc_data 'some': choose all, erred"),
             (TR.main, ["--kl_estimator", "k4"], "--kl_estimator 'k4': choose k3, k3_iw"),
             (S.main, ["sft", "--dtype", "fp8"], "--dtype 'fp8': choose float32, fp32, bfloat16"),
             (R.main, ["table", "--kl_estimator", "k4"], "--kl_estimator 'k4': choose k3, k3_iw"),  # cells skip TR.main
             (R.main, ["table", "--reward", "outcome"], "--reward 'outcome': choose logit, logd, log1md"),  # a method
             (R.main, ["sweep", "--what", "depth"], "--what 'depth': choose iterations, k, size"),
             (R.main, ["table", "--methods", "inverse,ppo"], "--sweep_methods / --methods: 'ppo' is not one of"),
             # train_irl's numeric checks, which the table's cells (skipping its main) need as much
             (TR.main, ["--k", "1"], "--k 1: the group baseline needs at least 2 samples per state"),
             (R.main, ["table", "--k", "1"], "--k 1: the group baseline of inverse, ppo-outcome needs at least 2"),
             (R.main, ["sweep", "--k", "1", "--sweep_methods", "implicit,inverse"], "--k 1: the group baseline of inverse needs"),
             (R.main, ["table", "--pg_epochs", "0"], "--pg_epochs 0: must be at least 1"),
             (TR.main, ["--clip_eps", "1.5"], "--clip_eps 1.5: must be in (0, 1)"),
             (R.main, ["table", "--clip_eps", "0"], "--clip_eps 0.0: must be in (0, 1)"),
             # numeric ranges, each option's own (no inverted DPO, no NaN weights, no silent no-op)
             (TI.main, ["--beta", "-1"], "--beta -1.0: must be a finite number above 0"),
             (TI.main, ["--beta", "nan"], "--beta nan: must be a finite number above 0"),
             (TI.main, ["--beta", "0"], "--beta 0.0: must be a finite number above 0"),
             (TI.main, ["--dpo_lr", "0"], "--dpo_lr 0.0: must be a finite number above 0"),
             (TI.main, ["--dpo_lr", "-1"], "--dpo_lr -1.0: must be a finite number above 0"),
             (TR.main, ["--pg_lr", "inf"], "--pg_lr inf: must be a finite number above 0"),
             (TI.main, ["--temperature", "-1"], "--temperature -1.0: must be a finite number, at least 0"),
             (S.main, ["sft", "--n_test", "-1"], "--n_test -1: must be at least 1"),
             (TI.main, ["--n_test", "0"], "--n_test 0: must be at least 1"),
             (R.main, ["table", "--n_test", "0"], "--n_test 0: must be at least 1"),
             (TI.main, ["--warmup", "2"], "--warmup 2.0: must be in [0, 1]"),
             (TI.main, ["--sft_coef", "-0.5"], "--sft_coef -0.5: must be a finite number, at least 0"),
             (TR.main, ["--kl_coef", "nan"], "--kl_coef nan: must be a finite number, at least 0"),
             (TI.main, ["--context", "8", "--max_new_tokens", "8"], "--context 8: leaves no room for a prompt"),
             (TI.main, ["--max_seq_len", "64"], "--max_seq_len 64: leaves no room for a prompt"),
             # --model is inspect/eval's; a training run given it is refused, not run from --preset
             (TI.main, ["--model", model_dir], f"--model {model_dir!r}: training starts from --preset"),
             (TR.main, ["--model", model_dir], f"--model {model_dir!r}: training starts from --preset"),
             (R.main, ["table", "--model", model_dir], f"--model {model_dir!r}: training starts from --preset"),
             (TI.main, ["--split", "dev"], "--split 'dev': training evaluates on dev and test")]
    for main, argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", out])
        assert str(e.value).startswith("error: " + msg) and "\n" not in str(e.value), (argv, e.value)
        assert not os.path.exists(out), argv  # refused before any file was written
    cfg = RT.parse_config(S.Config, ["--dim", "96", "--n_heads", "3", "--out", out])  # heads of 32: accepted
    assert cfg.dim == 96
    assert RT.parse_config(TI.ImplicitConfig, ["--k", "1", "--out", out]).k == 1  # no group baseline: K = 1 is fine
    for cls in (S.Config, TI.ImplicitConfig, TR.IRLConfig, R.TableConfig):  # each default is one of its choices
        RT.check_config(cls(device="cpu"))
