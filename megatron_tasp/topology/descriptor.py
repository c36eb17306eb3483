"""Topology descriptors: what the hardware is, loaded from YAML and validated (pure Python).

A topology file is checked by the shared schema validator (:mod:`megatron_tasp.schema`) against
:class:`TopologyDocument` and its sections :class:`IntraNodeFields` and :class:`InterNodeFields` (types,
bounds, choices, unknown and required keys), then by the cross-field rules in :func:`topology_from_dict`.
Every error is a :class:`TopologyError` naming the file, the field and the fix::

    name: h100-sxm-8x1              # required, free text id
    description: "..."              # optional
    nodes: 1                        # >= 1
    gpus_per_node: 8                # required, >= 1
    intra_node:
      fabric: nvswitch              # nvswitch | full_mesh | ring | pcie
      gpu_egress_GBps: 450          # per GPU, per direction, all intra-node links together
      peer_GBps: 450                # most one peer pair can move per direction (full_mesh: one link);
                                    # <= gpu_egress_GBps, defaults to it
      latency_us: 3.0               # per message
    inter_node:                     # required when nodes > 1
      nic_GBps: 50                  # required: per NIC, per direction (400 Gb/s = 50 GB/s)
      nics_per_node: 8              # defaults to gpus_per_node
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

from megatron_tasp.schema import SchemaError, build, option
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


@dataclass(frozen=True)
class IntraNodeFields:
    """Links inside one node."""

    fabric: str = option("nvswitch", "how the GPUs of a node are linked", choices=FABRICS)
    gpu_egress_GBps: float = option(450.0, "per GPU, per direction, all intra-node links together", gt=0)
    peer_GBps: float | None = option(None, "most one peer pair can move per direction (full_mesh: one link), "
                                     "at most gpu_egress_GBps; null = gpu_egress_GBps", gt=0)
    latency_us: float = option(3.0, "per message, microseconds", gt=0)


@dataclass(frozen=True)
class InterNodeFields:
    """NICs between nodes (required when nodes > 1)."""

    nic_GBps: float = option(None, "per NIC, per direction (400 Gb/s = 50 GB/s)", gt=0, required=True)
    nics_per_node: int | None = option(None, "NICs per node; null = gpus_per_node", min=1)
    rail_optimized: bool = option(True, "local GPU l of every node shares rail l")
    latency_us: float = option(8.0, "per message, microseconds", gt=0)


@dataclass(frozen=True)
class TopologyDocument:
    """A topology YAML file."""

    name: str = option(None, "free text id of the machine", required=True)
    description: str | None = option(None, "free text")
    nodes: int = option(1, "nodes (identical)", min=1)
    gpus_per_node: int = option(None, "GPUs per node", min=1, required=True)
    intra_node: IntraNodeFields = option(IntraNodeFields(), "links inside one node")
    inter_node: InterNodeFields | None = option(None, "NICs between nodes; required when nodes > 1")
    rings: str = option("auto", "how rings are built: auto (chained across nodes when nodes > 1), flat (one "
                        "K_n* over all GPUs) or multinode", choices=RING_MODES)


def topology_from_dict(d: Any, source: str = "<dict>") -> Topology:
    """Validate a parsed YAML mapping (the schema, then the cross-field rules) and build a Topology."""
    if not isinstance(d, dict):  # an empty file too: say so rather than list its missing fields
        raise TopologyError(f"{source}: the document must be a mapping of fields, got {type(d).__name__}")
    try:
        doc = build(TopologyDocument, d, source)
    except SchemaError as exc:
        raise TopologyError(str(exc)) from None
    where, nodes, gpn, mode = source, doc.nodes, doc.gpus_per_node, doc.rings
    egress = doc.intra_node.gpu_egress_GBps
    peer = egress if doc.intra_node.peer_GBps is None else doc.intra_node.peer_GBps
    if peer > egress:
        raise TopologyError(f"{where}: intra_node: 'peer_GBps' ({peer}) cannot exceed 'gpu_egress_GBps' ({egress}); "
                            "lower peer_GBps or raise gpu_egress_GBps")
    intra = IntraNode(doc.intra_node.fabric, egress, peer, doc.intra_node.latency_us)
    if nodes > 1 and doc.inter_node is None:
        raise TopologyError(f"{where}: inter_node: missing required field (nodes={nodes} > 1 needs the NICs "
                            "between nodes; add an inter_node section with at least nic_GBps)")
    inter = None
    if doc.inter_node is not None:
        i = doc.inter_node
        nics = gpn if i.nics_per_node is None else i.nics_per_node
        inter = InterNode(i.nic_GBps, nics, i.rail_optimized, i.latency_us)
    if mode == "multinode" and nodes < 2:
        raise TopologyError(f"{where}: 'rings: multinode' needs nodes >= 2 (got {nodes}); use 'auto' or 'flat'")
    if nodes > 1 and mode != "flat" and gpn % 2:
        raise TopologyError(f"{where}: multi-node rings need an even gpus_per_node (got {gpn}); "
                            "set 'rings: flat' to decompose all GPUs as one K_n*")
    return Topology(name=doc.name, nodes=nodes, gpus_per_node=gpn, intra_node=intra, inter_node=inter,
                    rings_mode=mode, description=doc.description or "", source=source)


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
