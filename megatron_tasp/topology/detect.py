"""Detect the running node's GPU fabric from ``nvidia-smi topo -m`` (optional, pure Python)."""

from __future__ import annotations

import re
import shutil
import subprocess

from megatron_tasp.topology.descriptor import InterNode, IntraNode, Topology, TopologyError

NVLINK_GBPS_PER_LINK = {"H100": 25.0, "H200": 25.0, "A100": 25.0, "B200": 50.0, "GB200": 50.0}


def parse_topo_matrix(text: str) -> dict[tuple[int, int], str]:
    """Parse the GPU x GPU part of ``nvidia-smi topo -m`` into {(i, j): 'NV18' | 'SYS' | ...}."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    header = next((ln for ln in lines if re.search(r"\bGPU0\b", ln)), None)
    if header is None:
        raise TopologyError("no GPU matrix found in 'nvidia-smi topo -m' output")
    cols = header.split()
    gpu_cols = [c for c in cols if re.fullmatch(r"GPU\d+", c)]
    links: dict[tuple[int, int], str] = {}
    for ln in lines:
        parts = ln.split()
        if not parts or not re.fullmatch(r"GPU\d+", parts[0]):
            continue
        i = int(parts[0][3:])
        for j, cell in enumerate(parts[1:1 + len(gpu_cols)]):
            if i != j:
                links[(i, j)] = cell
    return links


def topology_from_matrix(links: dict[tuple[int, int], str], gpu_name: str = "") -> Topology:
    """Build a single-node Topology from a parsed link matrix."""
    gpus = sorted({i for i, _ in links} | {j for _, j in links})
    n = len(gpus)
    nv = {k: int(v[2:]) for k, v in links.items() if re.fullmatch(r"NV\d+", v)}
    per_link = next((bw for key, bw in NVLINK_GBPS_PER_LINK.items() if key in gpu_name.upper()), 25.0)
    if n >= 2 and len(nv) == n * (n - 1):
        counts = set(nv.values())
        c = min(counts)
        if n == 2 or c >= 12:  # many links to every peer: NVSwitch (or a pair)
            egress = per_link * max(counts)
            intra = IntraNode("nvswitch", egress, egress, 3.0)
        else:  # a few direct links to each peer: full mesh
            intra = IntraNode("full_mesh", per_link * c * (n - 1), per_link * c, 4.0)
    else:
        intra = IntraNode("pcie", 25.0, 25.0, 10.0)
    return Topology(name=f"detected-{n}", nodes=1, gpus_per_node=n, intra_node=intra, source="nvidia-smi")


def detect_topology(num_nodes: int = 1, nic_GBps: float = 50.0) -> Topology:
    """Describe the running machine (``num_nodes`` identical nodes); raises TopologyError if unknown."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise TopologyError("cannot detect the topology: nvidia-smi not found; pass --topology FILE instead")
    try:
        text = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=30, check=True).stdout
        name = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.splitlines()[0]
    except (subprocess.SubprocessError, IndexError) as exc:
        raise TopologyError(f"cannot detect the topology ({exc}); pass --topology FILE instead") from None
    topo = topology_from_matrix(parse_topo_matrix(text), name)
    if num_nodes > 1:
        topo = Topology(name=f"detected-{num_nodes}x{topo.gpus_per_node}", nodes=num_nodes,
                        gpus_per_node=topo.gpus_per_node, intra_node=topo.intra_node,
                        inter_node=InterNode(nic_GBps, topo.gpus_per_node, True, 8.0), source="nvidia-smi")
    return topo
