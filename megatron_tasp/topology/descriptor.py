"""Topology descriptors: what the hardware is, loaded from YAML and validated (pure Python).

Schema (every field is checked; an error names the field and the fix)::

    name: h100-sxm-8x1              # required, free text id
    description: "..."              # optional
    nodes: 1                        # >= 1
    gpus_per_node: 8                # >= 1
    intra_node:
      fabric: nvswitch              # nvswitch | full_mesh | ring | pcie
      gpu_egress_GBps: 450          # per GPU, per direction, all intra-node links together
      peer_GBps: 450                # most one peer pair can move per direction (full_mesh: one link)
      latency_us: 3.0               # per message
    inter_node:                     # required when nodes > 1
      nic_GBps: 50                  # per NIC, per direction (400 Gb/s = 50 GB/s)
      nics_per_node: 8
      rail_optimized: true          # local GPU l of every node shares rail l
      latency_us: 8.0
    rings: auto                     # auto | flat | multinode (how rings are built for this machine)

``rings: auto`` chains intra-node Hamiltonian paths across nodes when ``nodes > 1`` (one inter-node
send per GPU per step) and decomposes K_n* directly on a single node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from megatron_tasp.topology.rings import Ring, hamiltonian_rings, max_rings, multinode_rings

FABRICS = ("nvswitch", "full_mesh", "ring", "pcie")
RING_MODES = ("auto", "flat", "multinode")


class TopologyError(ValueError):
    """A topology descriptor is malformed or does not fit the job; the message names the fix."""


@dataclass(frozen=True)
class IntraNode:
    """Links inside one node."""

    fabric: str = "nvswitch"
    gpu_egress_GBps: float = 450.0
    peer_GBps: float = 450.0
    latency_us: float = 3.0


@dataclass(frozen=True)
class InterNode:
    """NICs between nodes."""

    nic_GBps: float = 50.0
    nics_per_node: int = 8
    rail_optimized: bool = True
    latency_us: float = 8.0


@dataclass(frozen=True)
class Topology:
    """A machine (or cluster) that CP ranks run on."""

    name: str
    nodes: int = 1
    gpus_per_node: int = 8
    intra_node: IntraNode = field(default_factory=IntraNode)
    inter_node: InterNode | None = None
    rings_mode: str = "auto"
    description: str = ""
    source: str = ""

    @property
    def world_size(self) -> int:
        """Number of GPUs described."""
        return self.nodes * self.gpus_per_node

    @property
    def multinode(self) -> bool:
        """Whether rings are chained across nodes."""
        if self.rings_mode == "flat":
            return False
        return self.nodes > 1

    def max_rings(self) -> int:
        """Largest ring count this topology offers."""
        if self.multinode:
            return self.gpus_per_node
        return max_rings(self.world_size)

    def rings(self, num_rings: int | None = None) -> list[Ring]:
        """Verified rings over logical ranks ``node * gpus_per_node + local``."""
        if self.multinode:
            return multinode_rings(self.nodes, self.gpus_per_node, num_rings)
        return hamiltonian_rings(self.world_size, num_rings)

    def check_world_size(self, n: int) -> None:
        """Raise TopologyError unless this topology describes exactly ``n`` ranks."""
        if n != self.world_size:
            raise TopologyError(
                f"topology '{self.name}' describes {self.world_size} GPUs "
                f"({self.nodes} node(s) x {self.gpus_per_node}) but the context-parallel group has {n} "
                f"ranks; pass a topology with nodes*gpus_per_node = {n} or change the CP size")


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise TopologyError(f"{where}: missing required field '{key}'")
        return default
    val = d[key]
    if typ in (float, (float,)) and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if isinstance(val, bool) and typ is not bool:
        raise TopologyError(f"{where}: field '{key}' must be {_tname(typ)}, got {val!r}")
    if not isinstance(val, typ):
        raise TopologyError(f"{where}: field '{key}' must be {_tname(typ)}, got {val!r}")
    return val


def _tname(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false"}.get(
        typ.__name__, typ.__name__)


def _positive(val: float, key: str, where: str) -> None:
    if val <= 0:
        raise TopologyError(f"{where}: field '{key}' must be > 0, got {val}")


def _check_keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise TopologyError(f"{where}: unknown field(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def topology_from_dict(d: Any, source: str = "<dict>") -> Topology:
    """Validate a parsed YAML mapping and build a Topology."""
    where = source
    if not isinstance(d, dict):
        raise TopologyError(f"{where}: the document must be a mapping of fields, got {type(d).__name__}")
    _check_keys(d, {"name", "description", "nodes", "gpus_per_node", "intra_node", "inter_node", "rings"}, where)
    name = _get(d, "name", str, where)
    nodes = _get(d, "nodes", int, where, 1)
    gpn = _get(d, "gpus_per_node", int, where)
    if nodes < 1:
        raise TopologyError(f"{where}: field 'nodes' must be >= 1, got {nodes}")
    if gpn < 1:
        raise TopologyError(f"{where}: field 'gpus_per_node' must be >= 1, got {gpn}")
    intra_raw = _get(d, "intra_node", dict, where, {})
    w = f"{where}: intra_node"
    _check_keys(intra_raw, {"fabric", "gpu_egress_GBps", "peer_GBps", "latency_us"}, w)
    fabric = _get(intra_raw, "fabric", str, w, "nvswitch")
    if fabric not in FABRICS:
        raise TopologyError(f"{w}: field 'fabric' must be one of {', '.join(FABRICS)}, got {fabric!r}")
    egress = _get(intra_raw, "gpu_egress_GBps", float, w, 450.0)
    peer = _get(intra_raw, "peer_GBps", float, w, egress)
    lat = _get(intra_raw, "latency_us", float, w, 3.0)
    for key, val in (("gpu_egress_GBps", egress), ("peer_GBps", peer), ("latency_us", lat)):
        _positive(val, key, w)
    if peer > egress:
        raise TopologyError(f"{w}: 'peer_GBps' ({peer}) cannot exceed 'gpu_egress_GBps' ({egress})")
    intra = IntraNode(fabric, egress, peer, lat)
    inter = None
    if "inter_node" in d or nodes > 1:
        inter_raw = _get(d, "inter_node", dict, where)
        w = f"{where}: inter_node"
        _check_keys(inter_raw, {"nic_GBps", "nics_per_node", "rail_optimized", "latency_us"}, w)
        nic = _get(inter_raw, "nic_GBps", float, w)
        nics = _get(inter_raw, "nics_per_node", int, w, gpn)
        rail = _get(inter_raw, "rail_optimized", bool, w, True)
        ilat = _get(inter_raw, "latency_us", float, w, 8.0)
        _positive(nic, "nic_GBps", w)
        _positive(ilat, "latency_us", w)
        if nics < 1:
            raise TopologyError(f"{w}: field 'nics_per_node' must be >= 1, got {nics}")
        inter = InterNode(nic, nics, rail, ilat)
    mode = _get(d, "rings", str, where, "auto")
    if mode not in RING_MODES:
        raise TopologyError(f"{where}: field 'rings' must be one of {', '.join(RING_MODES)}, got {mode!r}")
    if mode == "multinode" and nodes < 2:
        raise TopologyError(f"{where}: 'rings: multinode' needs nodes >= 2 (got {nodes}); use 'auto' or 'flat'")
    if nodes > 1 and mode != "flat" and gpn % 2:
        raise TopologyError(f"{where}: multi-node rings need an even gpus_per_node (got {gpn}); "
                            "set 'rings: flat' to decompose all GPUs as one K_n*")
    return Topology(name=name, nodes=nodes, gpus_per_node=gpn, intra_node=intra, inter_node=inter,
                    rings_mode=mode, description=str(d.get("description", "")), source=source)


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Load and validate a topology YAML file (or a shipped preset name such as ``h100-sxm-8``)."""
    import yaml

    p = Path(path)
    if not p.exists():
        preset = preset_path(str(path))
        if preset is None:
            raise TopologyError(f"topology file '{path}' not found; shipped presets: {', '.join(list_presets())}")
        p = preset
    if p.is_dir():
        raise TopologyError(f"topology '{path}' is a directory; give a YAML file or a preset "
                            f"({', '.join(list_presets())})")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TopologyError(f"{p}: not UTF-8 text (byte {exc.start}); save the topology as UTF-8 YAML") from None
    except OSError as exc:
        raise TopologyError(f"{p}: cannot read the topology file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TopologyError(f"{p}: malformed YAML{pos}: {getattr(exc, 'problem', exc)}") from None
    return topology_from_dict(data, source=str(p))


def presets_dir() -> Path:
    """Folder of the shipped topology YAML files: the package resources ``megatron_tasp.configs`` of an
    installed (or editable) package, else the ``configs/`` folder of a source checkout on ``sys.path``."""
    try:
        return Path(str(resources.files("megatron_tasp.configs") / "topologies"))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs" / "topologies"


def list_presets() -> list[str]:
    """Names of shipped topologies."""
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def preset_path(name: str) -> Path | None:
    """Path of a shipped topology by name, or None."""
    p = presets_dir() / f"{name}.yaml"
    return p if p.exists() else None


def generic_topology(world_size: int) -> Topology:
    """A single-node all-to-all topology of ``world_size`` GPUs (used when nothing is given)."""
    if world_size < 1:
        raise TopologyError(f"world size must be >= 1, got {world_size}")
    return Topology(name=f"generic-{world_size}", nodes=1, gpus_per_node=world_size)
