"""Generate megatron_tasp/topology/even_rings_table.json: full ring decompositions of K_n* for even n.

    python scripts/gen_even_rings.py --max-n 64            # keeps entries already in the table

Runs megatron_tasp.topology.ring_search over (temperature, seed) attempts until each n is solved and
records which attempt produced it. The table is verified again every time it is loaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megatron_tasp.topology.ring_search import search_full_decomposition
from megatron_tasp.topology.rings import verify_rings

TABLE = Path(__file__).resolve().parents[1] / "megatron_tasp" / "topology" / "even_rings_table.json"
ATTEMPTS = [(t, s) for s in range(8) for t in (0.002, 0.005, 0.01)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-n", type=int, default=8)
    ap.add_argument("--max-n", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=180.0, help="time limit of one attempt")
    args = ap.parse_args()
    table = json.loads(TABLE.read_text()) if TABLE.exists() else {"note": __doc__.strip().splitlines()[0],
                                                                    "rings": {}, "provenance": {}}
    for n in range(max(8, args.min_n + args.min_n % 2), args.max_n + 1, 2):
        if str(n) in table["rings"]:
            continue
        for temp, seed in ATTEMPTS:
            t0 = time.monotonic()
            rings = search_full_decomposition(n, seed=seed, temperature=temp, max_seconds=args.seconds)
            dt = time.monotonic() - t0
            print(f"n={n} temperature={temp} seed={seed}: {'solved' if rings else 'gave up'} in {dt:.1f} s",
                  flush=True)
            if rings:
                verify_rings(n, rings)
                table["rings"][str(n)] = rings
                table["provenance"][str(n)] = {"temperature": temp, "seed": seed}
                TABLE.write_text(json.dumps(table, separators=(",", ":")))
                break


if __name__ == "__main__":
    main()
