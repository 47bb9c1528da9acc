"""`cxrfm bench serve`: the serving application under a bounded HTTP load on loopback.

1. Batching: one TextGenerator replica, the same deployment measured with continuous batching
   (iteration-level, at most N sequences per decode step), with request-level `@serve.batch`
   (max_batch_size N, the previous mode) and with max_batch_size=1 (the baseline), switched live through
   the deployment's reconfigure (`--unbatched-continuous` adds continuous batching held to one sequence:
   the decode loop's own speed, so the table splits the gain into batching and the loop). On a shared machine the load of other work drifts within seconds, so each
   level runs in rounds that cycle through the modes, and every mode's numbers are pooled over the
   rounds. A round of one mode: closed-loop clients for a warm-up (not counted: the switch, ramp-up), then
   a measured window, then the clients stop (the drain is not counted). requests/s = answers completed in
   the windows / their length (steady state); p50/p95/p99 over those answers; the mean batch the
   deployment actually ran (continuous: sequences per decode step); errors.
2. Autoscaling: the TextGenerator with min 1 / max N replicas under a load phase, then idle; prints
   the replica count over time (it should rise under load and fall back after it).

Requests carry synthetic phantom studies (`--images phantom`, a pool of different frontal films cycled
through, so answers differ in length as real reports do) or one noise image (`--images noise`). Without
--export, an untrained tiny model is built: generation cost is real, the text is noise and every answer runs
to max_new_tokens. With a trained export, answers end at EOS: the table's tokens/answer says how long they
were.

Everything runs on a private local Ray instance (`address="local"`) bound to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from cxrfm.serving.cli import bind_ray_to_loopback, build_untrained_export
from cxrfm.serving.tenants import Tenant, add_tenant

APP = "cxrfm-bench"


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--export", help="model export directory (default: an untrained tiny model, built once)")
    p.add_argument("--levels", default="1,4,16", help="client concurrency levels")
    p.add_argument("--rounds", type=int, default=3, help="rounds per level, each cycling through the modes")
    p.add_argument("--window-s", type=float, default=8.0, help="measured seconds per round and mode")
    p.add_argument("--warmup-s", type=float, default=2.0, help="uncounted seconds before each window")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--unbatched-continuous", action="store_true",
                   help="a fourth mode, continuous batching with max 1 sequence: the decode loop's own speed, "
                        "without batching (how much of the gain is batching)")
    p.add_argument("--batch-wait-s", type=float, default=0.05)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--images", choices=("phantom", "noise"), default="phantom",
                   help="request images: a pool of synthetic phantom studies, or one noise image")
    p.add_argument("--replica-cpus", type=float, default=0.5, help="num_cpus of a TextGenerator replica")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="num_gpus of a TextGenerator replica (0: none)")
    p.add_argument("--device", default="auto", help="app arg device of the replicas: auto, cpu, cuda")
    p.add_argument("--autoscale-max", type=int, default=3, help="max replicas in the autoscaling run (0: skip it)")
    p.add_argument("--autoscale-concurrency", type=int, default=12)
    p.add_argument("--autoscale-load-s", type=float, default=60.0)
    p.add_argument("--autoscale-idle-s", type=float, default=60.0, help="watch this long after the load stops")
    return p


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def load(url: str, key: str, body: dict, concurrency: int, total: int | None, seconds: float) -> dict:
    """`concurrency` clients, each sending its next request when the last one is answered, until `total`
    requests were sent or `seconds` passed."""
    import aiohttp

    latencies, statuses, sent, start = [], {}, 0, time.perf_counter()

    async def client(session):
        nonlocal sent
        while (total is None or sent < total) and time.perf_counter() - start < seconds:
            sent += 1
            t0 = time.perf_counter()
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 200:
                    latencies.append(time.perf_counter() - t0)

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"ok": len(latencies), "errors": sum(v for k, v in statuses.items() if k != 200), "wall": wall,
            "rps": len(latencies) / wall, "p50": _percentile(latencies, 50) * 1e3,
            "p95": _percentile(latencies, 95) * 1e3, "p99": _percentile(latencies, 99) * 1e3}


async def steady_load(url: str, key: str, bodies: list[dict], concurrency: int, warmup_s: float,
                      window_s: float) -> dict:
    """`concurrency` closed-loop clients for warmup_s + window_s, each cycling through `bodies` from its own
    offset; counts the answers that complete inside the window (after the warm-up, before the clients stop),
    so ramp-up and drain are not in the numbers."""
    import aiohttp

    latencies, tokens, statuses, start = [], [], {}, time.perf_counter()
    begin, end = start + warmup_s, start + warmup_s + window_s

    async def client(session, offset: int):
        n = offset
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            n += 1
            async with session.post(url, json=bodies[n % len(bodies)],
                                    headers={"Authorization": f"Bearer {key}"}) as r:
                payload = await r.read()
                t1 = time.perf_counter()
                if begin <= t1 <= end:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 200:
                        latencies.append(t1 - t0)
                        tokens.append(json.loads(payload).get("tokens", 0))

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session, i * len(bodies) // concurrency) for i in range(concurrency)))
    return {"latencies": latencies, "tokens": tokens, "errors": sum(v for k, v in statuses.items() if k != 200), "wall": window_s}


def _summary(parts: list[dict]) -> dict:
    latencies = [x for p in parts for x in p["latencies"]]
    tokens = [x for p in parts for x in p["tokens"]]
    wall = sum(p["wall"] for p in parts)
    return {"tokens": sum(tokens) / max(1, len(tokens)), "ok": len(latencies), "errors": sum(p["errors"] for p in parts), "wall": wall, "rps": len(latencies) / wall,
            "p50": _percentile(latencies, 50) * 1e3, "p95": _percentile(latencies, 95) * 1e3,
            "p99": _percentile(latencies, 99) * 1e3}


def _png_b64(image) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _body(max_new_tokens: int) -> dict:
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)
    return {"images": {"frontal": _png_b64(noise)}, "indication": "cough", "max_new_tokens": max_new_tokens}


def _bodies(args) -> list[dict]:
    """The requests the clients cycle through: one noise image, or 48 phantom studies' frontal films."""
    if args.images == "noise":
        return [_body(args.max_new_tokens)]
    from cxrfm.data.synthetic import generate_studies

    return [{"images": {"frontal": _png_b64(images["frontal"])}, "indication": "cough",
             "max_new_tokens": args.max_new_tokens}
            for _, images in generate_studies(num_studies=48, image_size=256, seed=1)]


def _deploy(args, export: str, store: str, autoscaling: dict | None) -> None:
    from ray import serve

    from cxrfm.serving.app import build_app  # Ray Serve, like the other ray imports here: only when run

    actor = {"num_cpus": args.replica_cpus, **({"num_gpus": args.replica_gpus} if args.replica_gpus else {})}
    report = {"ray_actor_options": actor, "max_ongoing_requests": 64, "max_queued_requests": 512,
              "user_config": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s}}
    report.update({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": 1, "autoscaling_config": None})
    small = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.1}}
    options = {"Ingress": {**small, "max_ongoing_requests": 512, "max_queued_requests": 1024}, "TextGenerator": report}
    serve.run(build_app({"tenants": store, "models": {"base": export}, "tasks": ["report"], "device": args.device,
                         "deployment_options": options}),
              name=APP, route_prefix="/")


def batching_table(args, url: str, key: str) -> list[dict]:
    from ray import serve

    handle = serve.get_deployment_handle("TextGenerator", APP)
    bodies, rows = _bodies(args), []
    asyncio.run(load(url, key, bodies[0], 2, 4, 60))  # warm-up: first-call costs out of the table
    modes = ((f"continuous (max {args.max_batch_size})", "continuous", args.max_batch_size),
             (f"@serve.batch (max {args.max_batch_size})", "batch", args.max_batch_size),
             ("max_batch_size=1", "batch", 1))
    if args.unbatched_continuous:
        modes += (("continuous (max 1)", "continuous", 1),)
    for level in [int(x) for x in args.levels.split(",")]:
        parts, sizes = {name: [] for name, _, _ in modes}, {name: [] for name, _, _ in modes}
        for _ in range(args.rounds):
            for name, scheduler, size in modes:
                handle.reconfigure.remote({"max_batch_size": size, "batch_wait_timeout_s": args.batch_wait_s,
                                           "scheduler": scheduler}).result()
                handle.reset_stats.remote().result()  # the warm-up's batches are counted too: a small bias
                parts[name].append(asyncio.run(steady_load(url, key, bodies, level, args.warmup_s, args.window_s)))
                stats = handle.stats.remote().result()
                sizes[name] += stats["step_sizes"] if scheduler == "continuous" else stats["batch_sizes"]
        for name, _, _ in modes:
            res = _summary(parts[name])
            rows.append({"level": level, "mode": name, "batch": sum(sizes[name]) / max(1, len(sizes[name])), **res})
            print(f"  concurrency {level:>3}  {name:<22} {res['rps']:6.2f} req/s  p50 {res['p50']:7.0f} ms  "
                  f"p95 {res['p95']:7.0f} ms  ({res['ok']} answers, {res['tokens']:.1f} tokens each)", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'conc':>4} | {'mode':<22} | {'ok':>4} | {'err':>3} | {'req/s':>6} | {'p50 ms':>7} | {'p95 ms':>7} | "
          f"{'p99 ms':>7} | {'tokens/answer':>13} | {'mean batch':>10} | {'req/s vs max_batch_size=1':>25}")
    print("-" * 138)
    base = {r["level"]: r["rps"] for r in rows if r["mode"] == "max_batch_size=1"}
    for r in rows:
        ratio = r["rps"] / base[r["level"]] if base.get(r["level"]) else float("nan")
        print(f"{r['level']:>4} | {r['mode']:<22} | {r['ok']:>4} | {r['errors']:>3} | {r['rps']:>6.2f} | {r['p50']:>7.0f} | "
              f"{r['p95']:>7.0f} | {r['p99']:>7.0f} | {r['tokens']:>13.1f} | {r['batch']:>10.2f} | {ratio:>24.2f}x")


def replica_count() -> dict[str, int]:
    from ray import serve

    dep = serve.status().applications[APP].deployments["TextGenerator"]
    return {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}


async def _watch(samples: list, stop: asyncio.Event, start: float, phase: list) -> None:
    while not stop.is_set():
        states = await asyncio.to_thread(replica_count)
        samples.append((time.perf_counter() - start, phase[0], states))
        print(f"  t={samples[-1][0]:5.0f}s  {phase[0]:<5} replicas running={states.get('RUNNING', 0)} "
              f"{ {k: v for k, v in states.items() if k != 'RUNNING'} or ''}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), timeout=3)
        except asyncio.TimeoutError:
            pass


async def autoscaling_run(args, url: str, key: str) -> list:
    samples, stop, phase, start = [], asyncio.Event(), ["load"], time.perf_counter()
    watcher = asyncio.create_task(_watch(samples, stop, start, phase))
    res = await load(url, key, _body(args.max_new_tokens), args.autoscale_concurrency, None, args.autoscale_load_s)
    phase[0] = "idle"
    print(f"  load phase: {res['ok']} ok, {res['errors']} errors, {res['rps']:.2f} req/s, p95 {res['p95']:.0f} ms")
    idle_until = time.perf_counter() + args.autoscale_idle_s
    while time.perf_counter() < idle_until:
        await asyncio.sleep(3)
        if samples and samples[-1][1] == "idle" and samples[-1][2].get("RUNNING", 0) <= 1 and len(samples[-1][2]) == 1:
            break  # back at the minimum
    stop.set()
    await watcher
    return samples


def autoscaling_summary(samples: list) -> str:
    """What the controller asked for (replicas in any state but STOPPING) and what ran, and in which phase:
    on a busy machine new replicas can take longer to start than the load lasts."""
    def wanted(states: dict) -> int:
        return sum(v for k, v in states.items() if k != "STOPPING")

    load = [s for s in samples if s[1] == "load"] or samples
    asked = max(wanted(s[2]) for s in load)
    up = next((s for s in samples if wanted(s[2]) > 1), None)
    peak = max(samples, key=lambda s: s[2].get("RUNNING", 0))
    running_load = max(s[2].get("RUNNING", 0) for s in load)
    end = samples[-1][2].get("RUNNING", 0)
    first = f" (first at t={up[0]:.0f}s)" if up else ""
    return (f"replicas: controller asked for {asked} under load{first}; running: {running_load} at most during "
            f"the load, peak {peak[2].get('RUNNING', 0)} at t={peak[0]:.0f}s ({peak[1]}); {end} at the end")


def main(argv: list[str] | None = None) -> int:
    args = add_args(argparse.ArgumentParser(prog="cxrfm bench serve", description=__doc__.split("\n\n")[0])).parse_args(argv)
    import ray
    from ray import serve


    work = Path(tempfile.mkdtemp(prefix="cxrfm-bench-serve-"))
    export = args.export or str(build_untrained_export(Path(tempfile.gettempdir()) / "cxrfm-bench-serve-export"))
    store = str(work / "tenants.yaml")
    key = add_tenant(store, Tenant(name="bench", tasks=["report"], rate_per_s=1e6, burst=10**6, max_concurrency=10**6))
    port = _free_port()
    print(f"machine: {platform.machine()} {os.cpu_count()} CPU cores ({_cpu_name()}); model: {export}")
    print(f"report, max_new_tokens={args.max_new_tokens}, TextGenerator num_cpus={args.replica_cpus}")
    bind_ray_to_loopback()  # Ray replaces a _node_ip_address of 127.0.0.1 by the host's IP
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/v1/report"
        print("\n[1/2] batching: the same deployment with continuous batching, @serve.batch and max_batch_size=1")
        _deploy(args, export, store, None)
        print_table(batching_table(args, url, key))
        if args.autoscale_max > 1:
            print(f"\n[2/2] autoscaling: min 1, max {args.autoscale_max} replicas, target 2 ongoing requests; "
                  f"{args.autoscale_concurrency} clients for {args.autoscale_load_s:.0f} s, then idle")
            serve.delete(APP)
            _deploy(args, export, store, {"min_replicas": 1, "max_replicas": args.autoscale_max,
                                          "target_ongoing_requests": 2, "upscale_delay_s": 3, "downscale_delay_s": 10,
                                          "metrics_interval_s": 1, "look_back_period_s": 3})
            samples = asyncio.run(autoscaling_run(args, url, key))
            print("  " + autoscaling_summary(samples))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
