"""Verified search for a full decomposition of K_n* into n-1 directed Hamiltonian rings (pure Python).

Used for even n >= 8, where no closed form is implemented here (Tillson proved existence in 1980).

State: n-1 permutations ("successor maps") sigma_i that partition the arcs of K_n* (sigma_i(v) is the
ring-i successor of v, and {sigma_i(v)} = V \\ {v} for every v). Goal: every sigma_i a single n-cycle.
Start: the n-2 Hamiltonian rings of the 1-factor-pair family plus the leftover perfect matching (as a
permutation of n/2 two-cycles). Moves keep the arc partition exact:

- column switch: for maps a, b swap sigma_a(x) <-> sigma_b(x) for all x on one cycle of
  sigma_b^-1 o sigma_a (both stay permutations; the product of their signs is unchanged);
- row switch: for vertices u, w swap sigma_c(u) <-> sigma_c(w) for all c on one cycle of the
  column-matching between the rows of u and w (changes the sign of every touched map, so it reaches
  both parity classes: column switches alone can never finish when the parities disagree).

The objective is the total number of cycles (n-1 when solved). A move is kept when it does not raise it,
or with a small probability; moves favour maps that still have several cycles. The result is checked
by :func:`megatron_tasp.topology.rings.verify_rings` before anyone uses it.
"""

from __future__ import annotations

import random
import time


def _count_cycles(sig: list[int]) -> int:
    n = len(sig)
    seen = [False] * n
    count = 0
    for s in range(n):
        if not seen[s]:
            count += 1
            v = s
            while not seen[v]:
                seen[v] = True
                v = sig[v]
    return count


def _start(n: int) -> list[list[int]]:
    from megatron_tasp.topology.rings import _factor_pairs_even

    maps = []
    for cyc in _factor_pairs_even(n):
        for ring in (cyc, [cyc[0]] + cyc[:0:-1]):
            s = [0] * n
            for j, v in enumerate(ring):
                s[v] = ring[(j + 1) % n]
            maps.append(s)
    used = {(u, s[u]) for s in maps for u in range(n)}
    leftover = [0] * n
    for u in range(n):
        for w in range(n):
            if u != w and (u, w) not in used:
                leftover[u] = w
    maps.append(leftover)
    return maps


def search_full_decomposition(n: int, seed: int = 0, temperature: float = 0.002, focus: float = 0.8,
                              max_seconds: float = 60.0) -> list[list[int]] | None:
    """Return n-1 orthogonal directed Hamiltonian rings of K_n* (n even >= 8), or None if not found in time."""
    rng = random.Random(seed)
    k = n - 1
    sig = _start(n)
    cc = [_count_cycles(s) for s in sig]
    total = sum(cc)
    t0 = time.monotonic()
    it = 0
    while total > k:
        it += 1
        if it % 5000 == 0 and time.monotonic() - t0 > max_seconds:
            return None
        bad = [c for c in range(k) if cc[c] > 1]
        if rng.random() < 0.5:  # column switch
            if bad and rng.random() < focus:
                a = rng.choice(bad)
                b = rng.randrange(k - 1)
                b = b if b < a else b + 1
            else:
                a, b = rng.sample(range(k), 2)
            sa, sb = sig[a], sig[b]
            inv_b = [0] * n
            for v in range(n):
                inv_b[sb[v]] = v
            u = rng.randrange(n)
            cyc = [u]
            w = inv_b[sa[u]]
            while w != u:
                cyc.append(w)
                w = inv_b[sa[w]]
            if len(cyc) == n:
                continue
            for x in cyc:
                sa[x], sb[x] = sb[x], sa[x]
            na, nb = _count_cycles(sa), _count_cycles(sb)
            delta = na + nb - cc[a] - cc[b]
            if delta <= 0 or rng.random() < temperature:
                cc[a], cc[b] = na, nb
                total += delta
            else:
                for x in cyc:
                    sa[x], sb[x] = sb[x], sa[x]
        else:  # row switch
            u, w = rng.sample(range(n), 2)
            col_of = {sig[c][u]: c for c in range(k)}
            c0 = rng.choice(bad) if bad and rng.random() < focus else rng.randrange(k)
            cols = [c0]
            c = c0
            closed = True
            while True:
                sym = sig[c][w]
                if sym not in col_of:
                    closed = False
                    break
                c = col_of[sym]
                if c == c0:
                    break
                cols.append(c)
            if not closed or len(cols) == k:
                continue
            for c in cols:
                sig[c][u], sig[c][w] = sig[c][w], sig[c][u]
            new = [_count_cycles(sig[c]) for c in cols]
            delta = sum(new) - sum(cc[c] for c in cols)
            if delta <= 0 or rng.random() < temperature:
                for c, x in zip(cols, new):
                    cc[c] = x
                total += delta
            else:
                for c in cols:
                    sig[c][u], sig[c][w] = sig[c][w], sig[c][u]
    rings = []
    for s in sig:
        ring = [0]
        while len(ring) < n:
            ring.append(s[ring[-1]])
        rings.append(ring)
    return rings
