"""Helpers for the Megatron integration tests: a reference CP attention and a tiny CPU GPTModel harness.

The reference attention all-gathers K/V with a hand-written autograd Function (all_gather forward, sum of
the gradient over ranks and own slice backward; torch.distributed.nn.functional.all_gather gave wrong
dK/dV on gloo) and applies the causal mask by global (zigzag) token position. It is the oracle for the
adapter while ``megatron_tasp.attention`` is missing, and a cross-check afterwards.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
import types
from typing import Any

import torch
import torch.distributed as dist

# ------------------------------------------------------------------------------------------------------------
# Reference context-parallel attention (zigzag layout).
# ------------------------------------------------------------------------------------------------------------


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward sums the gradient over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def zigzag_positions(rank: int, cp: int, s_local: int) -> torch.Tensor:
    """Global token positions held by CP rank ``rank``: chunks r and 2cp-1-r of 2cp chunks."""
    if cp == 1:
        return torch.arange(s_local)
    c = s_local // 2
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)])


CALLS: list[dict[str, Any]] = []


def reference_cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: Any, *,
                           causal: bool = True, softmax_scale: float | None = None, **options: Any) -> torch.Tensor:
    """Exact attention for sbhd zigzag shards ([s_local, b, h, d], k/v [s_local, b, h_kv, d]); fp32 math."""
    CALLS.append({"causal": causal, "softmax_scale": softmax_scale, "cp": 1 if cp_group is None else
                  dist.get_world_size(cp_group), **options})
    s_local, _, h, d = q.shape
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        qpos = kpos = torch.arange(s_local)
        kg, vg = k, v
    else:
        cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
        qpos = zigzag_positions(rank, cp, s_local)
        kpos = torch.cat([zigzag_positions(j, cp, s_local) for j in range(cp)])
        kg, vg = _GatherSeq.apply(k, cp_group), _GatherSeq.apply(v, cp_group)
    rep = h // k.shape[2]
    qf = q.float().permute(1, 2, 0, 3)                                   # b h s d
    kf = kg.float().repeat_interleave(rep, dim=2).permute(1, 2, 0, 3)
    vf = vg.float().repeat_interleave(rep, dim=2).permute(1, 2, 0, 3)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vf)               # b h s d
    return out.permute(2, 0, 1, 3).to(q.dtype)


def real_attention_available() -> bool:
    """Whether megatron_tasp.attention.tasp_attention exists (the real TASP implementation)."""
    try:
        mod = importlib.import_module("megatron_tasp.attention")
    except ImportError:
        return False
    return hasattr(mod, "tasp_attention") and not getattr(mod, "_IS_REFERENCE", False)


def install_reference_attention() -> types.ModuleType:
    """Put the reference attention in sys.modules as ``megatron_tasp.attention`` (call in the parent)."""
    mod = types.ModuleType("megatron_tasp.attention")
    mod.tasp_attention = reference_cp_attention
    mod._IS_REFERENCE = True
    sys.modules["megatron_tasp.attention"] = mod
    return mod


# ------------------------------------------------------------------------------------------------------------
# Megatron import and a tiny GPTModel.
# ------------------------------------------------------------------------------------------------------------


def import_megatron() -> Any:
    """Enable the CPU shims and import megatron.core (call pytest.importorskip first)."""
    from megatron_tasp.megatron.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    import megatron.core

    return megatron.core


def megatron_version() -> str:
    from megatron.core import package_info

    return str(package_info.__version__)


def tiny_config(cp: int, *, num_layers: int = 2, hidden: int = 64, heads: int = 4, groups: int = 2,
                **overrides: Any) -> Any:
    """A small fp32 CPU TransformerConfig with dropout 0 and fusions off."""
    from megatron.core.transformer import TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        use_cpu_initialization=True, params_dtype=torch.float32, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, attention_dropout=0.0, hidden_dropout=0.0, context_parallel_size=cp,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def cp_slice(batch: dict[str, torch.Tensor], cp_group: Any) -> dict[str, torch.Tensor]:
    """Megatron's own zigzag split (get_batch_on_this_cp_rank; its signature differs across versions)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    params = inspect.signature(get_batch_on_this_cp_rank).parameters
    batch = {k: v.clone() for k, v in batch.items()}
    if "is_hybrid_cp" in params:
        return get_batch_on_this_cp_rank(batch, False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)


def make_batch(seq: int, batch: int = 2, vocab: int = 256, seed: int = 7) -> dict[str, torch.Tensor]:
    """Random tokens, next-token labels and positions, [b, s]."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "position_ids": torch.arange(seq).expand(batch, seq).contiguous()}


def gpt_step_worker(rank: int, world: int, opts: dict[str, Any]) -> dict[str, Any]:
    """One forward+backward of a tiny GPTModel at CP = world; returns full-order loss and summed grads."""
    import_megatron()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_tasp.megatron.spec import gpt_tasp_local_spec
    from megatron_tasp.options import parse_options

    seed = opts.get("seed", 1234)
    parallel_state.initialize_model_parallel(context_parallel_size=world)
    try:
        model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)
        cfg_over = dict(opts.get("config", {}))
        config = tiny_config(world, **cfg_over)
        for key, val in opts.get("config_attrs", {}).items():  # e.g. the refused old config.tasp_* way
            setattr(config, key, val)
        options = parse_options(opts["options"]) if "options" in opts else None
        spec = opts.get("spec") or gpt_tasp_local_spec(config, options=options)
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=opts.get("vocab", 256),
                         max_sequence_length=opts["seq"], position_embedding_type=opts.get("position", "rope"))
        full = make_batch(opts["seq"], vocab=opts.get("vocab", 256))
        cp_group = parallel_state.get_context_parallel_group()
        local = cp_slice(full, cp_group) if world > 1 else full
        loss = model(input_ids=local["tokens"], position_ids=local["position_ids"], attention_mask=None,
                     labels=local["labels"])                              # [b, s_local]
        total = full["tokens"].numel()
        (loss.sum() / total).backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            g = g.detach().clone()
            if world > 1:
                dist.all_reduce(g, group=cp_group)
            grads[name] = g
        s_local = loss.shape[1]
        parts = [torch.empty_like(loss) for _ in range(world)]
        dist.all_gather(parts, loss.detach().contiguous(), group=cp_group)
        full_loss = torch.empty(loss.shape[0], opts["seq"])
        for r, part in enumerate(parts):
            full_loss[:, zigzag_positions(r, world, s_local)] = part
        kinds = sorted({type(m).__name__ for m in model.modules() if "DotProductAttention" in type(m).__name__})
        return {"loss": full_loss, "grads": grads if rank == 0 else None, "calls": list(CALLS[-2:]),
                "core_attention": kinds}
    finally:
        parallel_state.destroy_model_parallel()


def max_grad_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest |a - b| relative to max(1e-3, |b|.max()) over parameters, with the parameter's name."""
    worst, where = 0.0, ""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for name in a:
        denom = max(1e-3, float(b[name].abs().max()))
        err = float((a[name] - b[name]).abs().max()) / denom
        if err > worst:
            worst, where = err, name
    return worst, where


#: The smallest recipe the data tests build on: one layer, CP=2, one step; they vary its data section.
TINY_RECIPE: dict[str, Any] = {
    "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64},
    "parallel": {"cp": 2},
    "train": {"steps": 1},
}


def tiny_recipe(base_data: dict[str, Any], **data: Any) -> Any:
    """:data:`TINY_RECIPE` with the data section ``base_data`` updated by ``data`` (a validated Recipe)."""
    from megatron_tasp.apps.finetune_lib.recipe import recipe_from_dict

    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"] = {**base_data, **data}
    return recipe_from_dict(raw)


def require_megatron() -> Any:
    """Skip the calling test module unless megatron.core imports; install the CPU shims first."""
    import pytest

    from megatron_tasp.megatron.cpu_compat import enable_cpu_megatron, prepare_megatron_import

    prepare_megatron_import()
    core = pytest.importorskip("megatron.core")
    enable_cpu_megatron()
    return core


def require_hf_checkpointing() -> Any:
    """Skip the calling test module unless megatron.core, transformers, safetensors and psutil import and the
    checkpoint writer works from forked ranks (not on megatron-core 0.16); returns the transformers module."""
    import pytest

    require_megatron()
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    pytest.importorskip("psutil", reason="megatron.core.dist_checkpointing needs psutil to save checkpoints")
    if megatron_version().startswith("0.16."):
        pytest.skip("megatron-core 0.16's checkpoint writer starts worker processes, which the forked test ranks "
                    "(daemons) cannot", allow_module_level=True)
    return transformers


def has_megatron_training() -> bool:
    """Whether the installed megatron-core wheel ships megatron.training (0.17 and later)."""
    import importlib.util

    try:
        return importlib.util.find_spec("megatron.training") is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------------------
# Megatron-LM (megatron.training) probes, run in a fresh interpreter by the patch / launcher tests.
# ------------------------------------------------------------------------------------------------------------

BASE_LM_ARGV = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
                "--num-query-groups", "2", "--seq-length", "64", "--max-position-embeddings", "64",
                "--micro-batch-size", "1", "--transformer-impl", "local", "--position-embedding-type", "rope",
                "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
                "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm", "--hidden-dropout", "0.0",
                "--use-cpu-initialization"]


def _prepare_training_import(patched_root: str | None) -> Any:
    """Make megatron.training importable on Python 3.11 / CPU (optionally from a patched copy)."""
    import typing

    if patched_root:
        sys.path.insert(0, patched_root)
    if not hasattr(typing, "override"):  # megatron.training uses typing.override (Python 3.12)
        try:
            import typing_extensions

            typing.override = typing_extensions.override
        except ImportError:
            typing.override = lambda f: f
    import_megatron()
    import megatron.training.arguments as margs

    if patched_root:
        assert margs.__file__.startswith(patched_root), margs.__file__
    return margs


def _build_core_attention_kinds(model_cfg: Any) -> list[str]:
    """Build the model of a Megatron-LM GPTModelConfig on a 1-rank gloo world; return core attention classes
    (the modules are kept in ``BUILT_CORE_ATTENTIONS``)."""
    import datetime
    import os

    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models.gpt import GPTModelBuilder

    from megatron_tasp.launch import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    parallel_state.initialize_model_parallel()
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    model = GPTModelBuilder(model_cfg).build_model(pgc, pre_process=True, post_process=True)
    BUILT_CORE_ATTENTIONS[:] = [m.self_attention.core_attention for m in model.decoder.layers]
    return [type(m).__name__ for m in BUILT_CORE_ATTENTIONS]


BUILT_CORE_ATTENTIONS: list[Any] = []


def _built_options() -> list[dict[str, Any]]:
    """The TaspOptions (as plain dicts) of the last built model's TASP core attentions."""
    return [m.options.to_dict() for m in BUILT_CORE_ATTENTIONS if hasattr(m, "options")]


def patched_training_probe(patched_root: str) -> dict[str, Any]:
    """Parse/validate the patch's flags with Megatron-LM's own parser and build a GPT model with its builder."""
    import os

    margs = _prepare_training_import(patched_root)
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    out: dict[str, Any] = {}

    def parse(extra: list[str]) -> Any:
        sys.argv = ["pretrain_gpt.py", *BASE_LM_ARGV, *extra]
        return margs.parse_args()

    a = parse(["--context-parallel-backend", "allgather"])
    margs._validate_context_parallel_backend(a)
    out["allgather"] = a.cp_comm_type
    a = parse(["--cp-comm-type", "allgather"])
    margs._validate_context_parallel_backend(a)
    out["cp_comm_allgather"] = a.cp_comm_type
    a = parse(["--context-parallel-backend", "tasp", "--attention-dropout", "0.0", "--tasp-num-rings", "auto",
               "--tasp-transport", "p2p", "--tasp-chunks", "2", "--tasp-keep-kv", "0"])
    margs.validate_args(a, {})
    out["tasp"] = [a.cp_comm_type, a.tasp_enabled, a.tasp_num_rings, a.tasp_transport]
    out["tasp_chunks_keep"] = [a.tasp_chunks, a.tasp_keep_kv]
    out["tasp_options"] = a.tasp_options.to_dict()
    out["tasp_mask_in_dataloader"] = a.create_attention_mask_in_dataloader
    try:
        parse(["--context-parallel-backend", "tasp", "--tasp-keep-kv", "sometimes"])
        out["bad_keep_kv"] = "accepted"
    except SystemExit as exc:
        out["bad_keep_kv"] = f"SystemExit {exc.code}"
    for name, extra in (("dropout", ["--context-parallel-backend", "tasp"]),
                        ("local", ["--context-parallel-backend", "tasp", "--attention-dropout", "0.0",
                                   "--attention-backend", "local", "--spec", "local"])):
        try:
            margs.validate_args(parse(extra), {})
            out[name] = "accepted"
        except Exception as exc:  # noqa: BLE001
            out[name] = f"{type(exc).__name__}: {exc}"
    os.environ["WORLD_SIZE"] = "2"
    margs.get_device_arch_version = lambda: 10  # skip Megatron's Hopper check on this CPU machine
    for backend in ("ring", "tasp", "a2a"):
        a = parse(["--context-parallel-size", "2", "--context-parallel-backend", backend, "--attention-dropout", "0.0"])
        margs.validate_args(a, {})
        out[f"cp2_{backend}"] = a.cp_comm_type
    try:
        margs.validate_args(parse(["--context-parallel-size", "2", "--context-parallel-backend", "a2a+p2p"]), {})
        out["a2a+p2p"] = "accepted"
    except Exception as exc:  # noqa: BLE001
        out["a2a+p2p"] = f"{type(exc).__name__}: {exc}"

    os.environ["WORLD_SIZE"] = "1"
    from megatron.training.argument_utils import gpt_config_from_args

    a = parse(["--context-parallel-backend", "tasp", "--attention-dropout", "0.0", "--tasp-num-rings", "1",
               "--tasp-transport", "p2p"])
    margs.validate_args(a, {})
    a.padded_vocab_size = 256
    model_cfg = gpt_config_from_args(a)
    out["config_cp_comm_type"] = model_cfg.transformer.cp_comm_type
    out["config_tasp_attrs"] = sorted(k for k in vars(model_cfg.transformer) if k.startswith("tasp_"))
    from megatron.training.global_vars import set_args

    set_args(a)  # the patched builder reads the options from Megatron-LM's global args
    out["kinds"] = _build_core_attention_kinds(model_cfg)
    out["built_options"] = [(o["num_rings"], o["transport"]) for o in _built_options()]
    return out


COMBO_ARGV: dict[str, list[str]] = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "recompute_selective": ["--recompute-granularity", "selective"],
    "recompute_full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1"],
    "distributed_optimizer": ["--use-distributed-optimizer"],
    "moe": ["--num-experts", "4", "--moe-router-topk", "2"],
    "moe_tp2_sp": ["--num-experts", "4", "--moe-router-topk", "2", "--tensor-model-parallel-size", "2",
                   "--sequence-parallel"],
}


def tasp_combinations_probe(patched_root: str) -> dict[str, Any]:
    """The patched Megatron-LM's own parse_args + validate_args with ``--context-parallel-backend tasp`` at
    CP 2 and each of COMBO_ARGV: 'accepted' with what validation left in the args, or the error."""
    import os

    margs = _prepare_training_import(patched_root)
    margs.get_device_arch_version = lambda: 10  # skip Megatron's Hopper check on this CPU machine
    out: dict[str, Any] = {}
    for name, extra in COMBO_ARGV.items():
        tp = 2 if "2" in extra else 1
        os.environ.update(WORLD_SIZE=str(2 * tp), RANK="0", LOCAL_RANK="0")
        sys.argv = ["pretrain_gpt.py", *BASE_LM_ARGV, "--context-parallel-size", "2", "--context-parallel-backend",
                    "tasp", "--attention-dropout", "0.0", "--tasp-num-rings", "1", "--tasp-chunks", "2", *extra]
        try:
            a = margs.parse_args()
            margs.validate_args(a, {})
            out[name] = {"result": "accepted", "tp": a.tensor_model_parallel_size, "cp": a.context_parallel_size,
                         "cp_comm_type": a.cp_comm_type, "sequence_parallel": a.sequence_parallel,
                         "recompute": [a.recompute_granularity, a.recompute_method],
                         "distributed_optimizer": a.use_distributed_optimizer, "num_experts": a.num_experts,
                         "options": a.tasp_options.to_dict()}
        except BaseException as exc:  # noqa: BLE001 - SystemExit from argparse included
            out[name] = {"result": f"{type(exc).__name__}: {exc}"}
    return out


FAKE_PRETRAIN_GPT = '''
"""Stand-in for Megatron-LM's pretrain_gpt.py (0.19 names) that records what pretrain() receives."""
import time
_PROGRAM_START_TIME = time.time()
from megatron.training import inprocess_restart, set_startup_timestamps
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
has_nvidia_modelopt = False
CAPTURED = {}


def train_valid_test_datasets_provider(num_samples, vp_stage=None):
    raise AssertionError("not called in the test")


def forward_step(data_iterator, model, return_schedule_plan=False):
    raise AssertionError("not called in the test")


def get_embedding_ranks(pp_ranks):
    return pp_ranks


def pretrain(full_config, *args, **kwargs):
    CAPTURED["config"] = full_config
    CAPTURED["args"] = args
    CAPTURED["kwargs"] = kwargs
'''


def launcher_probe(fake_root: str, extra: list[str]) -> dict[str, Any]:
    """Run megatron_tasp.megatron.pretrain_gpt.main() against a fake pretrain_gpt.py; build the model."""
    import os

    _prepare_training_import(None)
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MEGATRON_LM_PATH=fake_root)
    sys.argv = ["pretrain_gpt.py", *BASE_LM_ARGV, "--vocab-size", "256", "--tokenizer-type", "NullTokenizer", *extra]
    from megatron_tasp.megatron import pretrain_gpt as launcher

    launcher.main()
    pg = sys.modules["pretrain_gpt"]
    from megatron.training.global_vars import get_args

    args = get_args()
    cfg = pg.CAPTURED["config"]
    model_cfg = cfg.model if hasattr(cfg, "model") else cfg.model_config
    model_cfg.vocab_size = 256
    return {"cp_comm_type": args.cp_comm_type, "tasp_enabled": getattr(args, "tasp_enabled", None),
            "positional": [getattr(f, "__name__", str(f)) for f in pg.CAPTURED["args"]],
            "kwargs": sorted(pg.CAPTURED["kwargs"]), "kinds": _build_core_attention_kinds(model_cfg),
            "transport": [o["transport"] for o in _built_options()],
            "config_tasp_attrs": sorted(k for k in vars(model_cfg.transformer) if k.startswith("tasp_")),
            "mask_in_dataloader": getattr(args, "create_attention_mask_in_dataloader", None)}


def spec_flag_probe(spec_fn: str) -> dict[str, Any]:
    """Unpatched Megatron-LM: ``--cp-comm-type tasp --spec megatron_tasp.megatron.spec <fn>``; build the model."""
    import os

    margs = _prepare_training_import(None)
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    sys.argv = ["pretrain_gpt.py", *BASE_LM_ARGV, "--cp-comm-type", "tasp", "--attention-dropout", "0.0",
                "--spec", "megatron_tasp.megatron.spec", spec_fn]
    a = margs.parse_args()
    margs.validate_args(a, {})
    a.padded_vocab_size = 256
    from megatron.training.argument_utils import gpt_config_from_args

    return {"kinds": _build_core_attention_kinds(gpt_config_from_args(a))}


def run_probe(expr: str, timeout: float = 180.0) -> dict[str, Any]:
    """Run ``tests.megatron_helpers.<expr>`` in a fresh interpreter (cwd: repo root); return its JSON result."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = f"import json, tests.megatron_helpers as H; print('PROBE-RESULT ' + json.dumps(H.{expr}))"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE-RESULT "):
            return json.loads(line[len("PROBE-RESULT "):])
    raise AssertionError(f"probe failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def patched_thd_probe(patched_root: str) -> dict[str, Any]:
    """The patched Megatron-LM: packed-data flags through its own validate_args with TASP at CP 2, and the
    builder's installation of TASP's per-document batch split (megatron.core.utils)."""
    import os

    margs = _prepare_training_import(patched_root)
    margs.get_device_arch_version = lambda: 10  # skip Megatron's Hopper check on this CPU machine
    out: dict[str, Any] = {}
    for name, extra in (("sft", ["--sft"]),
                        ("idm", ["--dataloader-inter-document-masking",
                                 "--position-embedding-type", "learned_absolute"]),
                        ("idm_rope", ["--dataloader-inter-document-masking"]),
                        ("sft_idm", ["--sft", "--dataloader-inter-document-masking"])):
        os.environ.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
        sys.argv = ["pretrain_gpt.py", *BASE_LM_ARGV, "--context-parallel-size", "2", "--context-parallel-backend",
                    "tasp", "--attention-dropout", "0.0", *extra]
        try:
            a = margs.parse_args()
            margs.validate_args(a, {})
            out[name] = ["accepted", a.cp_comm_type, a.tasp_enabled, a.tasp_options.packed_split]
        except BaseException as exc:  # noqa: BLE001 - SystemExit / AssertionError from Megatron included
            out[name] = [f"{type(exc).__name__}: {exc}"]
    import megatron.core.transformer.attention as mattention
    import megatron.core.utils as mutils

    before = mutils._get_batch_on_this_cp_rank_per_document_balancing.__module__
    rope_before = mattention.apply_rotary_pos_emb.__module__
    os.environ["WORLD_SIZE"] = "1"
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.global_vars import set_args

    sys.argv = ["pretrain_gpt.py", *BASE_LM_ARGV, "--context-parallel-backend", "tasp", "--attention-dropout", "0.0",
                "--sft"]
    a = margs.parse_args()
    margs.validate_args(a, {})
    a.padded_vocab_size = 256
    set_args(a)
    out["kinds"] = _build_core_attention_kinds(gpt_config_from_args(a))
    out["split"] = [before, mutils._get_batch_on_this_cp_rank_per_document_balancing.__module__]
    out["rope"] = [rope_before, mattention.apply_rotary_pos_emb.__module__]
    return out


def launcher_thd_probe(fake_root: str, extra: list[str]) -> dict[str, Any]:
    """:func:`launcher_probe`, plus which module's per-document CP split megatron.core.utils then uses, and
    whose RoPE Megatron-Core's attention calls."""
    out = launcher_probe(fake_root, extra)
    import megatron.core.transformer.attention as mattention
    import megatron.core.utils as mutils

    out["split"] = mutils._get_batch_on_this_cp_rank_per_document_balancing.__module__
    out["rope"] = mattention.apply_rotary_pos_emb.__module__
    return out
