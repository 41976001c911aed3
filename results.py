"""The results tables and sweeps (RESULTS.md): every method on every built-in env, over seeds.

    python results.py table                       # 3 envs x 3 seeds x 6 rows, 200 test + 200 test_unseen tasks
    python results.py sweep --what iterations     # success against iterations 1-4 (webshop, hotpotqa)
    python results.py sweep --what k              # ... against the practice number K = 1, 2, 4, 8
    python results.py sweep --what size           # ... against the model size (tiny preset, dim 128, 256, 384)
    python results.py report                      # rewrite RESULTS.md from what is on disk; trains nothing
    python results.py table --envs hotpotqa --seeds 0 --n_test 50 --out runs/t50 --results runs/t50/RESULTS.md

Options: --envs, --seeds, --out (default runs/table), --results (default RESULTS.md), the sweeps' --what,
--ks, --dims, --sweep_methods, the table's --methods (a subset to run now, e.g. the cheap ones first:
every method on disk is reported either way; RESULTS.md shows the command that fills every cell, the
pieces run with the same options joined: `record_command`), and every field of stepagent.Config, ImplicitConfig and IRLConfig as
`--field value` (defaults as in train_implicit.py / train_irl.py, except --n_test 200, the tiny
model's shape, --dim 256 --n_layers 4 --n_heads 4: 4.24M parameters on webshop and 3.93M on the others (only webshop's
tokenizer has whole product IDs), where the scripts' default is 2.06M / 1.83M, sized for the main job's time budget, and --amp none: fp32 training on every machine, where
the scripts' auto trains in bf16 autocast only where the device has bf16 natively; every cell made
before f3000c9 trained in bf16 autocast, the scripts' default then).

Rows: the novice (SFT); SFT-continued (below); ETO (`train_implicit.py --level trajectory`);
outcome-reward PPO (`train_irl.py --reward outcome`); StepAgent-Implicit (`train_implicit.py`);
StepAgent-Inverse (`train_irl.py`). Each (env, seed) is one folder <out>/<env>-seed<seed> holding one
novice that all five methods start from; each method runs through stepagent.train_iterations with the
config its own script would build, so <out>/hotpotqa-seed1/eto is what
`python train_implicit.py --level trajectory --env hotpotqa --seed 1 --n_test 200 --dim 256
--n_layers 4 --n_heads 4 --out <out>/hotpotqa-seed1`
makes. Every number is read back from a summary.json there (or, where that (env, seed) folder or that
run is not on this machine, from results/records.json: what the last report read, committed; see `report.kept`); runs,
evaluations and checkpoints are cached, so rerunning a command after an interruption continues and
finished cells cost nothing. Cells
run seed by seed (every env's seed 0, then every env's seed 1, ...), so a partial table spans the envs.
The reported model is always the last iteration's (no choice is made on test numbers; tune on dev,
whose per-iteration success RESULTS.md shows too). Beside the cells, each env block shows what
the runs did (steps and invalid share, expert-action match rates per step, the training signals of
SIGNALS) and verdicts paired by seed and by task (`report.verdicts`, `report.sign_test`). Spread = the sample
standard deviation over seeds (n - 1 in the denominator); a cell with one seed shows the value
alone. A preset other than tiny (`--preset smollm2`, or a model folder) keeps its cells in
<out>/<preset>/<env>-seed<seed> and gets a section of its own in RESULTS.md; an env without a test_unseen split (scienceworld,
textworld-express) shows n/a there and is judged on test alone.

Equal budgets. Every method sees the same data per iteration: the same window of n_inspect expert
trajectories / train tasks (stepagent.Method.records) and K samples per state or task. SFT-continued
is the novice trained on with the SFT loss (stepagent.sft_loss, assistant tokens) on traj_batch of
those expert trajectories per update, for dpo_epochs * ceil(n_inspect / traj_batch) optimiser steps
per iteration, at dpo_lr with the same optimiser: StepAgent-Implicit's step count (it skips
trajectories whose practices all match the expert, so it may take fewer), so the two differ only in
the loss. The other methods keep their scripts' own step counts (ETO: one update per traj_batch of its
failed rollouts; StepAgent-Inverse: D steps, then as many policy steps; outcome PPO: one update per
traj_batch of its K * n_inspect rollouts); the table's
`updates` column shows what each actually took.

Sweeps share the table's folders where they can, so run the commands one after another, not at once,
and with the same training options and --n_test (a run folder refuses changed training options):
`iterations` extends the table's implicit and inverse runs to --iterations (default 4); `k` adds runs
named implicit-k<K> / inverse-k<K> beside the table's (K = the table's --k is the table's own run;
K = 1 has no group baseline, so the inverse method and PPO skip it); `size` trains a novice and the methods per
--dims value in <out>/dim<D>/ (the table's --dim is the table's own folder). Plots go to results/*.png
beside RESULTS.md when matplotlib is installed (an optional extra: `pip install matplotlib`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shlex
import sys
from dataclasses import dataclass

import agent as AG
import envs
import runtime as RT
import sft as SFT
import stepagent as S
from runtime import opt
import train_implicit as TI
import train_irl as TR


@dataclass
class TableConfig(TI.ImplicitConfig, TR.IRLConfig):
    envs: str = opt("webshop,household,hotpotqa", "comma-separated; the sweeps default to webshop,hotpotqa")
    seeds: str = "0,1,2"
    out: str = opt("runs/table", "one folder per (env, seed) below this")
    results: str = opt("RESULTS.md", "the report; plots go to results/ beside it")
    n_test: int = opt(200, "test and test_unseen tasks per evaluation")
    # the tables' tiny model: 4.24M parameters on webshop (3.93M elsewhere), larger than the scripts' default (2.06M, sized for
    # the main job's 10 minutes); every table and sweep in RESULTS.md so far was run at this size
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # fp32 training in every cell, not the scripts' --amp auto: auto picks bf16 autocast only on devices
    # that have it natively, and a table's cells are made on whatever machines its sessions get
    amp: str = "none"
    what: str = opt("iterations", "sweep: iterations | k | size")
    CHOICES = {"what": ("iterations", "k", "size"), "reward": TR.REWARDS}  # the table runs outcome PPO as its own method
    ks: str = opt("1,2,4,8", "sweep k: practice numbers")
    dims: str = opt("128,256,384", "sweep size: tiny-preset widths (n_layers and n_heads as given)")
    sweep_methods: str = opt("implicit,inverse", "the methods a sweep runs (any of METHODS)")
    methods: str = opt("all", "the methods the table runs now: all, or a comma-separated subset (all on disk are "
                              "reported)")

    def check(self) -> None:
        super().check()
        bad_envs = [e for e in names(self.envs) if e not in envs.ENVS]
        if bad_envs:
            sys.exit(f"error: --envs {self.envs!r}: {bad_envs[0]!r} is not one of {', '.join(envs.ENVS)}")
        for key in ("seeds", "ks", "dims"):
            try:
                xs = ints(getattr(self, key))
            except ValueError:
                sys.exit(f"error: --{key} {getattr(self, key)!r}: expected comma-separated whole numbers")
            if key != "seeds" and any(x < 1 or key == "dims" and x % (2 * self.n_heads) for x in xs):
                sys.exit(f"error: --{key} {getattr(self, key)!r}: " + ("each at least 1" if key == "ks" else
                         f"each a width that splits into --n_heads {self.n_heads} heads of an even size"))
        table_methods = list(METHODS) if self.methods == "all" else names(self.methods)
        unknown = [k for k in names(self.sweep_methods) + table_methods if k not in METHODS]
        if unknown:
            sys.exit(f"error: --sweep_methods / --methods: {unknown[0]!r} is not one of {', '.join(METHODS)}")


# run folder -> (row label, config class, fixed fields, method class, title, the equivalent script and flags)
METHODS = {
    "sft-continued": ("SFT-continued", TI.ImplicitConfig, {}, TI.SFTContinued, "SFT-continued", None),
    "eto": ("ETO", TI.ImplicitConfig, {"level": "trajectory"}, TI.TrajectoryDPO, "ETO",
            "train_implicit.py --level trajectory"),
    "ppo-outcome": ("outcome-PPO", TR.IRLConfig, {"reward": "outcome"}, TR.Outcome, "PPO (outcome reward)",
                    "train_irl.py --reward outcome"),
    "implicit": ("StepAgent-Implicit", TI.ImplicitConfig, {"level": "step"}, TI.StepDPO, "StepAgent-Implicit",
                 "train_implicit.py"),
    "inverse": ("StepAgent-Inverse", TR.IRLConfig, {}, TR.Inverse, "StepAgent-Inverse", "train_irl.py"),
}
ROWS = ["novice", *METHODS]  # "novice" is <cell>/sft, evaluated in <cell>/eval/sft-<split>
LABEL = {"novice": "novice (SFT)", **{k: v[0] for k, v in METHODS.items()}}
BASELINES, OURS = ["novice", "sft-continued", "eto", "ppo-outcome"], ["implicit", "inverse"]
GROUP = {"inverse", "ppo-outcome"}  # a group baseline over K samples: K >= 2 (train_irl.py refuses --k 1)


# What each method's metrics.jsonl says of its training, per finished iteration: (row label, key, event).
# An update signal (event None) is shown as the median of the iteration's first and of its last EDGE
# updates that carry the key (a median: the per-token KL of one batch can be a hundred times the
# next's); an event's signal once per iteration (ETO's and PPO's sampled rollouts on the train tasks;
# D's accuracy and loss on all the iteration's data after its D steps).
DPO_SIGNALS = [("DPO loss", "losses/dpo", None), ("DPO reward accuracy", "rewards/accuracy", None),
               ("DPO margin", "rewards/margins", None), ("expert log-prob (chosen side)", "logps/expert", None)]
SIGNALS = {
    "sft-continued": [("SFT loss", "losses/sft", None)],
    "eto": [("rollout success (train tasks)", "success", "explore"), *DPO_SIGNALS],
    "ppo-outcome": [("rollout success (train tasks)", "success", "explore"),
                    ("KL to the sampling policy, per token", "losses/kl", None), ("clip fraction", "policy/clip_frac", None)],
    "implicit": DPO_SIGNALS,
    "inverse": [("D accuracy on expert actions", "disc/acc_expert", "disc"),
                ("D accuracy on agent actions", "disc/acc_agent", "disc"), ("D loss", "losses/disc", "disc"),
                ("KL to the sampling policy, per token", "losses/kl", None), ("clip fraction", "policy/clip_frac", None)],
}
EDGE = 5


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def preset_tag(cfg: TableConfig) -> str:
    """'' for the tiny preset; else the checkpoint's name (smollm2, or a model folder's base name)."""
    return "" if cfg.preset == "tiny" else os.path.basename(os.path.normpath(cfg.preset))


def cell_dir(cfg: TableConfig, env: str, seed: int, dim: int | None = None) -> str:
    """<out>/<env>-seed<seed>, or <out>/dim<D>/<env>-seed<seed> for a size other than the table's;
    a preset other than tiny has its own folder: <out>/<preset>/<env>-seed<seed>."""
    base = cfg.out if dim in (None, cfg.dim) else os.path.join(cfg.out, f"dim{dim}")
    return os.path.join(base, preset_tag(cfg), f"{env}-seed{seed}")


def eval_splits(env: str) -> list[str]:
    """The splits a table cell is evaluated on: test, and test_unseen where the env has it."""
    return [x for x in ("test", "test_unseen") if x in envs.splits(env)]


def eval_folder(cell: str, name: str, split: str, it: int) -> str:
    """The novice's evaluation (<cell>/eval/sft-<split>) or iteration it's of run `name`."""
    return os.path.join(cell, "eval", f"sft-{split}") if name == "novice" else \
        os.path.join(cell, name, f"eval-iter{it}-{split}")


def run_name(cfg: TableConfig, key: str, k: int | None = None) -> str:
    return key if k in (None, cfg.k) else f"{key}-k{k}"


def method_config(cfg: TableConfig, key: str, env: str, seed: int, out: str, **over):
    """The config the method's own script would build from the same options."""
    cls, fixed = METHODS[key][1], METHODS[key][2]
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}
    return cls(**{**base, **fixed, **over, "env": env, "seed": seed, "out": out})


def train(cfg: TableConfig, key: str, env: str, seed: int, dim: int | None = None, k: int | None = None,
          unseen: bool = False, **over) -> None:
    """One method in one (env, seed) folder through stepagent.train_iterations (cached, resumable);
    with unseen, its final checkpoint and the novice are also evaluated on test_unseen (cached)."""
    out = cell_dir(cfg, env, seed, dim)
    size = {} if dim is None else {"dim": dim}
    mc = method_config(cfg, key, env, seed, out, **size, **({} if k is None else {"k": k}), **over)
    method = METHODS[key][3](mc)
    method.name = run_name(cfg, key, k)
    S.train_iterations(mc, method, METHODS[key][4])
    if unseen and "test_unseen" in eval_splits(env):
        final = os.path.join(out, method.name, f"iter{mc.iterations}")
        AG.cached_evaluate(lambda: SFT.load(final, mc), mc, "test_unseen", mc.n_test,
                          os.path.join(out, method.name, f"eval-iter{mc.iterations}-test_unseen"), "test_unseen")
        AG.cached_evaluate(lambda: SFT.load(os.path.join(out, "sft"), mc), mc, "test_unseen", mc.n_test,
                          os.path.join(out, "eval", "sft-test_unseen"), "novice")


TABLE_ONLY = {f.name for f in dataclasses.fields(TableConfig)} - {f.name for f in dataclasses.fields(S.Config)} \
    - {f.name for c in (TI.ImplicitConfig, TR.IRLConfig) for f in dataclasses.fields(c)} | {"out"}


# TableConfig's defaults that differ from the scripts' (n_test, amp, and the tiny model's shape)
TABLE_DEFAULTS = tuple(f.name for f in dataclasses.fields(TableConfig)
                       if f.name not in TABLE_ONLY and f.default != getattr(S.Config, f.name, f.default))


def script_command(cfg: TableConfig, argv: list[str], key: str) -> str:
    """The method's own script with the table's options that its config has, for one cell."""
    script, fields = METHODS[key][5], {f.name for f in dataclasses.fields(METHODS[key][1])}
    if script is None:
        return "results.py only (`SFTContinued`)"
    opts = [(argv[i].lstrip("-"), argv[i + 1]) for i in range(1, len(argv) - 1, 2)]
    opts = [(k, v) for k, v in opts if k in fields and k not in TABLE_ONLY and k not in (*TABLE_DEFAULTS, *METHODS[key][2])]
    # the table's own defaults, but the tiny model's shape only with the tiny preset
    opts += [(k, str(getattr(cfg, k))) for k in TABLE_DEFAULTS if not preset_tag(cfg) or k not in ("dim", "n_layers", "n_heads")]
    flags = " ".join(f"--{k} {shlex.quote(v)}" for k, v in opts)
    out = os.path.join(cfg.out, preset_tag(cfg), "<env>-seed<seed>")
    return f"`python {script} {flags} --env <env> --seed <seed> --out {out}`".replace("  ", " ")


SUBSET = ("envs", "seeds", "methods")  # which cells a command runs now, not how they are made


def _options(argv: list[str]) -> dict[str, str]:
    return {argv[i].lstrip("-"): argv[i + 1] for i in range(1, len(argv) - 1, 2)}


def section_key(key: str, argv: list[str]) -> str:
    """A report section's records key: the command's kind and its options, --envs / --seeds / --methods
    (which cells it covers) and --out / --results (where) aside."""
    how = {k: v for k, v in _options(argv).items() if k not in (*SUBSET, "out", "results")}
    return f"{key} {json.dumps(how, sort_keys=True)}"


def commands(recorded: dict, key: str) -> list[list[str]]:
    """The commands recorded under key (commands.json held one per key before: read as a list of one)."""
    entries = recorded.get(key, [])
    return [entries] if entries and isinstance(entries[0], str) else entries


def record_command(recorded: dict, key: str, argv: list[str]) -> list[list[str]]:
    """commands.json's list for key once argv has run. A command with the same options as a recorded
    one extends it (their --envs and --seeds joined; --methods is dropped, as the report shows every
    method), so running a table piece by piece records the whole table's command. A command with
    other options replaces the recorded ones it shares an env with (its cells are now made its way)
    and, for a table, sits beside the others in a section of its own (e.g. a preset's
    textworld-express and scienceworld cells with their own task counts); a sweep keeps one command."""
    d = TableConfig()
    new = {k: v for k, v in _options(argv).items() if k != "methods"}
    new_envs, new_seeds = names(new.get("envs", d.envs)), ints(new.get("seeds", d.seeds))
    how = {k: v for k, v in new.items() if k not in SUBSET}
    kept = []
    for old in commands(recorded, key):
        o = _options(old)
        o_envs, o_seeds = names(o.get("envs", d.envs)), ints(o.get("seeds", d.seeds))
        if {k: v for k, v in o.items() if k not in SUBSET} == how:
            new_envs = o_envs + [e for e in new_envs if e not in o_envs]
            new_seeds = sorted(set(o_seeds) | set(new_seeds))
        elif key.startswith("table") and not set(o_envs) & set(new_envs):
            kept.append(old)
    merged = {"envs": ",".join(new_envs), "seeds": ",".join(map(str, new_seeds))}
    merged = {k: v for k, v in merged.items() if v != getattr(d, k)}  # defaults stay implicit
    opts = {k: merged.get(k, v) for k, v in new.items() if k in merged or k not in ("envs", "seeds")}
    opts.update(merged)  # in the given order, then any added
    return kept + [[argv[0], *(x for k, v in opts.items() for x in (f"--{k}", v))]]


def records_path(results: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(results)), "results", "records.json")


def load_commands(out: str, results: str) -> dict:
    """The commands recorded in records.json beside results, with <out>/commands.json's (this
    machine's runs) recorded on top of them: a fresh clone's first table run keeps the others."""
    path = records_path(results)
    recorded = dict(json.load(open(path)).get("commands", {})) if os.path.exists(path) else {}
    path = os.path.join(out, "commands.json")
    here = json.load(open(path)) if os.path.exists(path) else {}
    for key in here:
        for argv in commands(here, key):
            recorded[key] = record_command(recorded, key, argv)
    return recorded


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("table", "sweep", "report"):
        usage = "usage: python results.py table|sweep|report [--field value ...] (the options: table --help)\n\n"
        if argv[:1] in (["-h"], ["--help"]):
            RT.print_help(usage + __doc__.split("\n\n")[1])
        sys.exit(usage + __doc__.split("\n\n")[1])
    argv = list(argv)
    if argv[0] == "sweep":  # the sweeps' own defaults, written into the recorded command
        given = {a.lstrip("-") for a in argv[1::2]}
        what = argv[argv.index("--what") + 1] if "--what" in argv[:-1] else "iterations"
        extra = {"envs": "webshop,hotpotqa", **({"iterations": "4"} if what == "iterations" else {})}
        argv += [x for k, v in extra.items() if k not in given for x in (f"--{k}", v)]
    for bad in ("--env", "--seed"):
        if bad in argv:
            sys.exit(f"error: {bad} is per cell here; use {bad}s with a comma-separated list")
    quiet = argv[0] == "report" and not {"-h", "--help"} & set(argv)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        cfg = RT.parse_config(TableConfig, argv[1:])  # prints the config: not for a report, which trains nothing
    table_methods = list(METHODS) if cfg.methods == "all" else names(cfg.methods)
    if argv[0] != "report":
        RT.refuse_eval_options(cfg)
    grouped = GROUP & set(table_methods if argv[0] == "table" else [] if cfg.what == "k" else names(cfg.sweep_methods))
    if cfg.k < 2 and grouped and argv[0] != "report":  # a cell skips train_irl's main, which refuses it too
        sys.exit(f"error: --k {cfg.k}: the group baseline of {', '.join(sorted(grouped))} needs at least 2 samples per state")
    import report as RP  # here, not at the top: report.py imports results (its config, methods and cells)
    if argv[0] == "report":
        return RP.report(cfg.out, cfg.results)
    key = "-".join(filter(None, ["table", preset_tag(cfg)])) if argv[0] == "table" else f"sweep-{cfg.what}"
    recorded = load_commands(cfg.out, cfg.results)
    envs.write_json(os.path.join(cfg.out, "commands.json"), {**recorded, key: record_command(recorded, key, argv)})
    for seed in ints(cfg.seeds):  # seed-major: every env's seed 0 before any seed 1, so a partial table spans the envs
        for env in names(cfg.envs):
            if argv[0] == "table":
                for k in table_methods:
                    train(cfg, k, env, seed, unseen=True)
            elif cfg.what == "iterations":
                for k in names(cfg.sweep_methods):
                    train(cfg, k, env, seed)
            elif cfg.what == "k":
                for k in ints(cfg.ks):
                    for m in names(cfg.sweep_methods):
                        if not (m in GROUP and k < 2):
                            train(cfg, m, env, seed, k=k)
            else:
                for d in ints(cfg.dims):
                    for m in names(cfg.sweep_methods):
                        train(cfg, m, env, seed, dim=d)
            RP.report(cfg.out, cfg.results)  # after every cell: an interrupted run still leaves a true, partial table


if __name__ == "__main__":
    main()
