"""Draw orthogonal rings as a PNG: ranks on a circle (or grouped by node), one colour per ring."""

from __future__ import annotations

import math
from collections.abc import Sequence


def draw_rings(rings: Sequence[Sequence[int]], path: str, title: str = "", gpus_per_node: int | None = None) -> None:
    """Write a picture of ``rings`` to ``path`` (PNG). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    n = len(rings[0])
    pos = {}
    if gpus_per_node and gpus_per_node < n:
        nodes = n // gpus_per_node
        for r in range(n):
            node, local = divmod(r, gpus_per_node)
            cx, cy = 3.0 * math.cos(2 * math.pi * node / nodes), 3.0 * math.sin(2 * math.pi * node / nodes)
            a = 2 * math.pi * local / gpus_per_node
            pos[r] = (cx + math.cos(a), cy + math.sin(a))
    else:
        for r in range(n):
            a = math.pi / 2 - 2 * math.pi * r / n
            pos[r] = (math.cos(a), math.sin(a))
    size = 6 if n <= 16 else 9
    fig, ax = plt.subplots(figsize=(size, size))
    cmap = plt.get_cmap("tab10" if len(rings) <= 10 else "tab20")
    for i, ring in enumerate(rings):
        color = cmap(i % cmap.N)
        for j, u in enumerate(ring):
            v = ring[(j + 1) % n]
            arrow = FancyArrowPatch(pos[u], pos[v], arrowstyle="-|>", mutation_scale=10, lw=1.2, color=color,
                                    connectionstyle="arc3,rad=0.12", shrinkA=9, shrinkB=9, alpha=0.85)
            ax.add_patch(arrow)
        ax.plot([], [], color=color, label=f"ring {i}")
    for r, (x, y) in pos.items():
        ax.scatter([x], [y], s=320, color="white", edgecolor="black", zorder=3)
        ax.text(x, y, str(r), ha="center", va="center", fontsize=8, zorder=4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title or f"{len(rings)} orthogonal rings on {n} ranks")
    if len(rings) <= 20:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
