"""What every script needs and no equation does: the command line and --help, the metrics log,
resumable partial files, run-folder checks, the training precision and the machine's provenance.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import sys
import time

import torch
from tqdm import tqdm

import envs
import parallel as P


# ----------------------------------------------------------------------------- config and command line


def opt(default, help: str):
    """A config field with its --help text: `k: int = opt(4, "practice number K")`."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_config(cls, argv: list[str], usage: str | None = None):
    """`--field value` for every dataclass field; checks, prints and returns the resolved config
    (-h / --help: the usage line and the options, then exit)."""
    cfg, i = cls(), 0
    fields = {f.name: f for f in dataclasses.fields(cls)}
    while i < len(argv):
        if argv[i] in ("-h", "--help"):
            print_help(config_help(cls, usage))
        key = argv[i].lstrip("-").replace("-", "_")
        if not argv[i].startswith("--") or key not in fields:
            sys.exit(f"error: unknown option {argv[i]!r}; options: " + " ".join(f"--{k}" for k in fields))
        if i + 1 >= len(argv):
            sys.exit(f"error: --{key} needs a value")
        raw, default = argv[i + 1], getattr(cfg, key)
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                val = raw.lower() in ("true", "1")
            else:
                val = type(default)(raw)
        except ValueError:
            sys.exit(f"error: --{key} expects a {type(default).__name__}, got {raw!r}")
        setattr(cfg, key, val)
        i += 2
    check_config(cfg)
    cfg.amp = resolve_amp(cfg.amp, P.get_device(cfg.device))  # the precision this run trains in, in its config.json
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 only (parsing comes before dist_setup)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
    return cfg


def check_config(cfg) -> None:
    """Refuse options that cannot work, before any work, with one line naming the option: a str
    option's value must be one of its class's CHOICES (merged over the bases, a subclass's entry
    winning); every other check is the config class's own `check()`."""
    choices = {}
    for c in reversed(type(cfg).__mro__):
        choices.update(vars(c).get("CHOICES", {}))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            sys.exit(f"error: --{key} {getattr(cfg, key)!r}: choose {', '.join(allowed)}")
    cfg.check()


def at_least(cfg, lo: float, *names: str) -> None:
    """Refuse the first of these options below lo (or, for a float, not a finite number)."""
    for k in names:
        v = getattr(cfg, k)
        if not math.isfinite(v) or v < lo:
            sys.exit(f"error: --{k} {v}: must be {'a finite number, ' if isinstance(v, float) else ''}at least {lo}")


def at_least_1(cfg, *names: str) -> None:
    at_least(cfg, 1, *names)


def positive(cfg, *names: str) -> None:
    """Refuse the first of these options that is not a finite number above 0 (a rate, beta, a clip)."""
    for k in names:
        v = getattr(cfg, k)
        if not (math.isfinite(v) and v > 0):
            sys.exit(f"error: --{k} {v}: must be a finite number above 0")


def within(cfg, name: str, lo: float, hi: float) -> None:
    """Refuse the option unless lo <= value <= hi."""
    v = getattr(cfg, name)
    if not lo <= v <= hi:
        sys.exit(f"error: --{name} {v}: must be in [{lo}, {hi}]")


def refuse_eval_options(cfg) -> None:
    """--model and --split are stepagent.py inspect/eval's; a training run refuses them (it starts from
    --preset, and evaluates on dev and test) rather than ignore them."""
    if cfg.model:
        sys.exit(f"error: --model {cfg.model!r}: training starts from --preset (tiny, smollm2, or a model "
                 f"folder such as this one); --model is for stepagent.py inspect and eval")
    if cfg.split != type(cfg)().split:
        sys.exit(f"error: --split {cfg.split!r}: training evaluates on dev and test; --split is for stepagent.py eval")


def print_help(text: str) -> None:
    """Print text and exit 0, quietly when the reader has gone (`--help | head`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:  # send what Python flushes at exit to /dev/null, not a second traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def config_help(cls, usage: str | None = None) -> str:
    """The usage line (default: the running script's, with its docstring's first line), then every
    option of config class cls with its default and its field's help (a subclass's over its base's)."""
    if usage is None:
        doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip().split("\n")[0]
        usage = f"usage: python {os.path.basename(sys.argv[0])} [--option value ...]" + (f": {doc}" if doc else "")
    helps = {}
    for c in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        for f in dataclasses.fields(c):
            if f.metadata.get("help") or f.name not in helps:
                helps[f.name] = f.metadata.get("help", helps.get(f.name, ""))
    defaults = dataclasses.asdict(cls())
    shown = {k: str(v).lower() if isinstance(v, bool) else str(v) or "''" for k, v in defaults.items()}
    w = max(len(k) + len(v) for k, v in shown.items()) + 4
    return "\n".join([usage + " (each option: its default, then what it sets)"] +
                      [f"  {f'--{k} {v}':<{w}} {helps.get(k, '')}".rstrip() for k, v in shown.items()])


# ----------------------------------------------------------------------------- the metrics log


class Log:
    """One JSON line per event in <out>/<name>.jsonl and a short line on stdout."""

    def __init__(self, path: str):
        self.f = None  # torchrun: only rank 0 writes
        if P.is_main():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path, "a")

    def write(self, **kv):
        """The JSON line only (per-step metrics; the progress bar shows them)."""
        if self.f:
            self.f.write(json.dumps(kv) + "\n")
            self.f.flush()

    def __call__(self, **kv):
        self.write(**kv)
        if self.f:
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in kv.items()))


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- precision and provenance


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto -> bf16 where the device computes bf16 natively (a CUDA GPU that has it; a CPU with
    AVX512-BF16 or AMX), else none: a CPU without them emulates bf16, many times slower than fp32
    (`python bench.py amp`; docs/speed.md)."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        return "bf16" if cpu_native_bf16() else "none"
    return "none"


def cpu_native_bf16() -> list[str]:
    """The features of this CPU that compute bf16 natively (AVX512-BF16, AMX tiles), as torch reports them.
    STEPAGENT_NATIVE_BF16=1 or 0 overrides the probe (so --amp auto picks bf16 or fp32 on any CPU):
    how the test suite is checked for both kinds of CPU on one machine."""
    forced = os.environ.get("STEPAGENT_NATIVE_BF16", "")
    if forced in ("0", "1"):
        return ["STEPAGENT_NATIVE_BF16"] if forced == "1" else []
    if forced:
        sys.exit(f"error: STEPAGENT_NATIVE_BF16={forced!r}: set it to 1 or 0, or unset it")
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return [name for name, f in probes.items() if getattr(torch.cpu, f, lambda: False)()]


def autocast(device: torch.device, amp: str):
    """bf16 autocast for training passes (weights and optimizer stay fp32), or nothing; auto as resolve_amp."""
    amp = resolve_amp(amp, device)
    if amp not in ("bf16", "none"):
        raise ValueError(f"--amp {amp!r}: choose auto, bf16 or none")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def mkl_code() -> int | None:
    """The code path MKL picked for this CPU (`mkl_serv_cpu_detect` in torch's libtorch_cpu, which links
    MKL in); None where torch has no MKL. MKL picks it by CPU vendor, not by torch's kernel level: 0 is
    its generic path (the AMD CPUs we ran on, AVX512 or not), 7 the highest it accepts (AVX-512), so two
    CPUs with the same `kernels` can still sum fp32 matmuls differently (EXPERIMENTS, household seed 2)."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return int(lib.mkl_serv_cpu_detect()) if torch.backends.mkl.is_available() else None
    except (OSError, AttributeError):  # another platform's library name, or no MKL symbol in it
        return None


def machine() -> dict:
    """What this process computes on, kept beside what it makes (a novice's trainer_state.json, an
    evaluation's summary.json, a run's last/): the CPU (name, family and model), the kernels torch
    picked for it (fp32 sums differ between AVX2 and AVX512 kernels, so the same command's weights do
    too), MKL's code path (mkl_code), threads, torch, and the GPU if any."""
    info = {}
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    return {"cpu": cpu, "kernels": torch.backends.cpu.get_cpu_capability(), "mkl": mkl_code(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def machines(seen: list | None) -> list[dict]:
    """seen (the machines a resumed run computed on so far), this one added if it differs from the last."""
    seen, here = list(seen or []), machine()
    return seen if seen and seen[-1] == here else seen + [here]


# ----------------------------------------------------------------------------- resumable partial files


def load_state(path: str, fix: str, map_location=None):
    """A run-state file (collect-<it>.pt, a partial file, last/method.pt) read as tensors and plain
    containers only (torch.load with weights_only), so a crafted file in a shared run folder cannot
    run code; a file that is not one (damaged, truncated, or crafted) stops the run with one line
    naming it and `fix`, what to do."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # an unpickling refusal, a truncated zip, a file of another kind
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        sys.exit(f"error: {path}: not a run-state file this project can read ({why}); {fix}")


def rank_path(path: str) -> str:
    return path if P.world() == 1 else f"{path}.rank{P.rank()}"


class Partial:
    """The partial file of one long sampling loop: the results of its finished items (a rollout's
    batches, inspect's records, a scoring pass's rows) and the generator's state after them, so a
    rerun does only the rest, with the same draws as an uninterrupted run. `key` names the work; a
    file kept for other work stops the run rather than be overwritten. path None: keeps nothing.

        kept = Partial(path, key, generator, desc, results=[])   # .done items, .results, as kept
        for i in range(kept.done, n): ...; kept.save(i + 1)
    """

    def __init__(self, path: str | None, key: dict, generator=None, desc: str = "", results=None):
        self.path, self.key, self.generator = path and rank_path(path), key, generator
        self.done, self.results, self.earlier, self.t0 = 0, results, 0.0, time.time()
        if not self.path or not os.path.exists(self.path):
            return
        saved = load_state(self.path, "delete it to start that part over")
        if not isinstance(saved, dict) or not {"key", "done", "results", "seconds", "generator"} <= set(saved):
            sys.exit(f"error: {self.path}: not a partial file of this project; delete it to start that part over")
        if saved["key"] != key:  # never overwrite kept work silently (nor count its seconds as this work's)
            differ = ", ".join(f for f in key if saved["key"].get(f) != key[f])
            sys.exit(f"error: {self.path} keeps part of other work (different {differ}); rerun with the settings "
                     f"that wrote it, or delete the file to start over")
        if generator is not None:
            generator.set_state(saved["generator"])
        tqdm.write(f"{desc}: resuming after {saved['done']} of {len(next(iter(key.values())))}, kept in {self.path}")
        self.done, self.results, self.earlier = saved["done"], saved["results"], saved["seconds"]

    @staticmethod
    def seconds(path: str) -> float:
        saved = load_state(path, "delete it to start that part over")
        return float(saved["seconds"]) if isinstance(saved, dict) and "seconds" in saved else 0.0

    def save(self, done: int) -> None:
        """Keep self.results as the first `done` items' (no-op without a path)."""
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        atomic_torch_save({"key": self.key, "done": done, "results": self.results,
                           "seconds": self.earlier + time.time() - self.t0,
                           "generator": None if self.generator is None else self.generator.get_state()}, self.path)


def _scores_path(partial: str) -> str:  # kept_map's file beside a collect's partial file
    return os.path.join(os.path.dirname(partial), "scores-" + os.path.basename(partial))


def partial_seconds(partial: str) -> float:
    """Wall seconds of the work a partial file (and kept_map's beside it) kept from earlier runs (0 if none)."""
    mine = [rank_path(p) for p in (partial, _scores_path(partial))]
    return sum(Partial.seconds(m) for m in mine if os.path.exists(m))


def drop_partial(partial: str) -> None:
    for mine in (rank_path(partial), rank_path(_scores_path(partial))):
        if os.path.exists(mine):
            os.remove(mine)


def kept_map(fn, items: list, partial: str | None = None, desc: str = "scoring") -> list:
    """[fn(x) for x in items], each rank its shard, gathered: a collect's scoring pass (the reference or
    old log-probs of every trajectory: one forward each). partial: the collect's partial file; the
    finished results are kept beside it (scores-<name>) about 50 times a pass, so a killed pass reruns
    only the rest. Items are keyed by their text (token ids): other items stop the run."""
    shard = P.shard(items)
    key = {"items": [hashlib.sha1(repr(x).encode()).hexdigest()[:16] for x in shard]}
    kept = Partial(partial and _scores_path(partial), key, None, desc, results=[])
    every = max(1, len(shard) // 50)
    for i in tqdm(range(kept.done, len(shard)), desc=desc, initial=kept.done, total=len(shard), leave=False,
                  disable=not P.is_main()):
        kept.results.append(fn(shard[i]))
        if (i + 1) % every == 0 or i + 1 == len(shard):
            kept.save(i + 1)
    return P.gather(kept.results)


# ----------------------------------------------------------------------------- run folders


def check_run_config(run: str, cfg, ignore: set) -> None:
    """<run>/config.json records the run's options; resuming it with others (those in `ignore` aside)
    is refused, the option named."""
    path = os.path.join(run, "config.json")
    now = dataclasses.asdict(cfg)
    if os.path.exists(path):
        old = {**dataclasses.asdict(type(cfg)()),  # an option added since: its default
               **read_json(path, "delete it to resume with this run's options")}
        diff = [k for k in now if k not in ignore and old[k] != now[k]]
        if diff:
            k = diff[0]
            sys.exit(f"error: {run} holds a run with --{k} {old[k]!r}, not {now[k]!r}; "
                     f"rerun with the same options to resume, or choose another --out")
    if P.is_main():
        envs.write_json(path, now)


def read_json(path: str, fix: str):
    """A JSON file of a run folder (trainer_state.json, config.json, ...); a damaged one (a kill
    mid-write, a full disk) stops the run with one line naming it and `fix`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        sys.exit(f"error: {path}: not valid JSON ({str(e).splitlines()[0][:120]}); {fix}")


def truncate_log(path: str, step: int, collect_pending: bool) -> list[dict]:
    """Drop per-step metric lines past the checkpoint (a killed run wrote them; the resumed run
    writes them again), so the file reads as one uninterrupted run. collect_pending: the next
    collect has no saved collect-<it>.pt, so the step-less event lines at the end (inspect, explore)
    came from a collect killed before its save, and the rerun logs them again. Returns the lines
    kept (rank 0; [] on the others, which write no log)."""
    if not (os.path.exists(path) and P.is_main()):
        return []
    raw, rows = open(path, encoding="utf-8", errors="replace").readlines(), []
    for n, x in enumerate(raw):
        try:
            rows.append(json.loads(x))
        except ValueError:
            if n + 1 < len(raw):  # a damaged line inside the log is not a kill's torn write
                sys.exit(f"error: {path}: line {n + 1} is not JSON; delete the run's folder to start it over")
            tqdm.write(f"note: {path}: its last line was cut off (a kill or a full disk); dropped")
            raw = raw[:n]
    if raw and not raw[-1].endswith("\n"):
        raw[-1] += "\n"
    keep = [i for i, x in enumerate(rows) if x.get("step", 0) <= step]
    while collect_pending and keep and "step" not in rows[keep[-1]]:
        keep.pop()
    envs.atomic_write(path, "".join(raw[i] for i in keep))
    return [rows[i] for i in keep]


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
