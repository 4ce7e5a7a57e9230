"""Quasar and its PyTorch peers side by side, in one call on one machine (bench/compare.sh
builds Quasar and calls this). For each row it runs Quasar's measurement and then the
peer's (rounds > 1: alternately peer first, so that a drift in load hits both), notes how
busy the rest of the machine was during each, pairs the figures by result name and
writes bench/results/<date>-<device>-compare.json (../shared/docs/DESIGN.md's format)
with a markdown table on stdout.

ratio > 1 means Quasar is better: Quasar / peer for rates (tokens/s, MFU, GFLOP/s), peer /
Quasar for times, memory and overheads (ms, MiB, MoE layer / dense FFN). Needs no torch
itself: a peer that fails (torch missing, say) leaves its figures null and its error in
the record."""
import argparse
import datetime
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LOWER_IS_BETTER = re.compile(r"(_ms|_ms_per_step|_ms_per_token|_mib|_over_dense)$")


class Row:
    """One comparison: the two commands (argument lists, given the options) and the
    result names to pair. A `flat` row's peer prints one flat JSON object
    (quadconv_torch.py), whose keys are the names; its Quasar side too on the CPU
    (quadconv_speed), a `quasar bench kernels` record on a GPU."""

    def __init__(self, name, what, quasar, peer, metrics, flat=False):
        self.name, self.what, self.quasar, self.peer = name, what, quasar, peer
        self.metrics, self.flat = metrics, flat


# peak memory: RSS on the CPU, torch.cuda.max_memory_allocated on a GPU; a name that no
# record of a row has is left out of the table
TRAIN = ["train_tokens_per_s", "train_ms_per_step", "train_mfu", "train_peak_rss_mib", "train_peak_gpu_mem_mib"]
# B H W C k: on a CPU bench/quadconv.sh's, issue 7's shape with a CPU's batch; on a GPU
# issue 7's own, the shape `quasar bench kernels` times there (csrc/bench_kernels.c)
QUADCONV_SHAPE = {"cpu": ["8", "56", "56", "64", "7"], "cuda": ["64", "56", "56", "256", "7"]}


def train_row(name, what, config):
    return Row(name, f"{what} ({config})",
               lambda a: [a.quasar, "bench", "train", "--config", config, "--steps", str(a.steps), "--json"]
               + a.quasar_device,
               lambda a: [sys.executable, f"{HERE}/gpt_torch.py", "--config", config, "--steps", str(a.steps)]
               + a.peer_args + (["--compile"] if a.compile else []),
               TRAIN)


def quadconv_quasar(a):
    if a.device == "cpu":
        return [a.quadconv_speed, *QUADCONV_SHAPE["cpu"], str(a.repeats)]
    return [a.quasar, "bench", "kernels", "--only", "quadconv", "--repeats", str(a.repeats), "--json"] + a.quasar_device


def quadconv_row(device):
    B, H, W, C, k = QUADCONV_SHAPE[device]
    return Row("quadconv", f"quadconv op, B={B} {H}x{W} C={C} k={k}, forward + backward", quadconv_quasar,
               lambda a: [sys.executable, f"{HERE}/quadconv_torch.py", *QUADCONV_SHAPE[a.device],
                          "--repeats", str(a.repeats)] + a.peer_args,
               ["fwd_ms", "bwd_ms", "fwd_bwd_ms"], flat=True)


def moe_row(shape, what):
    return Row(f"moe_{shape}", f"MoE layer, shape {shape} ({what}), forward + backward; peer: makeMoE's expert loop",
               lambda a: [a.quasar, "bench", "moe", "--shape", shape, "--repeats", str(a.repeats), "--json",
                          "--precision", a.dtype] + a.quasar_device,
               lambda a: [sys.executable, f"{HERE}/moe_torch.py", "--shape", shape, "--repeats", str(a.repeats)]
               + a.peer_args,
               ["moe_layer_fwd_bwd_ms", "moe_layer_tokens_per_s", "moe_ffn_dense_fwd_bwd_ms", "moe_layer_over_dense"])


# issue 5's sweep on a GPU, a shorter one on the CPU (csrc/bench.c's defaults): the result
# names both sides print, one per length x head size x mask x pass
ATTENTION_SWEEP = {"cpu": ([256, 1024], [64, 128]), "cuda": ([1024, 4096, 16384], [64, 128])}


def attention_row(device):
    seqs, heads = ATTENTION_SWEEP[device]
    names = [f"attention_T{T}_hs{hs}_{mask}_{p}_tflop_per_s" for T in seqs for hs in heads
             for mask in ("causal", "full") for p in ("fwd", "fwd_bwd")]
    return Row("attention", "fused attention, forward and forward + backward; peer: SDPA (FlashAttention on a GPU)",
               lambda a: [a.quasar, "bench", "attention", "--repeats", str(a.repeats), "--json",
                          "--precision", a.dtype] + a.quasar_device,
               lambda a: [sys.executable, f"{HERE}/attention_torch.py", "--repeats", str(a.repeats)] + a.peer_args,
               names)


ROWS = [
    train_row("gpt", "train, default GPT", "configs/shakespeare_char_cpu.json"),
    train_row("makemoe", "train, makeMoE recipe", "configs/shakespeare_char_moe.json"),
    train_row("hybrid_lm", "train, hybrid LM (causal quadconv mixer)", "configs/shakespeare_char_quadconv.json"),
    quadconv_row("cpu"),
    attention_row("cpu"),
    moe_row("a", "8 experts, top-2, F=4C"),
    moe_row("b", "64 experts, top-8, F=C"),
    Row("generate", "generate, default GPT shape (configs/shakespeare_char_cpu.json), random weights",
        lambda a: [a.quasar, "bench", "generate", "--config", "configs/shakespeare_char_cpu.json",
                   "--repeats", str(a.repeats), "--json"] + a.quasar_device,
        lambda a: [sys.executable, f"{HERE}/generate_torch.py", "--config", "configs/shakespeare_char_cpu.json",
                   "--repeats", str(a.repeats)] + a.peer_args,
        ["generate_prefill_tokens_per_s", "generate_decode_tokens_per_s", "generate_decode_ms_per_token",
         "generate_peak_rss_mib", "generate_peak_gpu_mem_mib"]),
]


# ---- running one side, and how busy the machine was meanwhile ----


def ticks():
    """(busy, total) CPU ticks from /proc/stat, and the CPU time of this process's
    finished children, in ticks."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, busy + v[3] + v[4], (u.ru_utime + u.ru_stime) * os.sysconf("SC_CLK_TCK")


def run(cmd, env):
    """Runs one side. Returns (record or None, error or None, measured load): the load is
    the share of the CPU that processes other than this command took while it ran
    (/proc/stat's busy ticks less the command's own CPU time, over all ticks; the same
    figure as Quasar's own "others_cpu", measured the same way for both sides)."""
    with open("/proc/loadavg") as f:
        load1 = float(f.read().split()[0])
    b0, t0, c0 = ticks()
    w0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    b1, t1, c1 = ticks()
    load = {"others_cpu": round(max(0.0, (b1 - b0 - (c1 - c0)) / (t1 - t0)), 4) if t1 > t0 else None,
            "load_avg_1m_before": load1, "wall_s": round(time.time() - w0, 2)}
    print(f"compare:   {' '.join(cmd)}  ({load['wall_s']} s, others_cpu {load['others_cpu']})", file=sys.stderr)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        print(f"compare:   failed: {tail}", file=sys.stderr)
        return None, tail, load
    try:  # one record: Quasar's spans lines, the peers' is the last line
        return json.loads(p.stdout), None, load
    except ValueError:
        try:
            return json.loads(p.stdout.strip().splitlines()[-1]), None, load
        except (ValueError, IndexError):
            print("compare:   failed: no JSON record on stdout", file=sys.stderr)
            return None, "no JSON record on stdout", load


def measure(cmd, env, a):
    """run() until the rest of the machine took at most --max-others of the CPU, at most
    1 + --retries times, --wait seconds apart. The last run counts; its load carries the
    others_cpu of every attempt, and "busy" when even the last was over the limit."""
    tries = []
    for attempt in range(1 + a.retries):
        if attempt:
            print(f"compare:   busy (others_cpu {tries[-1]}): again in {a.wait} s", file=sys.stderr)
            time.sleep(a.wait)
        rec, err, load = run(cmd, env)
        tries.append(load["others_cpu"])
        if err or load["others_cpu"] is None or load["others_cpu"] <= a.max_others:
            break
    load["attempts_others_cpu"] = tries
    load["busy"] = bool(load["others_cpu"] is not None and load["others_cpu"] > a.max_others)
    return rec, err, load


def figures(row, rec):
    """{name: (value, metric)} of one record."""
    if rec is None:
        return {}
    if row.flat and "results" in rec:  # quasar bench kernels --only quadconv
        rec = {k: next(e["quasar"] for e in rec["results"] if e["name"] == f"kernel_quadconv_{k}")
               for k in ("fwd_ms", "bwd_ms")}
    if row.flat:
        out = {k: (rec[k], k.replace("_", " ")) for k in ("fwd_ms", "bwd_ms")}
        out["fwd_bwd_ms"] = (rec["fwd_ms"] + rec["bwd_ms"], "forward + backward ms")
        return out
    key = "quasar" if rec["results"] and rec["results"][0]["quasar"] is not None else "peer_value"
    return {e["name"]: (e[key], e["metric"]) for e in rec["results"]}


def prefixed(prefix, name):
    """prefix before a figure's name, their common first word once: gpt_train_mfu,
    quadconv_fwd_ms, generate_decode_tokens_per_s, moe_a_layer_fwd_bwd_ms (bench/cpu.sh
    names its topics' results the same way)."""
    head = prefix.split("_")[0]
    return prefix + name[len(head):] if name.startswith(head + "_") else f"{prefix}_{name}"


def median_or_none(xs):
    """The median to 6 significant digits, as the records give their figures."""
    xs = [x for x in xs if x is not None]
    return float(f"{statistics.median(xs):.6g}") if xs else None


def peer_name(row, recs):
    rec = next((r for r in recs if r), None)
    if rec is None:
        return None
    if row.flat:
        return "PyTorch eager, 3 depthwise Conv2d + mul + add, channels_last (bench/peers/quadconv_torch.py)"
    return rec.get("peer")


def compare_row(row, a, env):
    q_recs, p_recs, q_loads, p_loads, errors = [], [], [], [], []
    print(f"compare: {row.name}: {row.what}", file=sys.stderr)
    for r in range(a.rounds):
        sides = ([] if a.peers_only else [("quasar", row.quasar(a))]) + [("peer", row.peer(a))]
        for side, cmd in sides if r % 2 == 0 else sides[::-1]:
            rec, err, load = measure(cmd, env, a)
            (q_recs if side == "quasar" else p_recs).append(rec)
            (q_loads if side == "quasar" else p_loads).append(load)
            if err:
                errors.append(f"{side}: {err}")
    q_figs = [figures(row, x) for x in q_recs]
    p_figs = [figures(row, x) for x in p_recs]
    peer = peer_name(row, p_recs)
    results = []
    for name in row.metrics:
        if any(q_figs + p_figs) and all(name not in f for f in q_figs + p_figs):
            continue
        q = median_or_none([f.get(name, (None,))[0] for f in q_figs])
        p = median_or_none([f.get(name, (None,))[0] for f in p_figs])
        metric = next((f[name][1] for f in q_figs + p_figs if name in f), name)
        if name == "train_mfu":  # each side over its own ceiling: say whose
            metric = ("MFU: model FLOP/s (csrc/bench.c's formula, both sides) over the square GEMM each side measured "
                      "(2048^3 on a CPU, 8192^3 on a GPU)")
        ratio = None
        if q and p:
            ratio = p / q if LOWER_IS_BETTER.search(name) else q / p
        results.append({
            "name": prefixed(row.name, name), "metric": f"{row.what}: {metric}" + (f", median of {a.rounds} rounds" if a.rounds > 1 else ""),
            "quasar": q, "peer": peer, "peer_value": p, "ratio": None if ratio is None else round(ratio, 4),
            "quasar_others_cpu": [x["others_cpu"] for x in q_loads], "peer_others_cpu": [x["others_cpu"] for x in p_loads],
            "quasar_runs": [f.get(name, (None,))[0] for f in q_figs], "peer_runs": [f.get(name, (None,))[0] for f in p_figs]})
    if row.metrics == TRAIN:  # the two MFU denominators, side by side
        q = median_or_none([x["ceilings"]["gemm_gflop_per_s"] for x in q_recs if x and x.get("ceilings")])
        p = median_or_none([x["ceilings"]["gemm_gflop_per_s"] for x in p_recs if x and x.get("ceilings")])
        results.append({"name": prefixed(row.name, "ceiling_gemm_gflop_per_s"),
                        "metric": f"{row.what}: the MFU ceiling, square GEMM GFLOP/s measured in the same process "
                                  "(Quasar: its backend's matmul_forward, on a CPU OpenBLAS sgemm with the rows "
                                  "split over the threads; peer: torch.mm)",
                        "quasar": q, "peer": peer, "peer_value": p,
                        "ratio": round(q / p, 4) if q and p else None,
                        "quasar_others_cpu": [x["others_cpu"] for x in q_loads],
                        "peer_others_cpu": [x["others_cpu"] for x in p_loads]})
    raw = {"quasar": q_recs, "peer": p_recs, "quasar_load": q_loads, "peer_load": p_loads}
    if errors:
        raw["errors"] = errors
    return results, raw


def short_device(rec_device, device):
    if device == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", rec_device.lower()).strip("-")


def fmt(v):
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quasar", required=True, help="the quasar binary")
    ap.add_argument("--quadconv-speed", required=True, help="the build's bench/quadconv_speed")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for Quasar = torch threads (default: all cores)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per side (default 20)")
    ap.add_argument("--repeats", type=int, default=20, help="timed generations / op calls per side (default 20)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each side per row, alternating order (default 1)")
    ap.add_argument("--max-others", type=float, default=0.05, metavar="SHARE",
                    help="rerun a side when other processes took more of the CPU than this (default 0.05)")
    ap.add_argument("--retries", type=int, default=3, help="reruns of a busy side (default 3; 0: never)")
    ap.add_argument("--wait", type=float, default=60, help="seconds before a rerun (default 60)")
    ap.add_argument("--peers-only", action="store_true", help="run the PyTorch side alone")
    ap.add_argument("--compile", action="store_true", help="torch.compile the GPT peers' models")
    ap.add_argument("--train", action="append", default=[], metavar="NAME=CONFIG",
                    help="one more training row on that config (e.g. a GPT-2 124M config on a GPU); repeatable")
    ap.add_argument("--only", default="", help="comma-separated row names (default: all): "
                    + ", ".join(r.name for r in ROWS))
    ap.add_argument("--out", default="", help="default: bench/results/<date>-<device>-compare.json")
    ap.add_argument("--command", default="", help="the command line to record (bench/compare.sh passes its own)")
    a = ap.parse_args()
    a.threads = a.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    a.peer_args = ["--device", a.device, "--dtype", a.dtype, "--threads", str(a.threads)]
    a.quasar_device = []
    if a.device == "cuda" and not a.peers_only:
        help_text = subprocess.run([a.quasar, "bench", "train", "--help"], capture_output=True, text=True).stdout
        if "--device" not in help_text:
            sys.exit("error: this quasar's bench has no --device; a CUDA peer against a CPU Quasar would compare "
                     "nothing (--peers-only records the PyTorch side alone)")
        a.quasar_device = ["--device", "cuda"]
    by_device = {"quadconv": quadconv_row, "attention": attention_row}
    rows = [by_device[r.name](a.device) if r.name in by_device else r for r in ROWS]
    for spec in a.train:
        name, _, config = spec.partition("=")
        if not name or not config or any(r.name == name for r in rows):
            sys.exit(f"error: --train {spec!r}: expected a new NAME=CONFIG")
        rows.append(train_row(name, "train", config))
    wanted = set(filter(None, a.only.split(",")))
    unknown = wanted - {r.name for r in rows}
    if unknown:
        sys.exit(f"error: --only: unknown rows {sorted(unknown)}")

    results, raw = [], {}
    for row in rows:
        if wanted and row.name not in wanted:
            continue
        res, raw[row.name] = compare_row(row, a, env)
        results += res

    recs = [r for x in raw.values() for r in x["quasar"] + x["peer"] if r and "device" in r]
    peer_recs = [r for x in raw.values() for r in x["peer"] if r and "device" in r]
    device = (peer_recs or recs or [{"device": a.device}])[0]["device"]
    date = datetime.date.today().isoformat()
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    with open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    out = {"device": device, "date": date, "commit": commit or None,
           "command": a.command or "python3 " + " ".join(sys.argv),
           "machine": {"cpu": next((r["device"] for r in recs if r["device"].startswith("cpu-")), None),
                       "cores": os.cpu_count(), "mem_gib": round(int(mem) / 2 ** 20, 1), "uname": " ".join(os.uname())},
           "threads": {"quasar_OMP_NUM_THREADS": a.threads, "torch_set_num_threads": a.threads},
           "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GLIBC_TUNABLES", "LD_PRELOAD") if k in os.environ},
           "torch": next((r.get("torch") for r in peer_recs if r.get("torch")), None),
           "ratio": "> 1 means Quasar is better: Quasar / peer for rates, peer / Quasar for ms, MiB and MoE "
                    "layer / dense FFN",
           "load": "quasar_others_cpu / peer_others_cpu: per run, the share of the CPU other processes took while "
                   "that side ran (/proc/stat around the command, less the command's own CPU time); a run over "
                   "max_others was repeated (records.*.*_load: attempts_others_cpu, busy)",
           "max_others": a.max_others,
           "results": results, "records": raw}
    path = a.out or f"bench/results/{date}-{short_device(device, a.device)}-compare.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)
    print("| row | Quasar | PyTorch | ratio | others_cpu Quasar / peer |")
    print("|---|---|---|---|---|")
    for e in results:
        loads = "/".join(fmt(x) for x in e["quasar_others_cpu"]) + " / " + "/".join(fmt(x) for x in e["peer_others_cpu"])
        print(f"| {e['name']} | {fmt(e['quasar'])} | {fmt(e['peer_value'])} | {fmt(e['ratio'])} | {loads} |")


if __name__ == "__main__":
    main()
