#!/usr/bin/env python3
"""CPU time per request of one proxy hop, proxies alternated in rounds: user and system.

    benches/hop_cpu.py [--proxies floor,floor-h1nc,nginx,pylon,pylon@OTHER-BUILD,floor@OTHER-BUILD]
                       [--rounds 5] [--requests 60000]
                       [--concurrency 8] [--workload http1-get]

Where `benches/profile.py` counts instructions (exact, but not time), this measures time on the
same one-hop setup: each of `--proxies` (any of profile.py's `--proxy` values) in turn in front
of the bench's app, started by profile.py's own `run()`, the proxy pinned to core 1 and the app
and the client (`pylon-bench send`) to core 0. After a 3,000-request warm-up, `--requests` more
are sent, and the proxy's utime and stime over them (all its threads, from /proc) are divided
by that count. Each round runs every proxy once, so a slow spell of the machine falls on all of
them; the medians over the rounds are printed with every round's figure.

System time is most of a hop's time on loopback and moves more between rounds than between
proxies: read the user column. Build first (`cargo build --release -p pylon-bench` and
`scripts/build-release-proxy`, or run profile.py once, which does both).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile as P  # noqa: E402  (benches/profile.py, beside this file)

WARM = 3000
TICK = os.sysconf("SC_CLK_TCK")
# The proxy alone on one core; the app and the client on the other.
CORE_1 = ("taskset", "-c", "1")
CORE_0 = ("taskset", "-c", "0")


def cpu_seconds(pid):
    """(user, system) seconds of every thread of `pid` so far."""
    user = system = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / TICK, system / TICK


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proxies", default="floor,floor-h1nc,nginx,pylon")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=60000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workload", default="http1-get", choices=sorted(P.WORKLOADS))
    ap.add_argument("--pylon-bin", default=os.path.join(
        P.ROOT, "target", "x86_64-unknown-linux-gnu", "release", "pylon-proxy"),
        help="the release pylon-proxy (scripts/build-release-proxy prints where it is)")
    a = ap.parse_args()
    proxies = a.proxies.split(",")
    # `pylon@PATH` (or `pylon-outbound@PATH`, `floor@PATH`...): that hop run from another build,
    # to compare two builds in the same rounds.
    binaries = {}
    for proxy in proxies:
        kind, _, binary = proxy.partition("@")
        if kind not in (*P.OWN, "nginx", "haproxy"):
            sys.exit(f"hop_cpu: unknown proxy {proxy!r}")
        # Which of profile.py's binaries the run takes from here.
        which = "FLOOR" if kind.startswith("floor") else "PYLON"
        binaries[proxy] = (kind, which, binary or (P.FLOOR if which == "FLOOR" else a.pylon_bin))
    app, app_port = P.start_app(wrap=CORE_0)
    work = tempfile.mkdtemp(prefix="pylon-hop-cpu-")
    results = {p: [] for p in proxies}
    try:
        time.sleep(0.5)
        for r in range(a.rounds):
            for proxy in proxies:
                kind, which, binary = binaries[proxy]
                setattr(P, which, binary)
                state = {}

                def start(pid):
                    state["pid"], state["before"] = pid, cpu_seconds(pid)

                def stop():
                    state["after"] = cpu_seconds(state["pid"])

                P.run(WARM, app_port, a.workload, a.concurrency, kind, work,
                      wrap=CORE_1, measured=(a.requests, start, stop), client_wrap=CORE_0)
                user, system = (1e6 * (after - before) / a.requests
                                for after, before in zip(state["after"], state["before"]))
                results[proxy].append((user, system))
                print(f"round {r}: {proxy:14} user {user:6.2f} µs/req  sys {system:6.2f} µs/req",
                      flush=True)
    finally:
        app.terminate()
        app.wait()
    print(f"\n{a.workload}, {a.requests} requests on {a.concurrency} connections, "
          f"{a.rounds} rounds (median, then every round)")
    for proxy in proxies:
        users = [u for u, _ in results[proxy]]
        systems = [s for _, s in results[proxy]]
        print(f"{proxy:14} user {median(users):6.2f} {sorted(round(u, 2) for u in users)}"
              f"  sys {median(systems):6.2f}")


if __name__ == "__main__":
    main()
