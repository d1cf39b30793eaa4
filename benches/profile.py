#!/usr/bin/env python3
"""Instructions per request of one proxy hop, and where they go: valgrind's callgrind.

    benches/profile.py [--workload http1-get|http1-get-headers|http1-post64k|h2c-get|grpc-unary]
                       [--requests 3000]
                       [--concurrency 1] [--proxy pylon|pylon-outbound|nginx|haproxy|floor|floor-h2|floor-h2s|floor-h1i|floor-h1n|
                       floor-h1ns|floor-h1nc|floor-h1u]
                       [--out FILE]
                       [--keep DIR]

Why instructions: they are the same for the same binary and inputs whatever else a noisy 2-core
machine is doing, so a change's before -> after is a fact rather than a sample. They are not time
(a cache miss costs more than an add), so throughput is still the load bench's (`benches/run`).

How: the release `pylon-proxy` as the image ships it (`scripts/build-release-proxy`: the C
library linked in; debug info on, as `[profile.release]` has it) runs under
callgrind as one inbound hop in front of the bench's own app (`pylon-bench app`), or with
`--proxy pylon-outbound` as the client's outbound hop with the app its destination's endpoint
(the bench's chain sends through both, outbound then inbound); the bench's
client (`pylon-bench send`) sends the workload's requests on one connection (HTTP/1.1 keep-alive,
or h2). `--concurrency N` keeps N in flight: N streams of the one h2 connection, or N HTTP/1.1
connections. More than one shows what batching saves and what grows with the connections in
flight (the load bench runs 64: jemalloc's slab churn showed only there), at the price of
figures that vary a little with timing. The proxy is run twice, with a few
requests and with `--requests` more, and the difference of the two totals divided by the
difference of the counts is the cost per request, with start-up and shutdown cancelled out. The
functions' costs are read from the longer run the same way (each minus its cost in the shorter).

Instructions are not the whole cost: a request whose data (stack frames, futures, buffers) does
not stay in L1 between requests pays for every miss. The runs use callgrind's cache simulation
(valgrind's model of this machine's caches, fed with every load and store), and the report gives
the L1 misses per request and the functions that have them. Those counts are repeatable for one
binary, but move by a few tens with code layout alone. They found that each request's polls
passed through 46 KiB of stack frames (the accept path's, sized by its rare branches): 525 L1
data misses per request against hyper's 30, since cut to ~240.

`--proxy nginx|haproxy` measures the bench's baselines the same way (its configuration of them,
one process or thread, in front of the same app, driven by the same client): the ratio of two
instruction counts is the one comparison here that no other load on the machine moves.

Two counts callgrind can't give come from the proxy run natively with `perf probe` on the
functions concerned (Pylon and the floors only): allocations per request by the code that asked,
and memcpy's calls by size and by the code that moved the value (a value over 128 bytes moved by
value is a call: responses and requests moved from stage to stage were ~70 calls and 16 KiB per
HTTP/1.1 request, 14% of the instructions).

Writes a Markdown report (per-request instructions, the top functions by own and inclusive
cost, the callers of memcpy, memcpy by size and allocations) to `--out`.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
# The release pylon-proxy as the image ships it (scripts/build-release-proxy sets it in main).
PYLON = os.path.join(RELEASE, "pylon-proxy")
# The floor's binary: the workspace's ordinary release build, or (`--proxy-binary` with a floor)
# another, such as scripts/build-release-floor's profile-guided one.
FLOOR = os.path.join(RELEASE, "pylon-floor")
WARM = 200  # requests of the short run
ALLOC_REQUESTS = 300  # requests whose allocations' stacks perf records (16 KiB of stack each)
PROXY_TEXT = {"pylon": "`pylon-proxy --threads 1`",
              "pylon-outbound": "`pylon-proxy --threads 1` as the client's outbound hop (the bench's"
                                " Service and EndpointSlice in its config dir, the app the endpoint)",
              "floor": "`pylon-floor` (hyper's server and client and nothing else: the floor under"
                       " Pylon's own stages)",
              "floor-h2": "`pylon-floor --h2-client h2` (as floor, h2 requests sent with the h2"
                          " crate's client from the request's task)",
              "floor-h2s": "`pylon-floor --h2-client h2 --h2-server h2` (as floor-h2, h2 served"
                           " by the h2 crate, streams polled in their connection's task)",
              "floor-h1i": "`pylon-floor --h1-client inline` (as floor, each upstream HTTP/1"
                           " connection polled by the task using it, none spawned)",
              "floor-h1n": "`pylon-floor --h1-server narrow --h1-client narrow` (no hyper on"
                           " HTTP/1.1: heads parsed with httparse into http types and written"
                           " back, Content-Length bodies only; what a narrower path for the"
                           " common case costs)",
              "floor-h1ns": "`pylon-floor --h1-server narrow` (as floor-h1n on the downstream"
                            " side, hyper's client upstream)",
              "floor-h1nc": "`pylon-floor --h1-client narrow` (hyper's server, as floor-h1n on"
                            " the upstream side)",
              "floor-h1u": "`pylon-floor --h1-client ureq` (as floor-h1nc, the client's HTTP/1.1"
                           " done by the ureq-proto crate)",
              "nginx": "nginx (one process, the bench's configuration)",
              "haproxy": "HAProxy (one thread, the bench's configuration)"}
# Our own binaries (jemalloc, SIGINT to stop); the rest are the baselines.
OWN = ("pylon", "pylon-outbound", "floor", "floor-h2", "floor-h2s", "floor-h1i", "floor-h1n",
       "floor-h1ns", "floor-h1nc", "floor-h1u")
WORKLOADS = {"http1-get": "HTTP/1.1 GET", "http1-post64k": "HTTP/1.1 POST 64 KiB",
             "h2c-get": "h2c GET", "grpc-unary": "gRPC unary",
             "http1-get-headers": "HTTP/1.1 GET with 10 response headers"}
# The report's file name for each workload but the default one.
REPORT_SUFFIX = {"http1-post64k": "post", "h2c-get": "h2c", "grpc-unary": "grpc",
                 "http1-get-headers": "headers"}


def over_h2(workload):
    return not workload.startswith("http1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(admin, deadline_s=60):
    end = time.time() + deadline_s
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"profile: the proxy was not ready within {deadline_s} s")


def send(port, n, workload, concurrency, authority, wrap=()):
    subprocess.run([*wrap, os.path.join(RELEASE, "pylon-bench"), "send", "--workload", workload,
                    "--to", f"127.0.0.1:{port}", "--requests", str(n),
                    "--concurrency", str(concurrency), "--authority", authority],
                   check=True, timeout=600)


def start_app(wrap=()):
    """The bench's app (HTTP/1.1, h2c and a TCP echo) on free ports, under `wrap`: the process
    and its HTTP port."""
    app_port, echo_port = free_port(), free_port()
    app = subprocess.Popen([*wrap, os.path.join(RELEASE, "pylon-bench"), "app",
                            "--http", f"127.0.0.1:{app_port}", "--echo", f"127.0.0.1:{echo_port}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return app, app_port


def wait_listening(port, deadline_s=60):
    end = time.time() + deadline_s
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"profile: nothing listened on port {port} within {deadline_s} s")


def nginx_conf(work, listen, listen_h2, app_port):
    """The bench's nginx (benches/src/chain.rs render_nginx), one process, in the foreground."""
    return f"""worker_processes 1;
daemon off;
master_process off;
pid {work}/nginx.pid;
error_log {work}/nginx.error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    proxy_request_buffering off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    upstream next {{ server 127.0.0.1:{app_port}; keepalive 256; keepalive_requests 10000000; }}
    server {{ listen 127.0.0.1:{listen}; location / {{ proxy_pass http://next; }} }}
    server {{
        listen 127.0.0.1:{listen_h2} http2;
        location / {{ proxy_pass http://next; }}
        location /bench.Bench/ {{ grpc_pass grpc://next; }}
    }}
}}
"""


def haproxy_conf(listen, listen_h2, app_port):
    """The bench's HAProxy (benches/src/chain.rs render_haproxy), one thread."""
    return f"""global
    nbthread 1
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend h1
    bind 127.0.0.1:{listen}
    default_backend next_h1
frontend h2
    bind 127.0.0.1:{listen_h2} proto h2
    default_backend next_h2
backend next_h1
    http-reuse always
    server next 127.0.0.1:{app_port}
backend next_h2
    http-reuse always
    server next 127.0.0.1:{app_port} proto h2
"""


def proxy_cmd(proxy_kind, ports, app_port, workload, work):
    """The hop's command line, and the port the workload's client sends to."""
    listen = ports["inbound"]
    if proxy_kind.startswith("pylon"):
        cmd = [
            PYLON, "--threads", "1",
            "--inbound-addr", f"127.0.0.1:{ports['inbound']}",
            "--outbound-addr", f"127.0.0.1:{ports['outbound']}",
            "--admin-addr", f"127.0.0.1:{ports['admin']}",
            "--tap-addr", f"127.0.0.1:{ports['tap']}",
        ]
        if proxy_kind == "pylon":
            cmd += ["--inbound-forward", f"127.0.0.1:{app_port}"]
        else:
            mesh = os.path.join(work, "mesh")
            os.makedirs(mesh, exist_ok=True)
            with open(os.path.join(mesh, "bench.yaml"), "w") as f:
                f.write(mesh_yaml(app_port))
            cmd += ["--config-dir", mesh]
            listen = ports["outbound"]
    elif proxy_kind.startswith("floor"):
        if over_h2(workload):
            listen = ports["inbound_h2"]
        cmd = [FLOOR, "--listen", f"127.0.0.1:{ports['inbound']}",
               "--listen-h2", f"127.0.0.1:{ports['inbound_h2']}", "--to", f"127.0.0.1:{app_port}",
               "--h2-client", "h2" if proxy_kind in ("floor-h2", "floor-h2s") else "hyper",
               "--h2-server", "h2" if proxy_kind == "floor-h2s" else "hyper",
               "--h1-client", {"floor-h1i": "inline", "floor-h1n": "narrow",
                               "floor-h1nc": "narrow", "floor-h1u": "ureq"}.get(proxy_kind, "task"),
               "--h1-server", "narrow" if proxy_kind in ("floor-h1n", "floor-h1ns") else "hyper"]
    else:
        # nginx and HAProxy take h2c on a port of its own (prior knowledge), HTTP/1.1 on another.
        if over_h2(workload):
            listen = ports["inbound_h2"]
        conf = os.path.join(work, f"{proxy_kind}.conf")
        with open(conf, "w") as f:
            if proxy_kind == "nginx":
                f.write(nginx_conf(work, ports["inbound"], ports["inbound_h2"], app_port))
            else:
                f.write(haproxy_conf(ports["inbound"], ports["inbound_h2"], app_port))
        cmd = ["nginx", "-c", conf] if proxy_kind == "nginx" else ["haproxy", "-db", "-f", conf]
    return cmd, listen


AUTHORITY = "bench.default.svc.cluster.local"


def mesh_yaml(app_port):
    """The bench's Service (benches/src/chain.rs render_pylon_mesh), its endpoint the app."""
    return f"""apiVersion: v1
kind: Service
metadata:
  name: bench
  namespace: default
spec:
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: http
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels:
    kubernetes.io/service-name: bench
addressType: IPv4
ports:
- name: http
  port: {app_port}
  protocol: TCP
endpoints:
- addresses:
  - "127.0.0.1"
  conditions:
    ready: true
"""


def run(requests, app_port, workload, concurrency, proxy_kind, work, wrap=(), measured=None,
        client_wrap=()):
    """One run of `proxy_kind` as the hop in front of the app, under `wrap` (callgrind): sends
    `requests`; with `measured` (requests, start, stop), that many more between start() and
    stop(). The client runs under `client_wrap` (`benches/hop_cpu.py` pins it)."""
    ports = {k: free_port() for k in ("inbound", "inbound_h2", "outbound", "admin", "tap")}
    env = dict(os.environ, PYLON_LOG="warn")
    cmd, listen = proxy_cmd(proxy_kind, ports, app_port, workload, work)
    proxy = subprocess.Popen(list(wrap) + cmd, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if proxy_kind.startswith("pylon"):
            wait_ready(ports["admin"])
        else:
            wait_listening(listen)
        # The outbound hop resolves the name through the Service in its config dir.
        authority = AUTHORITY if proxy_kind == "pylon-outbound" else "app"
        send(listen, requests, workload, concurrency, authority, client_wrap)
        if measured:
            n, start, stop = measured
            start(proxy.pid)
            try:
                send(listen, n, workload, concurrency, authority, client_wrap)
            finally:
                stop()
    finally:
        # Pylon and the floor stop on SIGINT (Pylon drains); nginx (no master) and HAProxy on
        # SIGTERM.
        proxy.send_signal(signal.SIGINT if proxy_kind in OWN else signal.SIGTERM)
        try:
            proxy.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


# jemalloc's entry points, probed by `perf probe` for the allocations' callers.
PERF_GROUP = "pylonprofile"
JEMALLOC_ENTRIES = ("_rjem_malloc", "_rjem_mallocx", "_rjem_calloc", "_rjem_realloc",
                    "_rjem_rallocx")
# Frames of the allocator and of the collections and smart pointers that call it: the first
# frame past them is the code that wanted the memory.
ALLOC_PLUMBING = re.compile(
    r"(alloc::|__rust_alloc|_rjem_|imalloc|jemalloc|RawVec|raw_vec|Box<.*>::new|Arc<.*>::new|"
    r"::with_capacity|::reserve|::grow|exchange_malloc|Vec<.*>::push|hashbrown|<Global>|"
    r"::from_iter|::spec_|to_vec|Allocator|RawTable|HashMap<.*>::insert|HashMap<.*>::entry|"
    r"FnOnce::call_once|Option<T>::get_or_insert_with|slab::|Slab<|bytes::bytes_mut|BytesMut|"
    r"Bytes::copy_from_slice|try_reserve)")


def own_binary(proxy_kind):
    """The binary a run of one of Pylon's own hops (`OWN`) starts: the proxy's or the floor's."""
    return PYLON if proxy_kind.startswith("pylon") else FLOOR


def perf_samples(app_port, workload, concurrency, proxy_kind, work, requests, probes):
    """Every call of the functions `probes` names ({probe name: `perf probe` spec}) in the
    proxy, over `requests` requests after a warm-up: the proxy runs natively with uprobes on
    them, and `perf record` takes each call's stack (DWARF unwinding). Returns [(the probe's
    line, with any arguments it fetched; the stack's frames, innermost first)], or a reason
    it could not."""
    if proxy_kind not in OWN:
        return "the baselines use the C library's, not probed here"
    if not shutil.which("perf"):
        return "perf is missing (apt-get install linux-perf)"
    if os.geteuid() != 0:
        return "perf probe needs root"
    binary = own_binary(proxy_kind)
    subprocess.run(["perf", "probe", "-q", "-d", f"{PERF_GROUP}:*"], capture_output=True)
    probed = [name for name, spec in probes.items()
              if subprocess.run(["perf", "probe", "-q", "-x", binary, "-a",
                                 f"{PERF_GROUP}:{name}={spec}"],
                                capture_output=True).returncode == 0]
    if not probed:
        return f"perf probe could not place a probe on {', '.join(probes.values())}"
    data = os.path.join(work, "probes.data")
    recorder = {}

    def start(pid):
        recorder["p"] = subprocess.Popen(
            ["perf", "record", "-q", "-e", f"{PERF_GROUP}:*", "--call-graph", "dwarf,16384",
             "-p", str(pid), "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)  # attached before the first measured request

    def stop():
        time.sleep(0.5)
        recorder["p"].send_signal(signal.SIGINT)
        recorder["p"].wait(timeout=120)

    try:
        run(WARM, app_port, workload, concurrency, proxy_kind, work,
            measured=(requests, start, stop))
        script = subprocess.run(["perf", "script", "-F", "event,trace,ip,sym", "-i", data],
                                capture_output=True, text=True).stdout
    finally:
        subprocess.run(["perf", "probe", "-q", "-d", f"{PERF_GROUP}:*"], capture_output=True)
    samples = []
    for sample in script.split("\n\n"):
        lines = [line.strip() for line in sample.strip().splitlines() if line.strip()]
        if len(lines) > 1:
            frames = [re.sub(r"^[0-9a-f]+ ", "", f) for f in lines[1:]]
            samples.append((lines[0], [re.sub(r" \(inlined\)$", "", f) for f in frames]))
    return samples


def perf_allocations(app_port, workload, concurrency, proxy_kind, work, requests):
    """Allocations per request by the code that asked for them: `perf_samples` of jemalloc's
    entry points, each allocation put to the first frame past the allocator and the
    collections. Callgrind can't do this: under fat LTO the allocator is entered by a tail call
    it does not record as a call. Returns (total per request, [(per request, caller)]), or a
    reason it could not."""
    samples = perf_samples(app_port, workload, concurrency, proxy_kind, work, requests,
                           {f.lstrip("_"): f for f in JEMALLOC_ENTRIES})
    if isinstance(samples, str):
        return samples
    by_caller = {}
    for _, frames in samples:
        caller = next((f for f in frames if not ALLOC_PLUMBING.search(f)), "?")
        by_caller[caller] = by_caller.get(caller, 0) + 1
    rows = sorted(((n / requests, c) for c, n in by_caller.items()), reverse=True)
    return len(samples) / requests, [r for r in rows if r[0] >= 0.05]


# Frames of a copy itself: the first frame past them is the code that moved the value.
MEMCPY_PLUMBING = re.compile(
    r"(__memcpy|__memmove|core::ptr::|core::intrinsics|copy_nonoverlapping|mem::replace|"
    r"mem::take|mem::swap)")


def memcpy_variants(binary):
    """The C library's memcpy variants linked into `binary`, one name per address (memmove's
    share them). The C library picks one by the CPU when the process starts: under callgrind
    the one for valgrind's model of the CPU (AVX2 here), natively another (AVX-512 here), so
    all of them are probed."""
    nm = subprocess.run(["nm", binary], capture_output=True, text=True).stdout
    by_address = {}
    for line in nm.splitlines():
        fields = line.split()
        if len(fields) == 3 and re.fullmatch(r"__memcpy_\w+_unaligned(_erms)?(_rtm)?", fields[2]):
            by_address.setdefault(fields[0], fields[2])
    return sorted(by_address.values())


def perf_memcpy(app_port, workload, concurrency, proxy_kind, work, requests):
    """memcpy's calls per request by size and by the code that moved the value: `perf_samples`
    of every variant of the C library's memcpy with its length argument. Returns (calls, bytes
    per request, [(calls per request, size, caller)]), or a reason it could not."""
    probes = {}
    if proxy_kind in OWN:  # perf_samples says why a baseline isn't probed
        variants = memcpy_variants(own_binary(proxy_kind))
        if not variants:
            return "no memcpy variant in the binary's symbols"
        probes = {f"memcpy{i}": f"{v} len=%dx:u64" for i, v in enumerate(variants)}
    samples = perf_samples(app_port, workload, concurrency, proxy_kind, work, requests, probes)
    if isinstance(samples, str):
        return samples
    by_site, copied = {}, 0
    for line, frames in samples:
        m = re.search(r"len=(\d+)", line)
        if not m:
            continue
        size = int(m.group(1))
        copied += size
        caller = next((f for f in frames if not MEMCPY_PLUMBING.search(f)), "?")
        by_site[(size, caller)] = by_site.get((size, caller), 0) + 1
    rows = sorted(((n / requests, size, c) for (size, c), n in by_site.items()), reverse=True)
    return len(samples) / requests, copied / requests, [r for r in rows if r[0] >= 0.5]


def costs(path, inclusive, event="Ir"):
    """function -> its count of `event` (instructions unless told), from callgrind_annotate."""
    args = ["callgrind_annotate", f"--show={event}", f"--sort={event}", "--threshold=100",
            "--auto=no"]
    if inclusive:
        args.append("--inclusive=yes")
    text = subprocess.run(args + [path], capture_output=True, text=True, check=True).stdout
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(.*)$", line)
        if m and "PROGRAM TOTALS" not in line:
            name = re.sub(r"\s*\[[^\]]*\]$", "", m.group(2))
            out[name] = out.get(name, 0) + int(m.group(1).replace(",", ""))
    return out


def l1_data_misses(path):
    """function -> its own L1 data misses (on reads and on writes), from callgrind_annotate."""
    out = costs(path, False, "D1mr")
    for name, misses in costs(path, False, "D1mw").items():
        out[name] = out.get(name, 0) + misses
    return out


def totals(path):
    """event -> the run's total (Ir, and with the cache simulation D1mr, D1mw, I1mr, ...)."""
    events = []
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
            if line.startswith("totals:"):
                return dict(zip(events, (int(v) for v in line.split()[1:])))
    sys.exit(f"profile: no totals in {path}")


def callers(path, matches):
    """caller -> (instructions spent in the functions `matches` accepts, calls), summed over
    every entry callgrind lists for them (inlining splits a function over several), from the
    caller tree. Calls between the matched functions themselves are left out."""
    text = subprocess.run(
        ["callgrind_annotate", "--show=Ir", "--tree=caller", "--threshold=100", "--auto=no",
         path],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    out = {}
    for i, line in enumerate(text):
        m = re.match(r"\s*[\d,]+ \([^)]*\)\s+\*\s+(.*?)(\s+\[[^\]]*\])?$", line)
        if not (m and matches(m.group(1))):
            continue
        j = i - 1
        while j >= 0 and "<" in text[j]:
            m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+<\s+(.*?)\s*\(([\d,]+)x\)", text[j])
            if m:
                cost, calls = (int(g.replace(",", "")) for g in (m.group(1), m.group(3)))
                name = re.sub(r"\s*\[[^\]]*\]$", "", m.group(2))
                if not matches(name):
                    had = out.get(name, (0, 0))
                    out[name] = (had[0] + cost, had[1] + calls)
            j -= 1
    return out


def is_memcpy(name):
    return "__memcpy" in name


# The allocators' entry points: jemalloc's (Pylon) and the C library's (nginx, HAProxy).
ALLOC_ENTRIES = ("_rjem_malloc", "_rjem_mallocx", "_rjem_calloc", "_rjem_rallocx",
                 "_rjem_realloc", "malloc", "calloc", "realloc")


def is_alloc(name):
    return any(name.endswith(":" + f) for f in ALLOC_ENTRIES) and "jemalloc_internal" not in name \
        and "cache_bin.h" not in name and "sz.h" not in name


def caller_shares(short_run, long_run, matches, requests, field):
    """Each caller's share of the matched functions per request (field 0: instructions, 1:
    calls)."""
    s, l = callers(short_run, matches), callers(long_run, matches)
    rows = [((v[field] - s.get(k, (0, 0))[field]) / requests, k) for k, v in l.items()]
    return sorted((r for r in rows if r[0] > 0.01), reverse=True)


def short(name, width=110):
    name = re.sub(r"/root/\.cargo/registry/src/[^/]+/", "", name)
    name = re.sub(r"/rustc/[0-9a-f]+/library/", "std:", name)
    name = name.replace(ROOT + "/", "")
    return name if len(name) <= width else name[: width - 1] + "…"


def build_text(a):
    """Which build of Pylon (or of the floor) was measured."""
    if a.proxy_binary and a.proxy in OWN:
        # The build scripts write how they built a binary beside it.
        try:
            with open(a.proxy_binary + ".build") as f:
                how = f.read().strip()
        except OSError:
            how = "the one given"
        return f"build: {how} (`--proxy-binary {a.proxy_binary}`)"
    if a.proxy not in ("pylon", "pylon-outbound"):
        return "build: " + ("an ordinary release build" if a.proxy in OWN
                            else "the Debian package")
    if os.environ.get("PYLON_PGO") == "off":
        return "build: not profile-guided (`scripts/build-release-proxy` with `PYLON_PGO=off`)"
    # benches/src/profiles.rs reads this line back ("- build: profile-guided").
    return ("build: profile-guided, as the image ships it (`scripts/build-release-proxy`, its"
            " counts from `pylon-bench train`)")


def in_flight(a):
    """How the report's requests were sent, as its first line says it."""
    if a.concurrency == 1:
        return "1 at a time on one connection"
    if a.workload in ("h2c-get", "grpc-unary"):
        return f"{a.concurrency} at a time, streams of one connection"
    return f"{a.concurrency} at a time, on as many connections"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="http1-get", choices=sorted(WORKLOADS))
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--out", help="the report (default: benches/results/profile[-PROXY]"
                    "[-WORKLOAD][-cN]-latest.md, PROXY when not pylon, WORKLOAD when not http1-get,"
                    " N the concurrency when not 1)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--proxy", default="pylon",
                    choices=[*OWN, "nginx", "haproxy"],
                    help="the hop to profile: Pylon, a baseline measured the same way, or the"
                    " floor under Pylon (benches/src/floor.rs)")
    ap.add_argument("--proxy-binary", metavar="PATH",
                    help="profile this build of pylon-proxy (or, with a floor, of pylon-floor)"
                    " rather than building one from the working tree (another build's before ->"
                    " after)")
    ap.add_argument("--keep", metavar="DIR",
                    help="keep the two callgrind outputs in DIR (for callgrind_annotate)")
    a = ap.parse_args()
    if a.out is None:
        name = "profile"
        if a.proxy != "pylon":
            name += f"-{a.proxy}"
        if a.workload in REPORT_SUFFIX:
            name += "-" + REPORT_SUFFIX[a.workload]
        if a.concurrency != 1:
            name += f"-c{a.concurrency}"
        a.out = os.path.join(ROOT, "benches", "results", f"{name}-latest.md")
    for tool in ("valgrind", "callgrind_annotate"):
        if not shutil.which(tool):
            sys.exit(f"profile: {tool} is missing (apt-get install valgrind)")
    subprocess.run(["cargo", "build", "--release", "-p", "pylon-bench"],
                   cwd=ROOT, check=True, stdout=sys.stderr)
    global PYLON, FLOOR
    if a.proxy.startswith("floor"):
        FLOOR = a.proxy_binary or FLOOR
    elif a.proxy.startswith("pylon"):
        PYLON = a.proxy_binary or subprocess.run(
            [os.path.join(ROOT, "scripts", "build-release-proxy")], cwd=ROOT, check=True,
            stdout=subprocess.PIPE, text=True).stdout.strip()
    app, app_port = start_app()
    work = tempfile.mkdtemp(prefix="pylon-profile-")
    try:
        time.sleep(0.5)
        short_run, long_run = os.path.join(work, "short.out"), os.path.join(work, "long.out")
        for path, n in ((short_run, WARM), (long_run, WARM + a.requests)):
            # The cache simulation: valgrind's model of this machine's caches (L1 32 KiB, 8-way
            # here), fed with the proxy's every load and store.
            valgrind = ["valgrind", "--tool=callgrind", "--cache-sim=yes",
                        f"--callgrind-out-file={path}"]
            run(n, app_port, a.workload, a.concurrency, a.proxy, work, wrap=valgrind)
        short_totals, long_totals = totals(short_run), totals(long_run)
        per = {e: (long_totals[e] - short_totals.get(e, 0)) / a.requests for e in long_totals}
        per_request = per["Ir"]

        def per_req(cost_of):
            """function -> its cost per request (`cost_of` a run), most first."""
            s, l = cost_of(short_run), cost_of(long_run)
            rows = [(name, (cost - s.get(name, 0)) / a.requests) for name, cost in l.items()]
            return sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])

        own = per_req(lambda run_file: costs(run_file, False))
        incl = per_req(lambda run_file: costs(run_file, True))
        d1_own = per_req(l1_data_misses)
        memcpy = caller_shares(short_run, long_run, is_memcpy, a.requests, 0)
        allocs = caller_shares(short_run, long_run, is_alloc, a.requests, 1)
        git = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
        # Code changed since that commit (anything but the results) makes it a different build.
        changed = subprocess.run(["git", "status", "--porcelain", "--", ".",
                                  ":!benches/results"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip()
        if changed:
            git += "+changes"
        lines = [
            f"# Instructions per request, one {a.proxy} hop, {WORKLOADS[a.workload]} (callgrind)",
            "",
            f"- git {git}, {a.requests} requests ({a.workload}), {in_flight(a)}"
            f" (less a {WARM}-request run: start-up and shutdown cancel out)",
            "- `benches/profile.py` (see its doc for why instructions and how); user-space"
            f" instructions of {PROXY_TEXT[a.proxy]}, nothing of the kernel's",
            f"- {build_text(a)}",
            "",
            f"**{per_request:,.0f} instructions per request.**",
            "",
            "Simulated L1 misses per request (callgrind's cache simulation): "
            f"**{per['D1mr'] + per['D1mw']:,.0f} data** ({per['D1mr']:,.0f} on reads,"
            f" {per['D1mw']:,.0f} on writes), {per['I1mr']:,.0f} instruction."
            " A request whose data doesn't stay in L1 between requests pays for each miss"
            " (about 12 cycles to L2); the counts move by a few tens with code layout alone.",
            "",
            "## Own cost per request (top functions)",
            "",
            "| instructions | share | function |",
            "|---:|---:|---|",
        ]
        lines += [f"| {c:,.0f} | {c / per_request:.1%} | `{short(n)}` |" for n, c in own[: a.top]]
        lines += ["", "## Inclusive cost per request (with what they call)", "",
                  "| instructions | share | function |", "|---:|---:|---|"]
        lines += [f"| {c:,.0f} | {min(c / per_request, 1):.1%} | `{short(n)}` |"
                  for n, c in incl if c < per_request * 1.01][: a.top]
        if a.proxy.startswith("pylon"):
            lines += ["", "## Pylon's own stages, inclusive (what each call costs with what it calls)",
                      "", "| instructions | share | function |", "|---:|---:|---|"]
            lines += [f"| {c:,.0f} | {min(c / per_request, 1):.1%} | `{short(n)}` |"
                      for n, c in incl if "pylon_proxy::" in n and "serve_" not in n
                      and "app::main" not in n and "main_with_args" not in n
                      and "pylon_proxy::main" not in n][: a.top]
        lines += ["", "## Where L1 data misses happen (own, per request)", "",
                  "| misses | function |", "|---:|---|"]
        lines += [f"| {c:,.1f} | `{short(n)}` |" for n, c in d1_own[:12] if c >= 0.5]
        lines += ["", "## Who calls memcpy (instructions per request)", "",
                  "| instructions | caller |", "|---:|---|"]
        lines += [f"| {c:,.0f} | `{short(n)}` |" for c, n in memcpy[:12]]
        n = min(a.requests, ALLOC_REQUESTS)
        found = perf_memcpy(app_port, a.workload, a.concurrency, a.proxy, work, n)
        if isinstance(found, str):
            lines += ["", f"## memcpy by size: not probed ({found})"]
        else:
            calls, copied, rows = found
            lines += ["", f"## memcpy by size: {calls:.1f} calls and {copied:,.0f} bytes per"
                      " request", "",
                      "`perf probe` on every variant of the C library's memcpy with its length"
                      f" (the one run natively is not the one callgrind sees), {n} requests after a"
                      " warm-up, each call put to the first frame past the copy: the code that"
                      " moved the value. The compiler copies a value of up to 128 bytes inline"
                      " and calls memcpy for a larger one: a response or a request moved by"
                      " value from one stage to the next is a call each time.", "",
                      "| calls | bytes | caller |", "|---:|---:|---|"]
            lines += [f"| {c:.2f} | {size} | `{short(name)}` |" for c, size, name in rows[:25]]
        if allocs:
            lines += ["", f"## Allocations per request: {sum(c for c, _ in allocs):.1f}", "",
                      "| allocations | caller |", "|---:|---|"]
            lines += [f"| {c:.1f} | `{short(n)}` |" for c, n in allocs]
        else:
            # Built with fat LTO, the global allocator's shim is inlined and jumps to jemalloc
            # (a tail call): callgrind records no call edge. perf's uprobes see every call.
            n = min(a.requests, ALLOC_REQUESTS)
            found = perf_allocations(app_port, a.workload, a.concurrency, a.proxy, work, n)
            if isinstance(found, str):
                lines += ["", f"## Allocations per request: not attributed ({found})"]
            else:
                total_allocs, rows = found
                lines += ["", f"## Allocations per request: {total_allocs:.1f}", "",
                          f"`perf probe` on jemalloc's entry points, {n} requests after a"
                          " warm-up, each allocation put to the first frame past the allocator"
                          " and the collections (the code that asked for the memory).", "",
                          "| allocations | caller |", "|---:|---|"]
                lines += [f"| {c:.2f} | `{short(name)}` |" for c, name in rows]
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{per_request:,.0f} instructions per request; report in {a.out}")
    finally:
        app.kill()
        app.wait()
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
            for run_name in ("short.out", "long.out"):
                if os.path.exists(os.path.join(work, run_name)):
                    shutil.copy(os.path.join(work, run_name), a.keep)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
