"""``megatron-tasp`` command line: plan, verify, and the application commands.

Every user error ends with one clear line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from megatron_tasp.schedule import compile_schedule
from megatron_tasp.topology import (
    MAX_WORLD_SIZE,
    RingError,
    Topology,
    TopologyError,
    generic_topology,
    inter_node_arcs,
    list_presets,
    load_topology,
    max_rings,
)


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _topology_for(args: argparse.Namespace) -> Topology:
    if args.topology:
        topo = load_topology(args.topology)
        if args.world_size is not None:
            topo.check_world_size(args.world_size)
        return topo
    if args.world_size is None:
        raise CliError("give --world-size N or --topology FILE")
    if args.world_size < 2:
        raise CliError(f"--world-size must be >= 2 (got {args.world_size}); CP size 1 needs no rings")
    if args.world_size > MAX_WORLD_SIZE:
        raise CliError(f"--world-size must be at most {MAX_WORLD_SIZE} (got {args.world_size})")
    return generic_topology(args.world_size)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print (and optionally draw) the rings and the per-step schedule."""
    topo = _topology_for(args)
    n = topo.world_size
    if args.rank is not None and not 0 <= args.rank < n:
        raise CliError(f"--rank must be in 0..{n - 1} for world size {n}, got {args.rank}")
    rings = topo.rings(args.num_rings)
    sched = compile_schedule(rings)
    k = len(rings)
    if args.draw:
        from megatron_tasp.apps.draw import draw_rings

        draw_rings(rings, args.draw, title=f"{topo.name}: {k} orthogonal rings",
                   gpus_per_node=topo.gpus_per_node if topo.nodes > 1 else None)
    if args.json:
        doc = {"world_size": n, "num_rings": k, "max_rings": topo.max_rings(), "topology": topo.name,
               "nodes": topo.nodes, "gpus_per_node": topo.gpus_per_node, "rings": rings, "verified": True}
        if topo.nodes > 1:
            doc["inter_node_arcs_per_ring"] = [len(inter_node_arcs(r, topo.gpus_per_node)) for r in rings]
        if args.rank is not None:
            doc["schedule"] = sched.table(args.rank)
        print(json.dumps(doc))
        return 0
    print(f"topology {topo.name}: {topo.nodes} node(s) x {topo.gpus_per_node} GPUs, world size {n}")
    print(f"{k} orthogonal directed Hamiltonian ring(s) (maximum {topo.max_rings()}); verified: every rank "
          f"holds each of the {k * n} pieces exactly once over {n} steps")
    for i, r in enumerate(rings):
        extra = ""
        if topo.nodes > 1:
            extra = f"   ({len(inter_node_arcs(r, topo.gpus_per_node))} inter-node hops)"
        print(f"  ring {i}: {' -> '.join(map(str, r))} -> {r[0]}{extra}")
    rank = args.rank or 0
    print(f"\nschedule of rank {rank} (piece = ring:source[case]; sends after computing):")
    print(f"{'step':>4}  {'held pieces':<40} {'send to (ring:peer)':<28} recv from (ring:peer)")
    for row in sched.table(rank):
        held = " ".join(f"{i}:{s}[{c[0]}]" for i, s, c in row["held"])
        snd = " ".join(f"{i}:{p}" for i, p in row["send_to"]) or "-"
        rcv = " ".join(f"{i}:{p}" for i, p in row["recv_from"]) or "-"
        print(f"{row['step']:>4}  {held:<40} {snd:<28} {rcv}")
    if args.draw:
        print(f"\nwrote {args.draw}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Build and verify the maximum decomposition and schedule for every n up to --max-n."""
    from megatron_tasp.topology import hamiltonian_rings

    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        def tqdm(it, **_):
            return it
    if not 2 <= args.max_n <= MAX_WORLD_SIZE:
        raise CliError(f"--max-n must be in 2..{MAX_WORLD_SIZE}, got {args.max_n}")
    sizes = range(2, args.max_n + 1)
    for n in tqdm(sizes, desc="verifying", unit="n", disable=args.quiet or not sys.stderr.isatty()):
        rings = hamiltonian_rings(n)
        if len(rings) != max_rings(n):
            raise CliError(f"n={n}: got {len(rings)} rings, expected {max_rings(n)}")
        compile_schedule(rings)
    print(f"verified n = 2..{args.max_n}: maximal orthogonal ring sets and exact schedules")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``megatron-tasp``."""
    p = argparse.ArgumentParser(prog="megatron-tasp",
                                description="TASP topology-aware multi-ring context parallelism for Megatron-Core.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="show the orthogonal rings and per-step schedule for a CP size",
                          description="Show the verified orthogonal rings and the per-step schedule.")
    plan.add_argument("--world-size", "-n", type=int, help=f"context-parallel size N (2..{MAX_WORLD_SIZE})")
    plan.add_argument("--num-rings", "-k", type=int, default=None, help="rings to use (default: the maximum)")
    plan.add_argument("--topology", "-t", help=f"topology YAML file or preset ({', '.join(list_presets())})")
    plan.add_argument("--rank", type=int, default=None, help="rank whose schedule to print (default 0)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    plan.add_argument("--draw", metavar="FILE.png", help="draw the rings (one colour per ring) to a PNG")
    plan.set_defaults(func=cmd_plan)

    ver = sub.add_parser("verify", help="verify ring decompositions and schedules for every n up to a bound")
    ver.add_argument("--max-n", type=int, default=64,
                     help=f"largest world size to verify (2..{MAX_WORLD_SIZE}, default 64)")
    ver.add_argument("--quiet", action="store_true", help="no progress bar")
    ver.set_defaults(func=cmd_verify)

    for mod in ("megatron_tasp.apps.bench", "megatron_tasp.apps.report", "megatron_tasp.apps.simulate",
                "megatron_tasp.apps.finetune", "megatron_tasp.apps.convert", "megatron_tasp.apps.preprocess"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, RingError, TopologyError, ValueError, FileNotFoundError) as exc:
        print(f"megatron-tasp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
