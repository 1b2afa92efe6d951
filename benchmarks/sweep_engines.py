"""Start-up cost and memory of the distributed engines a sweep can use, on this machine.

    python -m benchmarks.sweep_engines [--engines dask,ray] [--workers 2] [--repeats 3]

For each engine: seconds from nothing to a cluster of WORKERS worker processes that has
run one trivial task (median over repeats, each in a fresh process tree), and the
resident memory (RSS) of each worker process and of the engine's own service processes
(Dask: the nanny per worker; Ray: the GCS, raylet and dashboard). Prints one JSON
object. An engine that is not installed is reported as such, never timed."""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PROBE = {
    "dask": r"""
import json, os, time
t0 = time.perf_counter()
from distributed import Client, LocalCluster
import psutil
with LocalCluster(n_workers=W, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
    client.submit(os.getpid, pure=False).result()
    t1 = time.perf_counter()
    pids = list(client.run(os.getpid).values())
    rss = [psutil.Process(p).memory_info().rss for p in pids]
    nannies = [psutil.Process(p).parent().memory_info().rss for p in pids]
    print(json.dumps({"startup_s": t1 - t0, "worker_rss": rss, "service_rss": nannies}))
""",
    "ray": r"""
import json, os, time
t0 = time.perf_counter()
import ray, psutil
ray.init(num_cpus=W, include_dashboard=False, log_to_driver=False)
@ray.remote(num_cpus=1)
def pid():
    time.sleep(0.5)
    return os.getpid()
pids = sorted(set(ray.get([pid.remote() for _ in range(W)])))
t1 = time.perf_counter()
rss = [psutil.Process(p).memory_info().rss for p in pids]
me = psutil.Process()
service = [c.memory_info().rss for c in me.children(recursive=True) if c.pid not in pids]
ray.shutdown()
print(json.dumps({"startup_s": t1 - t0, "worker_rss": rss, "service_rss": service}))
""",
}


def measure(engine, python, workers, repeats):
    out = []
    for _ in range(repeats):
        p = subprocess.run([python, "-c", PROBE[engine].replace("W", str(workers))],
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    mib = 2 ** 20
    return {"startup_s_median": round(statistics.median(r["startup_s"] for r in out), 2),
            "startup_s": [round(r["startup_s"], 2) for r in out],
            "worker_rss_mib": round(statistics.median(x for r in out for x in r["worker_rss"]) / mib, 1),
            "service_rss_mib_total": round(statistics.median(sum(r["service_rss"]) for r in out) / mib, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep_engines", description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="dask,ray")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--python", action="append", default=[], metavar="ENGINE=PYTHON",
                   help="the interpreter that has ENGINE installed (default: this one)")
    args = p.parse_args(argv)
    pythons = dict(s.split("=", 1) for s in args.python)
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "workers": args.workers, "repeats": args.repeats, "engines": {}}
    for e in args.engines.split(","):
        res["engines"][e] = measure(e, pythons.get(e, sys.executable), args.workers, args.repeats)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
