"""Fine-tuning recipes: a YAML schema, validated with errors that name the field (pure Python, no torch).

A recipe has seven sections plus three top-level keys; every field, its default and its meaning is
declared once below (the dataclass field metadata) and :func:`schema_text` prints that table, so the
documentation (docs/FINETUNE.md, ``megatron-tasp finetune --schema``) cannot drift from the code.

``load_recipe(path_or_name, overrides)`` reads a YAML file (or a shipped recipe name such as
``default-cpu``), applies ``section.key=value`` overrides and validates everything, raising
:class:`RecipeError` naming the field and the fix. ``Recipe.resolve_world(world_size)`` later checks the
recipe against the real process count.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_RECIPE = "default-cpu"


class RecipeError(ValueError):
    """A recipe is malformed or inconsistent; the message names the field and the fix."""


def _f(default: Any, doc: str, *, kind: str, choices: tuple[Any, ...] | None = None, min: float | None = None,
       nullable: bool = False, required: bool = False) -> Any:
    """A recipe field: default, documentation and constraints (kept in the dataclass metadata)."""
    meta = {"doc": doc, "kind": kind, "choices": choices, "min": min, "nullable": nullable, "required": required}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    """Shape of the GPT (Megatron-Core GPTModel)."""

    num_layers: int = _f(None, "transformer layers", kind="int", min=1, required=True)
    hidden_size: int = _f(None, "model width", kind="int", min=1, required=True)
    num_attention_heads: int = _f(None, "query heads", kind="int", min=1, required=True)
    num_query_groups: int | None = _f(None, "KV heads (GQA); null = num_attention_heads (MHA)", kind="int", min=1,
                                      nullable=True)
    ffn_hidden_size: int = _f(None, "MLP width (per branch for swiglu)", kind="int", min=1, required=True)
    kv_channels: int | None = _f(None, "head dim; null = hidden_size / num_attention_heads", kind="int", min=1,
                                 nullable=True)
    vocab_size: int | str = _f("auto", "'auto' = the tokenizer's vocabulary padded to vocab_multiple, or an "
                               "integer >= the tokenizer's vocabulary", kind="int_or_auto", min=1)
    vocab_multiple: int = _f(128, "padding multiple for vocab_size: auto", kind="int", min=1)
    position_embedding: str = _f("rope", "position embedding", kind="str", choices=("rope", "learned_absolute"))
    rotary_base: float = _f(10000.0, "RoPE theta (Llama 3: 500000)", kind="float", min=1.0)
    rotary_percent: float = _f(1.0, "fraction of the head dim that RoPE rotates", kind="float", min=0.0)
    max_position_embeddings: int | None = _f(None, "learned_absolute table size; null = data.seq_length", kind="int",
                                             min=1, nullable=True)
    normalization: str = _f("RMSNorm", "normalization layer", kind="str", choices=("RMSNorm", "LayerNorm"))
    norm_epsilon: float = _f(1e-5, "epsilon of the normalization", kind="float", min=0.0)
    activation: str = _f("swiglu", "MLP activation (swiglu = gated SiLU, Llama)", kind="str",
                         choices=("swiglu", "gelu"))
    add_bias_linear: bool = _f(False, "biases in linear layers", kind="bool")
    tie_embeddings: bool = _f(False, "share input embedding and output layer weights", kind="bool")
    init_std: float = _f(0.02, "std of the normal weight initialisation", kind="float", min=0.0)
    spec: str = _f("local", "Megatron layer spec with TASP core attention: local (any device) or te (Transformer "
                   "Engine linears/norms, GPU; checkpoint keys are the same)", kind="str", choices=("local", "te"))


@dataclass
class TokenizerSection:
    """How text becomes token ids."""

    type: str = _f("byte", "byte (built-in: UTF-8 bytes, vocabulary 256, id 0 separates documents) or "
                   "huggingface (AutoTokenizer, imported only when used)", kind="str", choices=("byte", "huggingface"))
    name: str | None = _f(None, "huggingface: model name or local path (e.g. meta-llama/Meta-Llama-3-8B)", kind="str",
                          nullable=True)


@dataclass
class DataSection:
    """Training text and sequence length."""

    source: str = _f("stdlib", "stdlib (this Python's standard-library .py files), files (path or glob of text "
                     "files) or jsonl (one JSON object per line)", kind="str", choices=("stdlib", "files", "jsonl"))
    path: str | list[str] | None = _f(None, "files/jsonl: a path, a glob (**, ~ and $VARS expand) or a list of them",
                                      kind="paths", nullable=True)
    text_field: str = _f("text", "jsonl: the field holding the text", kind="str")
    max_bytes: int | None = _f(None, "read at most this many bytes of text (null = all)", kind="int", min=1,
                               nullable=True)
    seq_length: int = _f(None, "tokens per training sequence (a multiple of 2 * parallel.cp)", kind="int", min=2,
                         required=True)
    eval_fraction: float = _f(0.02, "share of the sequences held out for evaluation", kind="float", min=0.0)
    cache_dir: str | None = _f(None, "where the tokenized corpus is cached (null = <logging.output_dir>/data_cache)",
                               kind="str", nullable=True)


@dataclass
class ParallelSection:
    """Process layout: world size = tp * cp * dp."""

    tp: int = _f(1, "tensor-parallel size (only 1 is supported by finetune)", kind="int", min=1)
    cp: int = _f(1, "context-parallel size: each sequence is split over cp ranks (zigzag)", kind="int", min=1)
    dp: int | None = _f(None, "data-parallel size; null = world_size / (tp * cp) under torchrun/srun; when finetune "
                        "starts the ranks itself: all visible GPUs (a multiple of tp * cp), or 1 on CPU", kind="int",
                        min=1, nullable=True)
    cp_backend: str = _f("tasp", "tasp (multi-ring) or ring (TASP with one ring = zigzag ring attention)", kind="str",
                         choices=("tasp", "ring"))
    num_rings: int | str | None = _f(None, "TASP rings per step; null = the most the topology offers",
                                     kind="int_or_auto", min=1, nullable=True)
    topology: str | None = _f(None, "topology preset (configs/topologies) or YAML file describing the CP group; its "
                              "GPU count must equal cp (null = one all-to-all node)", kind="str", nullable=True)
    transport: str = _f("auto", "how KV pieces move: auto, a2a (all_to_all_single), p2p (batched isend/irecv) or "
                        "symm (copy-engine pushes into symmetric memory; one NVLink node)", kind="str",
                        choices=("auto", "a2a", "p2p", "symm"))
    chunks: int | str = _f(1, "messages per KV piece and step (kernels start as each lands; more launches); "
                           "'auto' asks the cost model", kind="int_or_auto", min=1)
    keep_kv: bool | str = _f("auto", "keep the forward's KV pieces for the backward: auto (up to 64 MiB per layer "
                             "call), true (no KV exchange in the backward; costs (cp-1) x the local K/V per layer) "
                             "or false", kind="bool_or_auto")
    kernel: str | None = _f(None, "TASP block-attention kernel (null = chosen at run time)", kind="str", nullable=True)
    device: str = _f("auto", "auto (cuda when available), cuda or cpu", kind="str", choices=("auto", "cuda", "cpu"))


@dataclass
class TrainSection:
    """Optimizer, schedule and batch."""

    steps: int = _f(None, "optimizer steps; the LR schedule spans them", kind="int", min=1, required=True)
    global_batch: int = _f(1, "sequences per optimizer step (a multiple of dp * micro_batch)", kind="int", min=1)
    micro_batch: int = _f(1, "sequences per forward/backward on one DP rank (the rest is gradient accumulation)",
                          kind="int", min=1)
    precision: str = _f("fp32", "fp32, or bf16 (bf16 weights and activations, fp32 master weights and optimizer)",
                        kind="str", choices=("fp32", "bf16"))
    recompute: str = _f("none", "activation recomputation: none, selective (core attention) or full (every layer)",
                        kind="str", choices=("none", "selective", "full"))
    optimizer: str = _f("adamw", "optimizer (AdamW; its fp32 state is sharded over the dp * cp ranks)", kind="str",
                        choices=("adamw",))
    lr: float = _f(3e-4, "peak learning rate", kind="float", min=0.0)
    min_lr: float = _f(0.0, "learning rate at the end of the cosine decay", kind="float", min=0.0)
    schedule: str = _f("cosine", "cosine (linear warmup, cosine decay to min_lr) or constant (after warmup)",
                       kind="str", choices=("cosine", "constant"))
    warmup_steps: int = _f(0, "linear warmup steps", kind="int", min=0)
    betas: list[float] = _f([0.9, 0.95], "AdamW betas", kind="floats")
    eps: float = _f(1e-8, "AdamW epsilon", kind="float", min=0.0)
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (not applied to 1-D weights: norms, biases)",
                             kind="float", min=0.0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)", kind="float", min=0.0)
    eval_interval: int = _f(0, "evaluate held-out loss every N steps (0 = only before the first and after the last "
                            "step when eval_batches > 0)", kind="int", min=0)
    eval_batches: int = _f(0, "held-out sequences per evaluation (0 = no evaluation)", kind="int", min=0)


@dataclass
class CheckpointSection:
    """Megatron distributed checkpoints (megatron.core.dist_checkpointing)."""

    save: bool = _f(True, "write checkpoints", kind="bool")
    dir: str | None = _f(None, "checkpoint directory (null = <logging.output_dir>/checkpoints)", kind="str",
                         nullable=True)
    interval: int = _f(0, "save every N steps (0 = only at the end)", kind="int", min=0)
    save_at_end: bool = _f(True, "save after the last step (and when --max-steps stops the run)", kind="bool")
    keep_last: int = _f(2, "keep the newest N checkpoints (0 = keep all)", kind="int", min=0)
    resume: str = _f("auto", "auto (continue from dir/latest when it exists), never, or a checkpoint path to "
                     "continue from (model, optimizer, step, data position, RNG)", kind="str")
    pretrained: str | None = _f(None, "weights to start from when not resuming (fine-tuning): a checkpoint dir; "
                                "optimizer and step start fresh", kind="str", nullable=True)


@dataclass
class LoggingSection:
    """Console, metrics and plot."""

    output_dir: str = _f("runs/finetune", "metrics.json, loss.png, the data cache and (by default) checkpoints",
                         kind="str")
    interval: int = _f(1, "print a log line every N steps", kind="int", min=1)
    progress_bar: bool = _f(True, "tqdm progress bar on rank 0 (when tqdm is installed)", kind="bool")
    plot: bool = _f(True, "write loss.png (when matplotlib is installed)", kind="bool")


SECTIONS: dict[str, type] = {
    "model": ModelSection, "tokenizer": TokenizerSection, "data": DataSection, "parallel": ParallelSection,
    "train": TrainSection, "checkpoint": CheckpointSection, "logging": LoggingSection,
}
TOP_LEVEL = {"name": "recipe name (free text)", "description": "what the recipe is for (free text)",
             "seed": "seed of weight initialisation and data order (integer)"}


@dataclass
class Recipe:
    """A validated fine-tuning recipe."""

    model: ModelSection
    data: DataSection
    train: TrainSection
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    name: str = "finetune"
    description: str = ""
    seed: int = 1234
    source: str = "<dict>"

    # ----- derived values ---------------------------------------------------------------------------------

    @property
    def kv_channels(self) -> int:
        """Head dimension."""
        return self.model.kv_channels or self.model.hidden_size // self.model.num_attention_heads

    @property
    def query_groups(self) -> int:
        """KV heads."""
        return self.model.num_query_groups or self.model.num_attention_heads

    @property
    def num_rings(self) -> int | str | None:
        """Ring count handed to TASP (None = the most available)."""
        if self.parallel.cp_backend == "ring":
            return 1
        return self.parallel.num_rings

    def padded_vocab_size(self, tokenizer_vocab: int) -> int:
        """Model vocabulary for a tokenizer of ``tokenizer_vocab`` ids; raises if the recipe's is too small."""
        if self.model.vocab_size == "auto":
            m = self.model.vocab_multiple
            return -(-tokenizer_vocab // m) * m
        if int(self.model.vocab_size) < tokenizer_vocab:
            raise RecipeError(f"{self.source}: model.vocab_size={self.model.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({tokenizer_vocab}); set model.vocab_size: auto")
        return int(self.model.vocab_size)

    def resolve_world(self, world_size: int) -> int:
        """Check the recipe against ``world_size`` processes; return the data-parallel size."""
        p = self.parallel
        mp = p.tp * p.cp
        if world_size % mp:
            raise RecipeError(f"{self.source}: world size {world_size} is not a multiple of parallel.tp * parallel.cp "
                              f"= {mp}; launch a multiple of {mp} processes or change parallel.cp")
        dp = world_size // mp
        if p.dp is not None and p.dp != dp:
            raise RecipeError(f"{self.source}: parallel.dp={p.dp} but {world_size} processes with tp*cp={mp} give "
                              f"dp={dp}; set parallel.dp={dp} (or null) or launch {p.dp * mp} processes")
        t = self.train
        if t.global_batch % (dp * t.micro_batch):
            raise RecipeError(f"{self.source}: train.global_batch={t.global_batch} must be a multiple of dp * "
                              f"train.micro_batch = {dp} * {t.micro_batch}")
        return dp

    @property
    def standalone_world_size(self) -> int:
        """Processes to start on CPU when finetune launches its own workers (tp * cp * (dp or 1))."""
        return self.parallel.tp * self.parallel.cp * (self.parallel.dp or 1)

    def output_dir(self) -> Path:
        """The run's output directory."""
        return Path(_expand(self.logging.output_dir))

    def checkpoint_dir(self) -> Path:
        """Where checkpoints go."""
        return Path(_expand(self.checkpoint.dir)) if self.checkpoint.dir else self.output_dir() / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-serialisable), without the source path."""
        out: dict[str, Any] = {"name": self.name, "description": self.description, "seed": self.seed}
        for sec in SECTIONS:
            out[sec] = dataclasses.asdict(getattr(self, sec))
        return out

    def to_yaml(self) -> str:
        """The resolved recipe as YAML."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=110)


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------

def _kind_text(meta: dict[str, Any]) -> str:
    kind = meta["kind"]
    text = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "floats": "a list of numbers", "int_or_auto": "an integer or 'auto'",
            "bool_or_auto": "true, false or 'auto'",
            "paths": "a path/glob or a list of them"}[kind]
    if meta["choices"]:
        text = "one of " + ", ".join(map(str, meta["choices"]))
    if meta["min"] is not None and kind in ("int", "float", "int_or_auto"):
        text += f" (>= {meta['min']:g})"
    if meta["nullable"]:
        text += " or null"
    return text


def _coerce(value: Any, meta: dict[str, Any], where: str) -> Any:
    """Check one value against its field spec; return it (ints widened to floats where a number is wanted)."""
    kind = meta["kind"]
    bad = RecipeError(f"{where} must be {_kind_text(meta)}, got {value!r}")
    if value is None:
        if meta["nullable"]:
            return None
        raise bad
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind == "bool_or_auto":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        raise bad
    if kind == "int_or_auto" and isinstance(value, str):
        if value.strip().lower() != "auto":
            raise bad
        return "auto"
    if kind in ("int", "int_or_auto"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise bad
    elif kind == "floats":
        if not isinstance(value, list) or not value or \
                not all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
            raise bad
        value = [float(x) for x in value]
    elif kind == "paths":
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(x, str) and x.strip() for x in items):
            raise bad
    if meta["choices"] and value not in meta["choices"]:
        raise bad
    if meta["min"] is not None and kind in ("int", "float", "int_or_auto") and value < meta["min"]:
        raise bad
    return value


def _build_section(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping of fields, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; allowed: "
                          f"{', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        meta = f.metadata
        if name not in raw:
            if meta["required"]:
                raise RecipeError(f"{where}.{name}: missing required field ({meta['doc']})")
            continue
        values[name] = _coerce(raw[name], meta, f"{where}.{name}")
    return cls(**values)


def recipe_from_dict(raw: Any, source: str = "<dict>") -> Recipe:
    """Validate a parsed YAML mapping and build a :class:`Recipe`."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: the recipe must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS) - set(TOP_LEVEL))
    if unknown:
        raise RecipeError(f"{source}: unknown section(s) {', '.join(map(str, unknown))}; allowed: "
                          f"{', '.join([*TOP_LEVEL, *SECTIONS])}")
    for sec in ("model", "data", "train"):
        if sec not in raw:
            raise RecipeError(f"{source}: missing required section '{sec}'")
    sections = {sec: _build_section(cls, raw.get(sec), f"{source}: {sec}") for sec, cls in SECTIONS.items()}
    top: dict[str, Any] = {}
    for key in ("name", "description"):
        if key in raw:
            if not isinstance(raw[key], str):
                raise RecipeError(f"{source}: {key} must be a string, got {raw[key]!r}")
            top[key] = raw[key]
    if "seed" in raw:
        if isinstance(raw["seed"], bool) or not isinstance(raw["seed"], int) or raw["seed"] < 0:
            raise RecipeError(f"{source}: seed must be an integer >= 0, got {raw['seed']!r}")
        top["seed"] = raw["seed"]
    recipe = Recipe(**sections, **top, source=source)
    validate(recipe)
    return recipe


def validate(r: Recipe) -> None:
    """Cross-field checks (each error names the fields involved and the fix)."""
    src = r.source
    m, d, p, t, tok = r.model, r.data, r.parallel, r.train, r.tokenizer
    if m.num_attention_heads % r.query_groups:
        raise RecipeError(f"{src}: model.num_attention_heads={m.num_attention_heads} must be a multiple of "
                          f"model.num_query_groups={r.query_groups}")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise RecipeError(f"{src}: model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
                          f"{m.num_attention_heads}; set model.kv_channels explicitly")
    if m.position_embedding == "rope" and not 0.0 < m.rotary_percent <= 1.0:
        raise RecipeError(f"{src}: model.rotary_percent must be in (0, 1], got {m.rotary_percent}")
    if m.position_embedding == "learned_absolute" and (m.max_position_embeddings or d.seq_length) < d.seq_length:
        raise RecipeError(f"{src}: model.max_position_embeddings={m.max_position_embeddings} is smaller than "
                          f"data.seq_length={d.seq_length}")
    if tok.type == "huggingface" and not tok.name:
        raise RecipeError(f"{src}: tokenizer.name is required for tokenizer.type: huggingface "
                          "(a model name such as meta-llama/Meta-Llama-3-8B or a local directory)")
    if tok.type == "byte" and m.vocab_size != "auto" and int(m.vocab_size) < 256:
        raise RecipeError(f"{src}: model.vocab_size={m.vocab_size} is smaller than the byte tokenizer's 256 ids")
    if d.source in ("files", "jsonl") and not d.path:
        raise RecipeError(f"{src}: data.path is required for data.source: {d.source}")
    if d.source == "stdlib" and d.path:
        raise RecipeError(f"{src}: data.path is only used with data.source files or jsonl (got source stdlib)")
    if not 0.0 <= d.eval_fraction < 0.5:
        raise RecipeError(f"{src}: data.eval_fraction must be in [0, 0.5), got {d.eval_fraction}")
    if t.eval_batches and d.eval_fraction == 0:
        raise RecipeError(f"{src}: train.eval_batches={t.eval_batches} needs data.eval_fraction > 0")
    if p.tp != 1:
        raise RecipeError(f"{src}: parallel.tp={p.tp}: tensor parallelism is not supported by megatron-tasp finetune "
                          "(set parallel.tp: 1 and scale with parallel.cp / parallel.dp; for TP use Megatron-LM "
                          "pretraining with --context-parallel-backend tasp)")
    if d.seq_length % (2 * p.cp):
        raise RecipeError(f"{src}: data.seq_length={d.seq_length} must be a multiple of 2 * parallel.cp = {2 * p.cp} "
                          "(zigzag split: every CP rank holds two equal chunks)")
    if p.cp_backend == "ring" and p.num_rings not in (None, 1):
        raise RecipeError(f"{src}: parallel.cp_backend: ring uses one ring; remove parallel.num_rings "
                          f"(got {p.num_rings}) or use cp_backend: tasp")
    if p.cp > 1:
        _check_rings(r)
    elif p.topology is not None:
        raise RecipeError(f"{src}: parallel.topology is set but parallel.cp=1 (no context parallelism)")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise RecipeError(f"{src}: train.betas must be two numbers in [0, 1), got {t.betas}")
    if t.min_lr > t.lr:
        raise RecipeError(f"{src}: train.min_lr={t.min_lr} is larger than train.lr={t.lr}")
    if t.warmup_steps > t.steps:
        raise RecipeError(f"{src}: train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
    if t.global_batch % t.micro_batch:
        raise RecipeError(f"{src}: train.global_batch={t.global_batch} must be a multiple of train.micro_batch="
                          f"{t.micro_batch}")
    if p.dp is not None and t.global_batch % (p.dp * t.micro_batch):
        raise RecipeError(f"{src}: train.global_batch={t.global_batch} must be a multiple of parallel.dp * "
                          f"train.micro_batch = {p.dp} * {t.micro_batch}")
    if m.spec == "te" and p.device == "cpu":
        raise RecipeError(f"{src}: model.spec: te needs Transformer Engine on a GPU; use model.spec: local on CPU")


def _check_rings(r: Recipe) -> None:
    from megatron_tasp.topology import TopologyError, generic_topology, load_topology

    p, src = r.parallel, r.source
    if p.topology is None:
        topo = generic_topology(p.cp)
    else:
        try:
            topo = load_topology(_expand(p.topology))
        except TopologyError as exc:
            raise RecipeError(f"{src}: parallel.topology: {exc}") from None
        if topo.world_size != p.cp:
            raise RecipeError(f"{src}: parallel.topology '{topo.name}' describes {topo.world_size} GPUs but "
                              f"parallel.cp={p.cp}; use a topology of {p.cp} GPUs or set parallel.cp="
                              f"{topo.world_size}")
    rings = r.num_rings
    if isinstance(rings, int) and rings > topo.max_rings():
        raise RecipeError(f"{src}: parallel.num_rings={rings} but {topo.name} offers at most {topo.max_rings()} "
                          f"orthogonal rings at cp={p.cp}")


# ------------------------------------------------------------------------------------------------------------
# Loading, overrides, shipped recipes
# ------------------------------------------------------------------------------------------------------------

def recipes_dir() -> Path:
    """Folder of the shipped recipe YAML files (source checkout or installed package)."""
    repo = Path(__file__).resolve().parents[3] / "configs" / "recipes"
    if repo.is_dir():
        return repo
    from megatron_tasp import configs  # installed wheel: configs/ is packaged as megatron_tasp.configs

    return Path(configs.__file__).parent / "recipes"


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def recipe_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A recipe file: the path itself when it exists, else a shipped recipe of that name."""
    p = Path(_expand(str(name_or_path)))
    if p.is_file():
        return p
    shipped = recipes_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise RecipeError(f"recipe '{name_or_path}' not found (no such file; shipped recipes: "
                      f"{', '.join(list_recipes())})")


def parse_value(text: str) -> Any:
    """An override value: YAML scalars/lists, with 1e-4 style numbers read as floats and null/none as None."""
    import yaml

    stripped = text.strip()
    if stripped.lower() in ("null", "none", "~"):
        return None
    for conv in (int, float):
        try:
            return conv(stripped)
        except ValueError:
            pass
    try:
        return yaml.safe_load(stripped)
    except yaml.YAMLError:
        return stripped


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], source: str = "") -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw recipe mapping (a copy); unknown keys raise RecipeError."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            out[parts[0]] = parse_value(value)
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise RecipeError(f"override '{item}': key must be section.field with section one of "
                              f"{', '.join(SECTIONS)} (or one of {', '.join(TOP_LEVEL)})")
        sec, name = parts
        allowed = [f.name for f in dataclasses.fields(SECTIONS[sec])]
        if name not in allowed:
            raise RecipeError(f"override '{item}': unknown field {sec}.{name}; allowed: {', '.join(allowed)}")
        section = out.setdefault(sec, {})
        if section is None:
            section = out[sec] = {}
        if not isinstance(section, dict):
            raise RecipeError(f"override '{item}': section {sec} is not a mapping in {source or 'the recipe'}")
        section[name] = parse_value(value)
    return out


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; malformed YAML raises RecipeError with the position."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{pos}: {getattr(exc, 'problem', exc)}") from None


def load_recipe(name_or_path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
                ) -> Recipe:
    """Load a recipe file or shipped name (None = the embedded default), apply overrides, validate."""
    path = recipe_path(DEFAULT_RECIPE if name_or_path is None else name_or_path)
    raw = read_yaml(path)
    if overrides:
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: the recipe must be a mapping of sections, got {type(raw).__name__}")
        raw = apply_overrides(raw, overrides, str(path))
    return recipe_from_dict(raw, source=str(path))


def schema_text() -> str:
    """Every recipe field with its default and meaning, as annotated YAML (the documented schema)."""
    import json

    lines = [f"{k}: ...  # {doc}" for k, doc in TOP_LEVEL.items()]
    for sec, cls in SECTIONS.items():
        lines.append(f"{sec}:  # {cls.__doc__.strip()}")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta["required"]:
                default = "REQUIRED"
            else:
                value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                default = "null" if value is None else json.dumps(value) if not isinstance(value, str) else value
            lines.append(f"  {f.name}: {default}  # {_kind_text(meta)}; {meta['doc']}")
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_RECIPE", "SECTIONS", "Recipe", "RecipeError", "apply_overrides", "list_recipes", "load_recipe",
           "parse_value", "recipe_from_dict", "recipe_path", "recipes_dir", "schema_text", "validate"]
