"""Fine-tuning recipes: YAML files validated into a frozen :class:`Recipe` with errors that name the file,
the field and the fix (pure Python, no torch).

A recipe has seven sections (frozen dataclasses in :mod:`.sections`, checked field by field by the one
validator in :mod:`megatron_tasp.schema`) plus three top-level keys; :func:`validate` adds the cross-field rules. The
``parallel`` section's TASP fields become one ``TaspOptions`` (:meth:`Recipe.tasp_options`).
:func:`schema_text` prints every field with its default and meaning, so the documentation
(docs/FINETUNE.md, ``megatron-tasp finetune --schema``) cannot drift from the code.

``load_recipe(path_or_name, overrides)`` reads a YAML file (or a shipped recipe name such as
``default-cpu``), applies ``section.key=value`` overrides and validates everything, raising
:class:`RecipeError` naming the field and the fix. ``Recipe.resolve_world(world_size)`` later checks the
recipe against the real process count.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from megatron_tasp.apps.finetune_lib.rope import rope_scaling_problem
from megatron_tasp.apps.finetune_lib.sections import (
    SECTIONS,
    TASP_FIELDS,
    TOP_LEVEL,
    CheckpointSection,
    DataSection,
    LoggingSection,
    ModelSection,
    ParallelSection,
    PasskeySection,
    TokenizerSection,
    TrainSection,
)
from megatron_tasp.schema import SchemaError, build, listing

DEFAULT_RECIPE = "default-cpu"


class RecipeError(ValueError):
    """A recipe is malformed or inconsistent; the message names the field and the fix."""


@dataclass(frozen=True)
class Recipe:
    """A validated fine-tuning recipe."""

    model: ModelSection
    data: DataSection
    train: TrainSection
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    passkey: PasskeySection = field(default_factory=PasskeySection)
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

    def tasp_options(self) -> Any:
        """The ``parallel`` section's TASP fields as one ``TaspOptions`` (defaults < environment < recipe)."""
        from megatron_tasp.options import TaspOptionError, parse_options

        p = self.parallel
        given = {name: getattr(p, name) for name in TASP_FIELDS}
        given["num_rings"] = self.num_rings
        if p.topology:
            given["topology"] = _expand(p.topology)
        try:
            return parse_options(given, where=f"{self.source}: parallel")
        except TaspOptionError as exc:
            raise RecipeError(str(exc)) from None  # names the recipe file and section

    @property
    def pad_multiple(self) -> int:
        """Packed documents are padded to a multiple of this (``data.pad_multiple``, or its default).

        The THD split needs a multiple of 2 * cp (with sequence parallelism Megatron would need tp * 2 * cp;
        finetune runs tp = 1). The default, 16 rounded up to a multiple of 2 * cp, keeps the packs (and so the
        data order) the same at cp 1, 2, 4 and 8, which lets a checkpoint resume at another CP size on the same
        samples.
        """
        if self.data.pad_multiple is not None:
            return self.data.pad_multiple
        unit = 2 * self.parallel.cp
        wide = -(-16 // unit) * unit
        return wide if self.data.seq_length % wide == 0 else unit

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


def _build_section(cls: type, raw: Any, source: str, section: str) -> Any:
    try:
        return build(cls, raw, source, section)
    except SchemaError as exc:
        raise RecipeError(str(exc)) from None


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
    sections = {sec: _build_section(cls, raw.get(sec), source, sec) for sec, cls in SECTIONS.items()}
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
    rope_problem = rope_scaling_problem(m, p.cp)
    if rope_problem:
        raise RecipeError(f"{src}: {rope_problem}")
    if m.position_embedding == "learned_absolute" and (m.max_position_embeddings or d.seq_length) < d.seq_length:
        raise RecipeError(f"{src}: model.max_position_embeddings={m.max_position_embeddings} is smaller than "
                          f"data.seq_length={d.seq_length}")
    if tok.type == "huggingface" and not tok.name:
        raise RecipeError(f"{src}: tokenizer.name is required for tokenizer.type: huggingface "
                          "(a model name such as meta-llama/Meta-Llama-3-8B or a local directory)")
    if tok.type == "byte" and m.vocab_size != "auto" and int(m.vocab_size) < 256:
        raise RecipeError(f"{src}: model.vocab_size={m.vocab_size} is smaller than the byte tokenizer's 256 ids")
    if d.source in ("files", "jsonl", "indexed") and not d.path:
        raise RecipeError(f"{src}: data.path is required for data.source: {d.source}")
    if d.source == "stdlib" and d.path:
        raise RecipeError(f"{src}: data.path is only used with data.source files, jsonl or indexed (got source "
                          "stdlib)")
    _check_documents(r)
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
    if d.packing and d.pad_multiple is not None and (d.pad_multiple % (2 * p.cp) or d.seq_length % d.pad_multiple):
        raise RecipeError(f"{src}: data.pad_multiple={d.pad_multiple} must be a multiple of 2 * parallel.cp = "
                          f"{2 * p.cp} (the THD split) and divide data.seq_length={d.seq_length}; or set it to null")
    if p.cp_backend == "ring" and p.num_rings not in (None, 1):
        raise RecipeError(f"{src}: parallel.cp_backend: ring uses one ring; remove parallel.num_rings "
                          f"(got {p.num_rings}) or use cp_backend: tasp")
    r.tasp_options()
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
    _check_evaluation(r)


def _check_evaluation(r: Recipe) -> None:
    """Loss-by-position buckets and the passkey check."""
    src, d, t, pk = r.source, r.data, r.train, r.passkey
    if t.eval_position_spacing == "linear" and t.eval_position_buckets > d.seq_length:
        raise RecipeError(f"{src}: train.eval_position_buckets={t.eval_position_buckets} linear buckets exceed "
                          f"data.seq_length={d.seq_length} tokens; use fewer buckets")
    if t.eval_position_view == "document" and not d.packing:
        raise RecipeError(f"{src}: train.eval_position_view: document needs data.packing: true (windows mix documents "
                          "under one causal mask); use eval_position_view: sequence")
    if pk.lengths is None:
        return
    group = 2 * r.parallel.cp
    for n in pk.lengths:
        if n < group or n % group:
            raise RecipeError(f"{src}: passkey.lengths: {n} must be a positive multiple of 2 * parallel.cp = {group} "
                              "(every CP rank holds two equal chunks of the prompt)")
    table = r.model.max_position_embeddings or d.seq_length
    if r.model.position_embedding == "learned_absolute" and max(pk.lengths) > table:
        raise RecipeError(f"{src}: passkey.lengths: {max(pk.lengths)} exceeds the learned position table "
                          f"({table}; model.max_position_embeddings); use lengths up to {table}")
    if len(set(pk.lengths)) != len(pk.lengths) or len(set(pk.depths)) != len(pk.depths):
        raise RecipeError(f"{src}: passkey.lengths and passkey.depths must not repeat a value")
    if not all(0.0 <= x <= 1.0 for x in pk.depths):
        raise RecipeError(f"{src}: passkey.depths must be in [0, 1], got {pk.depths}")


def _check_documents(r: Recipe) -> None:
    """The data section's document options: SFT, indexed datasets and their blend weights."""
    d, src = r.data, r.source
    if d.format == "sft" and d.source != "jsonl":
        raise RecipeError(f"{src}: data.format: sft reads prompt/response pairs from JSON lines; set data.source: "
                          f"jsonl (got {d.source})")
    if d.format == "sft" and not d.packing:
        raise RecipeError(f"{src}: data.format: sft needs data.packing: true (each pair is a document with its own "
                          "attention mask and loss mask)")
    if d.source == "indexed" and d.max_bytes is not None:
        raise RecipeError(f"{src}: data.max_bytes limits text read from files/jsonl; indexed datasets are read "
                          "whole (remove data.max_bytes)")
    if d.weights is not None:
        if d.source != "indexed":
            raise RecipeError(f"{src}: data.weights blends indexed datasets; set data.source: indexed or remove "
                              "data.weights")
        prefixes = d.path if isinstance(d.path, list) else [d.path]
        if len(d.weights) != len(prefixes):
            raise RecipeError(f"{src}: data.weights has {len(d.weights)} entries but data.path {len(prefixes)} "
                              "prefixes; give one weight per prefix")
        if not all(w > 0 for w in d.weights):
            raise RecipeError(f"{src}: data.weights must all be > 0, got {d.weights}")


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
    """Folder of the shipped recipe YAML files: the package resources ``megatron_tasp.configs`` of an installed
    (or editable) package, else the ``configs/`` folder of a source checkout on ``sys.path``."""
    try:
        return Path(str(resources.files("megatron_tasp.configs") / "recipes"))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[3] / "configs" / "recipes"


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
        if len(parts) not in (2, 3) or parts[0] not in SECTIONS:
            raise RecipeError(f"override '{item}': key must be section.field (or section.field.key of a nested "
                              f"field, e.g. model.rope_scaling.factor) with section one of {', '.join(SECTIONS)} "
                              f"(or one of {', '.join(TOP_LEVEL)})")
        sec, name, *sub = parts
        allowed = [f.name for f in dataclasses.fields(SECTIONS[sec])]
        if name not in allowed:
            raise RecipeError(f"override '{item}': unknown field {sec}.{name}; allowed: {', '.join(allowed)}")
        section = _mapping_at(out, sec, item, source)
        if sub:
            nested = typing.get_type_hints(SECTIONS[sec])[name]
            if not dataclasses.is_dataclass(nested):
                raise RecipeError(f"override '{item}': {sec}.{name} has no fields; use {sec}.{name}=VALUE")
            inner = [f.name for f in dataclasses.fields(nested)]
            if sub[0] not in inner:
                raise RecipeError(f"override '{item}': unknown field {sec}.{name}.{sub[0]}; allowed: "
                                  f"{', '.join(inner)}")
            section, name = _mapping_at(section, name, item, source, f"{sec}.{name}"), sub[0]
        section[name] = parse_value(value)
    return out


def _mapping_at(parent: dict[str, Any], key: str, item: str, source: str, what: str = "") -> dict[str, Any]:
    """``parent[key]`` as a mapping (created when missing or null) for an override."""
    value = parent.get(key)
    if value is None:
        value = parent[key] = {}
    if not isinstance(value, dict):
        raise RecipeError(f"override '{item}': {what or 'section ' + key} is not a mapping in "
                          f"{source or 'the recipe'}")
    return value


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
    lines = [f"{k}: ...  # {doc}" for k, doc in TOP_LEVEL.items()]
    for sec, cls in SECTIONS.items():
        lines.extend(listing(sec, cls))
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_RECIPE", "SECTIONS", "CheckpointSection", "DataSection", "LoggingSection", "ModelSection",
           "ParallelSection", "PasskeySection", "Recipe", "RecipeError", "apply_overrides", "list_recipes",
           "load_recipe", "parse_value", "recipe_from_dict", "recipe_path", "recipes_dir", "schema_text",
           "TokenizerSection", "TrainSection", "validate"]
