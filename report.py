"""RESULTS.md from the run folders: the report half of results.py (whose config, methods, cells and commands it uses).
The numbers are read back from each (env, seed) folder, or, for a file not here, from results/records.json (`kept`, the
`_REC` record state), formatted (`fmt`, `mean_str`, `mean_spread`) and judged (`verdicts`, `sign_test`) into the table,
sweep, expert-match and training-signal sections and the sweeps' plots; `report(out, results)` writes RESULTS.md.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import math
import os
import shlex
import statistics

import envs
import runtime as RT
import stepagent as S
from results import (BASELINES, EDGE, GROUP, LABEL, METHODS, OURS, ROWS, SIGNALS, TableConfig, cell_dir, commands,
                     eval_folder, eval_splits, ints, load_commands, names, preset_tag, records_path, run_name,
                     script_command, section_key)


# ----------------------------------------------------------------------------- reading the run folders


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation with n - 1; None for fewer than two values)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# What the report reads from the run folders is also kept in results/records.json beside RESULTS.md
# (committed), so RESULTS.md can be regenerated where the run folders are not: a fresh clone, another
# machine. A file on disk is always read, and its record refreshed; a record stands in for its file
# where the file's whole (env, seed) folder is absent, or where its run is absent and the folder's
# finished novice has the weights (sha256, `novice_digest`) of the novice the record's run started
# from: a cell made in parts on machines that do not keep runs/, the novice retrained to the same
# weights each time. A record stands in only in a section whose command has the options (--envs,
# --seeds and --methods aside) of the one that read it: other options make other runs.
# A record's path is relative to its own command's --out (each section reads its cells there), so a
# sweep made with --out elsewhere and the table made in the default folder keep their records apart and
# a report from any --out finds both.
_REC = {"out": ".", "section": "", "old": {}, "new": {}, "found": 0, "before": "", "digest": {}, "replayed": {}}


def kept(cell: str, path: str, read, tag: str = ""):
    """read() when path is on disk; else what records.json kept of it for this section, when its (env,
    seed) folder `cell` is not here at all, or when the run the file belongs to (<cell>/<method>, or one
    novice evaluation <cell>/eval/sft-<split>) is not here and the cell holds a finished novice with the
    weights that run started from (its digest, kept per run as <run>#novice, or, for a run recorded
    before digests were, a novice that replays the recorded novice's test evaluation); else None (a run here is
    the truth: a file missing from it is not computed). An absent run's records are carried to the next
    records.json while the novice trains and where they have no digest (kept before digests were), and
    dropped once the digests differ. A value found is kept for the next records.json either way."""
    parts = os.path.relpath(path, cell).split(os.sep)
    unit = os.path.join(cell, *parts[:2 if parts[0] == "eval" else 1])  # the method's run, or one novice evaluation
    run = os.path.relpath(unit, _REC["out"])
    key, dkey = os.path.relpath(path, _REC["out"]) + tag, run + "#novice"
    old, new = _REC["old"].get(_REC["section"], {}), {}
    started_from = old.get(dkey)  # the digest of the novice the recorded run started from, if recorded
    if started_from is None and not os.path.exists(unit) and replayed(cell, old):
        started_from = novice_digest(cell)  # recorded before digests were, from a novice that plays as this one
    if os.path.exists(path):
        value, digest = read(), novice_digest(cell)
    elif not os.path.isdir(cell) or (not os.path.exists(unit) and started_from is not None
                                     and novice_digest(cell) == started_from):
        value, digest = old.get(key), started_from
    else:
        value = digest = None
        if not os.path.exists(unit) and (novice_digest(cell) is None or started_from is None):  # nothing to compare
            new.update({k: v for k, v in old.items() if k == dkey or k.startswith(run + os.sep)})  # (not shown)
    if value is not None:
        new[key] = value
        if digest is not None:
            new[dkey] = digest
        _REC["found"] += 1
    if new:
        _REC["new"].setdefault(_REC["section"], {}).update(new)
    return value


def replayed(cell: str, old: dict) -> bool:
    """Whether the finished novice here plays the novice test evaluation records.json kept from before
    novice digests were (no digest beside it) again: the same summary but for its time and machine, the
    same tasks solved. Then the cell's runs recorded without a digest are taken to have started from this
    novice, and get its digest in the next records.json; a novice that plays otherwise leaves them unshown.
    (Once a report has read this novice's evaluation, its record carries a digest: the test is made once.)"""
    mark = (_REC["section"], cell)  # (sections read the same folders with records of their own)
    if mark not in _REC["replayed"]:
        folder = eval_folder(cell, "novice", "test", 0)
        rel = os.path.relpath(folder, _REC["out"])
        then, ids = old.get(os.path.join(rel, "summary.json")), old.get(os.path.join(rel, "trajectories.json#solved"))
        files = [os.path.join(folder, f) for f in ("summary.json", "trajectories.json")]
        same = False
        if then is not None and ids is not None and rel + "#novice" not in old and novice_digest(cell) \
                and all(map(os.path.exists, files)):
            now = json.load(open(files[0]))
            same = all(now.get(k) == then.get(k) for k in {*now, *then} - {"seconds", "machine"}) and \
                solved_ids(files[1]) == ids
        _REC["replayed"][mark] = same
    return _REC["replayed"][mark]


def novice_finished(cell: str) -> bool:
    """Whether <cell>/sft holds the novice at the end of its epochs (novice.json's; a novice older than
    novice.json finished)."""
    path, made = os.path.join(cell, "sft", "trainer_state.json"), os.path.join(cell, "novice.json")
    if not os.path.exists(path):
        return False
    opts = json.load(open(made)) if os.path.exists(made) else None
    return not opts or json.load(open(path))["epoch"] >= opts["sft_epochs"] + opts.get("pretrain_epochs", 0)


def novice_digest(cell: str) -> str | None:
    """sha256 of the cell's finished novice's weight files (<cell>/sft/*.safetensors, by name); None
    while it trains or where there is none. Read once per report."""
    if cell not in _REC["digest"]:
        files = sorted(glob.glob(os.path.join(cell, "sft", "*.safetensors")))
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        _REC["digest"][cell] = h.hexdigest() if files and novice_finished(cell) else None
    return _REC["digest"][cell]


def summary(cell: str, name: str, split: str, n: int, seed: int, it: int) -> dict | None:
    """A summary.json of this split, size and seed (in eval_folder), or None."""
    path = os.path.join(eval_folder(cell, name, split, it), "summary.json")

    def read():
        s = json.load(open(path))
        return s if (s.get("split"), s.get("n"), s.get("seed")) == (split, n, seed) else None
    s = kept(cell, path, read)
    return s if s is not None and (s.get("split"), s.get("n"), s.get("seed")) == (split, n, seed) else None


def invalid_share(cell: str, env: str, name: str, split: str, it: int) -> float | None:
    """The share of an evaluation's steps whose action was not carried out (envs.invalid), counted from
    its trajectories.json: evaluations made before summary.json recorded `invalid_share` have only that."""
    path = os.path.join(eval_folder(cell, name, split, it), "trajectories.json")
    cls = envs.env_class(env)

    def read():
        obs = [t["value"].removeprefix(envs.OBS) for r in json.load(open(path))
               for t in r["conversations"][2::2]]  # the turns after each action
        return sum(envs.invalid(cls, o) for o in obs) / max(1, len(obs))
    return kept(cell, path, read, "#invalid")


def solved(cell: str, name: str, split: str, it: int) -> list[str] | None:
    """The ids of the tasks an evaluation solved, from its trajectories.json (for the per-task verdicts)."""
    path = os.path.join(eval_folder(cell, name, split, it), "trajectories.json")
    return kept(cell, path, lambda: solved_ids(path), "#solved")


def solved_ids(path: str) -> list[str]:
    """The sorted ids of the tasks a trajectories.json solved."""
    return sorted(r["id"] for r in json.load(open(path)) if r["success"])


def values(cfg: TableConfig, env: str, name: str, split: str, metric: str, it: int | None = None,
           dim: int | None = None) -> dict[int, float]:
    """seed -> metric over the seeds whose summary is on disk (it: default the last iteration)."""
    n = cfg.n_dev if split == "dev" else cfg.n_test
    out = {}
    for seed in ints(cfg.seeds):
        cell, i = cell_dir(cfg, env, seed, dim), it or cfg.iterations
        s = summary(cell, name, split, n, seed, i)
        if s is not None and metric == "invalid_share" and metric not in s:
            s = {metric: invalid_share(cell, env, name, split, i)}
        if s is not None and s[metric] is not None:
            out[seed] = s[metric]
    return out


def fmt(vals: dict[int, float], n_seeds: int) -> str:
    """'mean ± std', the value alone for one seed, '—' for none; '(m/n seeds)' when some are missing."""
    if not vals:
        return "—"
    m, sd = mean_spread(list(vals.values()))
    text = f"{m:.3f}" if sd is None else f"{m:.3f} ± {sd:.3f}"
    return text if len(vals) == n_seeds else f"{text} ({len(vals)}/{n_seeds} seeds)"


def updates(cell: str, name: str, iterations: int) -> int | None:
    """Optimiser steps (StepAgent-Inverse: D steps + policy steps) through iteration `iterations`."""
    if name == "novice":
        path = os.path.join(cell, "sft", "trainer_state.json")  # its steps once finished (not the budget before)
        return kept(cell, path, lambda: json.load(open(path))["step"] if novice_finished(cell) else None)
    path = os.path.join(cell, name, "metrics.jsonl")

    def read():
        lines = [json.loads(x) for x in open(path)]
        if not any(x.get("event") == "iteration" and x.get("iteration") == iterations for x in lines):
            return None  # iteration `iterations` not finished: its count is not the budget yet
        # distinct steps: a run killed between logging a step and saving it logs that step again
        return len({x["step"] for x in lines if "event" not in x and "step" in x and x.get("iteration", 0) <= iterations})
    return kept(cell, path, read, f"#{iterations}")


def precision(cell: str) -> str | None:
    """The precision the cell's novice trained in (`amp` in sft/trainer_state.json); None where not
    recorded (novices trained before f3000c9, all in bf16 autocast, the default then)."""
    path = os.path.join(cell, "sft", "trainer_state.json")
    return kept(cell, path, lambda: json.load(open(path)).get("amp"), "#amp")


def precision_line(cfg: TableConfig, env: str) -> list[str]:
    """'Training precision: ...' over the seeds whose novice recorded it, or nothing."""
    by = {}
    for seed in ints(cfg.seeds):
        if (p := precision(cell_dir(cfg, env, seed))) is not None:
            by.setdefault(p, []).append(seed)
    if not by:
        return []
    name = {"bf16": "bf16 autocast (fp32 weights)", "none": "fp32"}
    per = [f"{name.get(p, p)} on seed{'s' * (len(v) > 1)} {', '.join(map(str, v))}" for p, v in by.items()]
    return ["", "Training precision of the novices (`amp` in sft/trainer_state.json; the methods train in what the "
            "command's --amp picks on the same machine): " + "; ".join(per) + "."]


def match_by_step(cell: str, name: str, it: int) -> dict[int, float] | None:
    """Expert-action match rate per step index at inspection it, from the step records the
    metrics.jsonl `event=inspect` line summarises (<run>/inspect-<it>.jsonl)."""
    path = os.path.join(cell, name, f"inspect-{it}.jsonl")
    m = kept(cell, path, lambda: S.match_rates([json.loads(x) for x in open(path)])["by_step"])
    return None if m is None else {int(t): v for t, v in m.items()}  # records.json's keys are strings


def signals(cell: str, key: str) -> dict | None:
    """{str(iteration): {label: value, or [median of the first EDGE, of the last EDGE updates]}} over run
    key's finished iterations (SIGNALS), from its metrics.jsonl."""
    path = os.path.join(cell, key, "metrics.jsonl")

    def read():
        lines = [json.loads(x) for x in open(path)]
        out = {}
        for it in sorted({x["iteration"] for x in lines if x.get("event") == "iteration"}):
            row = {}
            for label, name, event in SIGNALS[key]:
                v = [x[name] for x in lines if x.get("event") == event and x.get("iteration") == it and name in x]
                if v and event:
                    row[label] = v[-1]
                elif v:
                    row[label] = [statistics.median(v[:EDGE]), statistics.median(v[-EDGE:])]
            out[str(it)] = row
        return out
    return kept(cell, path, read, "#signals")


# ----------------------------------------------------------------------------- the report


def table_section(cfg: TableConfig, argv: list[str]) -> list[str]:
    seeds, n_seeds = ints(cfg.seeds), len(ints(cfg.seeds))
    tiny = not preset_tag(cfg)
    out = ["## Methods " + ("on the built-in environments" if tiny else f"with the {cfg.preset} preset: {cfg.envs}"), "",
           f"Command: `python results.py {shlex.join(argv)}`", "",
           f"Seeds {', '.join(map(str, seeds))}; {cfg.n_test} test and {cfg.n_test} test_unseen tasks per seed "
           "(test_unseen where the env has it); "
           + (f"tiny preset (dim {cfg.dim}, n_layers {cfg.n_layers})" if tiny else f"preset {cfg.preset}")
           + f"; {cfg.iterations} iterations, K = {cfg.k}, "
           f"{min(cfg.n_inspect or cfg.n_train, cfg.n_train)} expert trajectories / train tasks per iteration; "
           "the model reported is the last iteration's. "
           "Cells: mean ± sample std over seeds. `updates`: optimiser steps over all iterations (StepAgent-Inverse: "
           "D steps + policy steps; the novice: its SFT steps). Each method's run folder is what its own script "
           "makes:", ""]
    for key in METHODS:
        out.append(f"- {LABEL[key]}: {script_command(cfg, argv, key)}")
    for env in names(cfg.envs):
        found, start = _REC["found"], len(out)
        out += ["", f"### {env}", "",
                "| method | test success | test reward | test_unseen success | test_unseen reward | updates |",
                "| --- | --- | --- | --- | --- | --- |"]
        missing, cells, rewards, tasks, have = [], {}, {}, {}, eval_splits(env)
        for key in ROWS:
            row = []
            for split in ("test", "test_unseen"):
                if split not in have:
                    row += ["n/a", "n/a"]
                    continue
                cells[key, split] = values(cfg, env, key, split, "success_rate")
                rewards[key, split] = values(cfg, env, key, split, "avg_reward")
                tasks[key, split] = {s: solved(cell_dir(cfg, env, s), key, split, cfg.iterations)
                                     for s in cells[key, split]}
                row += [fmt(cells[key, split], n_seeds), fmt(rewards[key, split], n_seeds)]
                gone = [s for s in seeds if s not in cells[key, split]]
                if gone:
                    missing.append(f"{LABEL[key]} {split} (seed {', '.join(map(str, gone))})")
            ups = sorted({u for s in seeds if (u := updates(cell_dir(cfg, env, s), key, cfg.iterations)) is not None})
            row.append("—" if not ups else str(ups[0]) if len(ups) == 1 else f"{ups[0]}-{ups[-1]}")
            out.append(f"| {LABEL[key]} | " + " | ".join(row) + " |")
        everything = len(missing) == len(have) * len(ROWS) and all(f"seed {', '.join(map(str, seeds))})" in m for m in missing)
        out += ["", "Not computed yet: every cell (run the command above)." if everything else
                f"Not computed yet: {'; '.join(missing)}." if missing else "All cells computed."]
        out += precision_line(cfg, env)
        lines = verdicts(cells, n_seeds, have, tasks, rewards)
        out += [""] + lines if lines else []
        if n_seeds > 1 and any(cells[key, "test"] for key in ROWS):  # what the paired verdicts are made of
            out += ["", "Test success per seed:", "", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                    "| --- |" + " --- |" * n_seeds]
            out += [f"| {LABEL[key]} | " + " | ".join(f"{cells[key, 'test'][s]:.3f}" if s in cells[key, "test"]
                                                    else "—" for s in seeds) + " |" for key in ROWS]
        nov, per_it, any_value = values(cfg, env, "novice", "test", "success_rate"), [], False
        for key in METHODS:
            row = [mean_str(nov)]
            for i in range(1, cfg.iterations + 1):
                test, dev = (values(cfg, env, key, split, "success_rate", i) for split in ("test", "dev"))
                row.append(f"{mean_str(test)} / {mean_str(dev)}")
                any_value = any_value or bool(test or dev)
            per_it.append(f"| {LABEL[key]} | " + " | ".join(row) + " |")
        if any_value:
            out += ["", "Success per iteration (test / dev; mean over the seeds present; iteration 0 = the novice):", "",
                    "| method | " + " | ".join(f"iter {i}" for i in range(cfg.iterations + 1)) + " |",
                    "| --- |" + " --- |" * (cfg.iterations + 1), *per_it]
        steps = [[values(cfg, env, key, split, m) for split in have for m in ("avg_steps", "invalid_share")] for key in ROWS]
        if any(v for row in steps for v in row):  # (dicts seed -> value: seed 0 alone is a falsy key)
            out += ["", "Steps per task and the share of steps whose action was not carried out (`invalid`: no action, "
                        "not a command, or impossible there; `envs.invalid`), mean over the seeds present:", "",
                    "| method | " + " | ".join(f"{s} {m}" for s in have for m in ("steps", "invalid")) + " |",
                    "| --- |" + " --- |" * (2 * len(have))]
            out += [f"| {LABEL[key]} | " + " | ".join(mean_str(v, 2) for v in row) + " |" for key, row in zip(ROWS, steps)]
        out += match_section(cfg, env) + signals_section(cfg, env)
        if _REC["found"] == found:  # nothing of this env here: what the previous RESULTS.md showed, if anything
            out[start:] = previous(out, env) or out[start:]
        elif missing:  # made in part: the previous kept text of this env stays beneath
            out += kept_part(out, env)
    return out


def mean_str(vals: dict[int, float], digits: int = 3) -> str:
    return f"{mean_spread(list(vals.values()))[0]:.{digits}f}" if vals else "—"


def verdicts(cells: dict, n_seeds: int, splits=("test", "test_unseen"), tasks: dict | None = None,
             rewards: dict | None = None) -> list[str]:
    """One line per StepAgent method and baseline: does it beat it, on test and on test_unseen success.

    Paired by seed: every method of a seed starts from that seed's novice, so the seed-to-seed spread
    of the novice (large at this size) cancels in the per-seed differences; "beats it" only when it is
    higher on every seed. A block made in part is judged on the seeds both have, and says which.
    Paired by task too, where tasks[key, split] gives {seed: solved task ids}: both play the same
    tasks, so the tasks only one of the two solved (summed over seeds) say whether a gap is more than
    chance (sign_test), which one seed alone cannot say by the spread. Where the success is equal, the
    average reward on the same seeds (rewards[key, split]: {seed: value}) is shown beside it, as the one
    number that still tells the two apart (e.g. every method at 0 success on ScienceWorld)."""
    lines, tasks, rewards = [], tasks or {}, rewards or {}
    for ours in OURS:
        for base in BASELINES:
            parts = []
            for split in splits:
                both = sorted(set(cells[ours, split]) & set(cells[base, split]))
                if not both:
                    parts.append(f"{split}: not computed yet")
                    continue
                a, b = ({s: cells[k, split][s] for s in both} for k in (ours, base))
                some = "" if len(both) == n_seeds else f" (seed{'s' * (len(both) > 1)} {', '.join(map(str, both))} so far)"
                d = [a[s] - b[s] for s in sorted(a)]
                (ma, _), (mb, _), (md, sd) = (mean_spread(list(x)) for x in (a.values(), b.values(), d))
                k = sum(x > 0 for x in d)
                paired = f"{k}/{len(d)} seeds higher; paired difference {md:+.3f} ± {sd:.3f}" if sd is not None else ""
                ta, tb = tasks.get((ours, split), {}), tasks.get((base, split), {})
                if all(ta.get(s) is not None and tb.get(s) is not None for s in a):
                    x = sum(len(set(ta[s]) - set(tb[s])) for s in a)
                    y = sum(len(set(tb[s]) - set(ta[s])) for s in a)
                    paired = "; ".join(filter(None, [paired, f"tasks solved by it alone {x}, by the other alone {y}: "
                                                              f"sign test p = {sign_test(x, y):.2g}"]))
                ra, rb = rewards.get((ours, split), {}), rewards.get((base, split), {})
                same = math.isclose(ma, mb, rel_tol=0, abs_tol=1e-9)  # equal sums of k/n, added in another order
                if same and all(s in ra and s in rb for s in both):
                    mr = [mean_spread([r[s] for s in both])[0] for r in (ra, rb)]
                    paired = "; ".join(filter(None, [f"average reward {mr[0]:.3f} vs {mr[1]:.3f}", paired]))
                word = "**does not beat it** (equal" + (f"; {paired})" if paired else ")") if same else \
                    "higher, one seed" + (f" ({paired})" if paired else " (no spread over seeds to judge the gap by)") \
                    if sd is None and ma > mb else \
                    "**does not beat it**" + (f" ({paired})" if paired else "") if ma < mb else \
                    f"beats it on every seed ({paired})" if k == len(d) else \
                    f"higher on average, not on every seed ({paired})"
                parts.append(f"{split}{some} success {ma:.3f} vs {mb:.3f}, {word}")
            if any("not computed" not in p for p in parts):
                lines.append(f"- {LABEL[ours]} vs {LABEL[base]}: " + "; ".join(parts))
    return lines


def sign_test(x: int, y: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) on x tasks solved by one method alone and y by
    the other alone: the chance of a split at least this lopsided when either is equally likely."""
    n = x + y
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(x, y) + 1)) / 2 ** n)


def match_section(cfg: TableConfig, env: str, max_steps: int = 10) -> list[str]:
    """Expert-action match rate by step index per inspection, mean over the seeds present."""
    rows = []
    for key in OURS:
        for it in range(1, cfg.iterations + 1):
            per = [m for s in ints(cfg.seeds) if (m := match_by_step(cell_dir(cfg, env, s), key, it))]
            if per:
                steps = sorted({t for m in per for t in m})
                rows.append((f"{LABEL[key]}, inspection {it} ({len(per)} seed{'s' * (len(per) > 1)})",
                             {t: sum(m[t] for m in per if t in m) / sum(t in m for m in per) for t in steps}))
    if not rows:
        return []
    n_steps = 1 + max(t for _, r in rows for t in r)
    width = min(max_steps, n_steps)
    out = ["", f"Expert-action match rate by step index (K = {cfg.k} practices from each expert state; inspection 1 "
               "is the novice's" + (f"; steps past {width - 1} left out):" if n_steps > width else "):"), "",
           "| inspection | " + " | ".join(f"step {t}" for t in range(width)) + " |", "| --- |" + " --- |" * width]
    for name, r in rows:
        out.append(f"| {name} | " + " | ".join(f"{r[t]:.2f}" if t in r else "—" for t in range(width)) + " |")
    return out


def signals_section(cfg: TableConfig, env: str) -> list[str]:
    """What each method's training did per iteration (SIGNALS), mean over the seeds present."""
    rows = []
    for key in METHODS:
        per = [x for s in ints(cfg.seeds) if (x := signals(cell_dir(cfg, env, s), key))]
        for label, _, event in SIGNALS[key]:
            cells = []
            for it in map(str, range(1, cfg.iterations + 1)):
                v = [x[it][label] for x in per if label in x.get(it, {})]
                cells.append("—" if not v else f"{sum(v) / len(v):.3g}" if event else
                             f"{sum(a for a, _ in v) / len(v):.3g} → {sum(b for _, b in v) / len(v):.3g}")
            if set(cells) != {"—"}:
                rows.append(f"| {LABEL[key]} | {label} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", f"Training signals per iteration (metrics.jsonl; mean over the seeds present; `a → b`: the median "
                f"of the iteration's first and of its last {EDGE} updates; one value: measured once per iteration, "
                "the rollouts' success on the train tasks for ETO and PPO, D's accuracy and loss on all the "
                "iteration's data after its D steps; clip fraction: the share of actions, tokens with "
                "--token_level, whose probability ratio left 1 ± clip_eps):", "",
            "| method | signal | " + " | ".join(f"iter {i}" for i in range(1, cfg.iterations + 1)) + " |",
            "| --- | --- |" + " --- |" * cfg.iterations, *rows]


# sweep -> (what it is against, column label, plot axis label)
SWEEPS = {"iterations": ("iterations", "iteration", "iteration"), "k": ("the practice number K", "K =", "practice number K"),
          "size": ("model size (tiny-preset width)", "dim", "dim (model width)")}


def sweep_points(cfg: TableConfig) -> tuple[list, dict]:
    """(x values, {(env, row label): [seed -> test success, per x]}) of the sweep cfg.what."""
    pts = {}
    for env in names(cfg.envs):
        if cfg.what == "iterations":
            xs = list(range(cfg.iterations + 1))
            for key in names(cfg.sweep_methods):
                pts[env, LABEL[key]] = [values(cfg, env, "novice", "test", "success_rate")] + \
                    [values(cfg, env, key, "test", "success_rate", i) for i in xs[1:]]
        elif cfg.what == "k":
            xs = ints(cfg.ks)
            for key in names(cfg.sweep_methods):
                pts[env, LABEL[key]] = [values(cfg, env, run_name(cfg, key, k), "test", "success_rate") for k in xs]
        else:
            xs = ints(cfg.dims)
            for key in ["novice", *names(cfg.sweep_methods)]:
                pts[env, LABEL[key]] = [values(cfg, env, key, "test", "success_rate", dim=d) for d in xs]
    return xs, pts


def sweep_section(cfg: TableConfig, argv: list[str], plot_dir: str, rel: str) -> list[str]:
    xs, pts = sweep_points(cfg)
    n_seeds = len(ints(cfg.seeds))
    title, label, axis = SWEEPS[cfg.what]
    out = [f"## Sweep: test success against {title}", "", f"Command: `python results.py {shlex.join(argv)}`", "",
           f"Seeds {cfg.seeds}; {cfg.n_test} test tasks; mean ± sample std over seeds"
           + {"iterations": "; iteration 0 is the novice.",
              "k": f"; after {cfg.iterations} iterations; a group baseline (inverse, PPO) needs K >= 2.",
              "size": f"; n_layers {cfg.n_layers}, n_heads {cfg.n_heads}; after {cfg.iterations} iterations."}[cfg.what], "",
           "| env | method | " + " | ".join(f"{label} {x}" for x in xs) + " |", "| --- | --- |" + " --- |" * len(xs)]
    for (env, row), per_x in pts.items():
        cells = ["n/a" if cfg.what == "k" and x < 2 and row in {LABEL[g] for g in GROUP} else fmt(v, n_seeds)
                 for x, v in zip(xs, per_x)]
        out.append(f"| {env} | {row} | " + " | ".join(cells) + " |")
    if not any(v for per_x in pts.values() for v in per_x):  # nothing computed: no empty plot over an earlier one
        return out + ["", "No plot: nothing computed yet."]
    group = {LABEL[g] for g in GROUP}
    part = any(not v for (env, row), per_x in pts.items() for x, v in zip(xs, per_x)
               if not (cfg.what == "k" and x < 2 and row in group))
    if part and (old := kept_part(out)):  # made in part: the earlier text and its plot stay, beneath
        return out + ["", "No new plot until every point is made (the plot below is the kept text's)."] + old
    note = plot(os.path.join(plot_dir, f"sweep-{cfg.what}.png"), axis, xs, pts)
    out += ["", note or f"![test success against {title}]({rel}/sweep-{cfg.what}.png)"]
    return out


def plot(path: str, xlabel: str, xs: list, pts: dict) -> str:
    """A PNG, one panel per env, mean ± std over seeds per method; '' when drawn, else a one-line note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(No plot: matplotlib is not installed; `pip install matplotlib`, then `python results.py report`.)"
    env_names = list(dict.fromkeys(env for env, _ in pts))
    fig, axes = plt.subplots(1, len(env_names), figsize=(4.5 * len(env_names), 3.5), squeeze=False)
    for ax, env in zip(axes[0], env_names):
        for (e, row), per_x in pts.items():
            got = [(x, *mean_spread(list(v.values()))) for x, v in zip(xs, per_x) if e == env and v]
            if got:
                ax.errorbar([g[0] for g in got], [g[1] for g in got], yerr=[g[2] or 0 for g in got], label=row,
                            marker="o", capsize=3)
        ax.set(title=env, xlabel=xlabel, ylabel="test success", xticks=xs)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # room above the highest marker
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return ""


KEPT_NOTE = ("Kept as the previous RESULTS.md had it: none of these run folders or their records "
             "(results/records.json) are here; the command above regenerates it.")


KEPT_PART = ("#### Kept from the previous RESULTS.md until every cell above is made (not on this machine: "
             "other runs, maybe another precision)")


def previous(head: list[str], sub: str | None = None, raw: bool = False) -> list[str] | None:
    """The previous RESULTS.md's section that starts with head (its heading, a blank, its command), or
    that section's '### sub' block, with KEPT_NOTE added (not with raw); None when it has none."""
    for block in _REC["before"].split("\n## ")[1:]:
        lines = ("## " + block).rstrip("\n").split("\n")
        if lines[:3] != head[:3]:
            continue
        if sub is None:
            at = 4
        elif f"### {sub}" in lines:
            i = lines.index(f"### {sub}")
            j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("### ")), len(lines))
            lines, at = [""] + lines[i:j], 3
            while lines[-1] == "":
                lines.pop()
        else:
            return None
        return lines if raw or lines[at] == KEPT_NOTE else lines[:at] + [KEPT_NOTE, ""] + lines[at:]
    return None


def kept_part(head: list[str], env: str | None = None) -> list[str]:
    """The kept text of the previous RESULTS.md's section (a sweep) or of its env block (a table): text
    kept whole (under KEPT_NOTE, the section's or the block's), or the KEPT_PART under one that was
    made in part; to stay beneath a section or block made here only in part, so that numbers made
    elsewhere before records.json are never dropped before their cells are made again."""
    sec = previous(head, raw=True)
    if sec is None:
        return []
    whole = len(sec) > 4 and sec[4] == KEPT_NOTE  # the whole section was kept text
    lines = sec if env is None else previous(head, env, raw=True) or []
    at = 3 if env is None else 1  # where the body starts past the command / the '### env' line, blank skipped
    if KEPT_PART in lines:
        body = lines[lines.index(KEPT_PART) + 1:]
    elif whole or (len(lines) > 3 and lines[3] == KEPT_NOTE):
        body = [x for i, x in enumerate(lines) if i > at and x != KEPT_NOTE]
    else:
        body = []
    while body and body[0] == "":
        body = body[1:]
    return ["", KEPT_PART, "", *body] if body else []


def report(out: str, results: str) -> None:
    """RESULTS.md from the recorded commands (load_commands) and what their folders hold, or, for a
    file not here, what results/records.json kept of it; a section with nothing to read keeps the
    previous RESULTS.md's text (noted), so the numbers of runs made elsewhere are never dropped."""
    store = records_path(results)
    recorded = load_commands(out, results)
    defaults = TableConfig()
    recorded.setdefault("table", [["table", *(["--out", out] if out != defaults.out else []),
                                   *(["--results", results] if results != defaults.results else [])]])
    _REC.update(old=json.load(open(store)).get("cells", {}) if os.path.exists(store) else {}, new={}, digest={}, replayed={})
    _REC["before"] = open(results).read() if os.path.exists(results) else ""
    plot_dir = os.path.dirname(store)
    text = ["# Results", "", "Generated by `results.py` (do not edit by hand): the numbers here are whatever the "
            "commands below last produced, read back from the run folders' summary.json files, or from "
            "results/records.json where the run folders are not on this machine. "
            "How the methods and budgets are set up: the docstring of results.py.", ""]
    tables = ["table"] + sorted(k for k in recorded if k.startswith("table-"))  # table-<preset>: a non-tiny preset
    for what in (*tables, "sweep-iterations", "sweep-k", "sweep-size"):
        for argv in commands(recorded, what):
            with contextlib.redirect_stdout(io.StringIO()):  # parse_config prints the config
                cfg = RT.parse_config(TableConfig, argv[1:])
            _REC.update(section=section_key(what, argv), found=0, out=cfg.out)  # its cells' folder
            lines = table_section(cfg, argv) if what.startswith("table") else sweep_section(cfg, argv, plot_dir, "results")
            text += ((not _REC["found"] and previous(lines)) or lines) + [""]
    envs.write_json(store, {"commands": recorded, "cells": _REC["new"]})
    envs.atomic_write(results, "\n".join(text))
    print(f"wrote {results}")
