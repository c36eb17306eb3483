"""The sections of a fine-tuning recipe: frozen dataclasses whose fields declare type, default and meaning
once (``megatron-tasp finetune --schema`` and docs/FINETUNE.md are generated from them). Pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_tasp.schema import option

# -> one TaspOptions
TASP_FIELDS = ("num_rings", "topology", "transport", "chunks", "keep_kv", "kernel", "packed_dense_rows",
               "packed_kernel")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE context extension, keyed like a Hugging Face config's rope_scaling; each kind takes only its keys."""

    rope_type: str = option("none", "none, linear (position interpolation), llama3 (Llama 3.1's frequency bands) "
                            "or yarn (YaRN); Hugging Face's 'default' is none",
                            choices=("none", "linear", "llama3", "yarn"))
    factor: float | None = option(None, "linear, llama3, yarn (required): context extension factor", min=1.0)
    original_max_position_embeddings: int | None = option(None, "llama3, yarn (required): the context length the "
                                                          "model was pretrained at", min=1)
    low_freq_factor: float | None = option(None, "llama3 (required): wavelengths longer than original / "
                                           "low_freq_factor are divided by factor (Llama 3.1: 1)", gt=0.0)
    high_freq_factor: float | None = option(None, "llama3 (required): wavelengths shorter than original / "
                                            "high_freq_factor are kept, those between are blended (Llama 3.1: 4)",
                                            gt=0.0)
    beta_fast: float | None = option(None, "yarn: dimensions turning more than beta_fast times over the original "
                                     "context keep their frequency; null = 32", gt=0.0)
    beta_slow: float | None = option(None, "yarn: dimensions turning fewer than beta_slow times are fully "
                                     "interpolated; null = 1", gt=0.0)
    mscale: float | None = option(None, "yarn: with mscale_all_dim, attention factor (0.1 mscale ln(factor) + 1) / "
                                  "(0.1 mscale_all_dim ln(factor) + 1); both null = 0.1 ln(factor) + 1", gt=0.0)
    mscale_all_dim: float | None = option(None, "yarn: see mscale (set both or neither)", gt=0.0)
    truncate: bool | None = option(None, "yarn: round the interpolation ramp's ends to whole dimensions; null = "
                                   "true")


@dataclass(frozen=True)
class ModelSection:
    """Shape of the GPT (Megatron-Core GPTModel)."""

    num_layers: int = option(None, "transformer layers", min=1, required=True)
    hidden_size: int = option(None, "model width", min=1, required=True)
    num_attention_heads: int = option(None, "query heads", min=1, required=True)
    num_query_groups: int | None = option(None, "KV heads (GQA); null = num_attention_heads (MHA)", min=1)
    ffn_hidden_size: int = option(None, "MLP width (per branch for swiglu)", min=1, required=True)
    kv_channels: int | None = option(None, "head dim; null = hidden_size / num_attention_heads", min=1)
    vocab_size: int | Literal["auto"] = option("auto", "'auto' = the tokenizer's vocabulary padded to "
                                               "vocab_multiple, or an integer >= the tokenizer's vocabulary", min=1)
    vocab_multiple: int = option(128, "padding multiple for vocab_size: auto", min=1)
    position_embedding: str = option("rope", "position embedding", choices=("rope", "learned_absolute"))
    rotary_base: float = option(10000.0, "RoPE theta (Llama 3: 500000)", min=1.0)
    rotary_percent: float = option(1.0, "fraction of the head dim that RoPE rotates", min=0.0)
    rope_scaling: RopeScaling = option(RopeScaling(), "RoPE context extension (position_embedding: rope)")
    max_position_embeddings: int | None = option(None, "learned_absolute table size; null = data.seq_length", min=1)
    normalization: str = option("RMSNorm", "normalization layer", choices=("RMSNorm", "LayerNorm"))
    norm_epsilon: float = option(1e-5, "epsilon of the normalization", min=0.0)
    activation: str = option("swiglu", "MLP activation (swiglu = gated SiLU, Llama)", choices=("swiglu", "gelu"))
    add_bias_linear: bool = option(False, "biases in linear layers")
    add_qkv_bias: bool = option(False, "biases on the query/key/value projection only (Qwen2); add_bias_linear "
                                "puts them on every linear layer")
    tie_embeddings: bool = option(False, "share input embedding and output layer weights")
    init_std: float = option(0.02, "std of the normal weight initialisation", min=0.0)
    spec: str = option("local", "Megatron layer spec with TASP core attention: local (any device) or te (Transformer "
                       "Engine linears/norms, GPU; checkpoint keys are the same)", choices=("local", "te"))


@dataclass(frozen=True)
class TokenizerSection:
    """How text becomes token ids."""

    type: str = option("byte", "byte (built-in: UTF-8 bytes, vocabulary 256, id 0 separates documents) or "
                       "huggingface (AutoTokenizer, imported only when used)", choices=("byte", "huggingface"))
    name: str | None = option(None, "huggingface: model name or local path (e.g. meta-llama/Meta-Llama-3-8B)")


@dataclass(frozen=True)
class DataSection:
    """Training text and sequence length."""

    source: str = option("stdlib", "stdlib (this Python's standard-library .py files), files (path or glob of text "
                         "files), jsonl (one JSON object per line) or indexed (Megatron .bin/.idx datasets; "
                         "megatron-tasp preprocess writes them)", choices=("stdlib", "files", "jsonl", "indexed"))
    path: str | list[str] | None = option(None, "files/jsonl: a path, a glob (**, ~ and $VARS expand) or a list "
                                          "of them; indexed: one or more .bin/.idx path prefixes")
    weights: list[float] | None = option(None, "indexed: blend weights, one per data.path prefix (sampling shares; "
                                         "null = in proportion to each prefix's sequences)")
    format: str = option("text", "text (every token is trained on) or sft (jsonl: prompt_field + response_field; "
                         "the loss covers the response and its end-of-document id only)", choices=("text", "sft"))
    text_field: str = option("text", "jsonl: the field holding the text")
    prompt_field: str = option("prompt", "sft: the field holding the prompt (no loss on its tokens)")
    response_field: str = option("response", "sft: the field holding the response (trained on)")
    max_bytes: int | None = option(None, "read at most this many bytes of text (null = all)", min=1)
    seq_length: int = option(None, "tokens per training sequence (a multiple of 2 * parallel.cp)", min=2,
                             required=True)
    packing: bool = option(True, "each sequence packs whole documents (each file / JSON object / indexed document "
                           "is one) with per-document attention masks, positions restarting at 0 and padding out "
                           "of the loss; false = fixed windows over the concatenated token stream")
    pad_multiple: int | None = option(None, "packing: every document is padded to a multiple of this (a multiple of "
                                      "2 * parallel.cp dividing seq_length); null = the least multiple of 2 * cp "
                                      ">= 16 when it divides seq_length (the same packs at cp 1, 2, 4 and 8), else "
                                      "2 * cp", min=1)
    eval_fraction: float = option(0.02, "share of the sequences held out for evaluation", min=0.0)
    cache_dir: str | None = option(None, "where the tokenized corpus is cached (null = "
                                   "<logging.output_dir>/data_cache)")


@dataclass(frozen=True)
class ParallelSection:
    """Process layout (world size = tp * cp * dp) and TASP's options (null = TASP's default or its
    MEGATRON_TASP_* environment variable)."""

    tp: int = option(1, "tensor-parallel size (only 1 is supported by finetune)", min=1)
    cp: int = option(1, "context-parallel size: each sequence is split over cp ranks (zigzag)", min=1)
    dp: int | None = option(None, "data-parallel size; null = world_size / (tp * cp) under torchrun/srun; when "
                            "finetune starts the ranks itself: all visible GPUs (a multiple of tp * cp), or 1 on CPU",
                            min=1)
    cp_backend: str = option("tasp", "tasp (multi-ring) or ring (TASP with one ring = zigzag ring attention)",
                             choices=("tasp", "ring"))
    num_rings: int | Literal["auto"] | None = option(None, "TASP rings per step; null = the most the topology "
                                                     "offers; auto = the cost model's choice", min=1)
    topology: str | None = option(None, "topology preset (configs/topologies) or YAML file describing the CP group; "
                                  "its GPU count must equal cp (null = one all-to-all node)")
    transport: str | None = option(None, "how KV pieces move: auto, a2a (all_to_all_single), p2p (batched "
                                   "isend/irecv) or symm (copy-engine pushes into symmetric memory; one NVLink node)",
                                   choices=("auto", "a2a", "p2p", "symm"))
    chunks: int | Literal["auto"] | None = option(None, "messages per KV piece and step (kernels start as each "
                                                  "lands; more launches; TASP's default 1); 'auto' asks the cost "
                                                  "model", min=1)
    keep_kv: bool | Literal["auto"] | None = option(None, "keep the forward's KV pieces for the backward: auto "
                                                    "(TASP's default: up to 64 MiB per layer call), true (no KV "
                                                    "exchange in the backward; costs (cp-1) x the local K/V per "
                                                    "layer) or false")
    kernel: str | None = option(None, "TASP block-attention kernel (null = chosen at run time)")
    packed_dense_rows: int | None = option(None, "data.packing on CUDA: documents of at least this many rows of a "
                                           "rank's own block run on the dense kernel (cuDNN on Hopper), padded to "
                                           "one of 8 sizes per power of two, instead of the varlen launch; faster "
                                           "for long documents at cp 1 and at 128K tokens per sequence at cp 2 "
                                           "(null = TASP's default: none)", min=1)
    packed_kernel: Literal["auto", "cudnn", "flash"] | None = option(
        None, "data.packing on CUDA: the varlen attention kernel: cudnn (cuDNN's ragged attention; Hopper, needs "
        "nvidia-cudnn-frontend), flash (FlashAttention-2) or auto (cuDNN where it can serve; null = TASP's default: "
        "auto)")
    device: str = option("auto", "auto (cuda when available), cuda or cpu", choices=("auto", "cuda", "cpu"))


@dataclass(frozen=True)
class TrainSection:
    """Optimizer, schedule and batch."""

    steps: int = option(None, "optimizer steps; the LR schedule spans them", min=1, required=True)
    global_batch: int = option(1, "sequences per optimizer step (a multiple of dp * micro_batch)", min=1)
    micro_batch: int = option(1, "sequences per forward/backward on one DP rank (the rest is gradient "
                              "accumulation)", min=1)
    precision: str = option("fp32", "fp32, or bf16 (bf16 weights and activations, fp32 master weights and "
                            "optimizer)", choices=("fp32", "bf16"))
    recompute: str = option("none", "activation recomputation: none, selective (core attention) or full (every "
                            "layer)", choices=("none", "selective", "full"))
    optimizer: str = option("adamw", "optimizer: AdamW (on GPUs Megatron-Core's, see distributed_optimizer)",
                            choices=("adamw",))
    distributed_optimizer: bool = option(False, "GPU: shard the fp32 master weights and optimizer state over the "
                                         "dp * cp ranks (Megatron's distributed optimizer; its resume is not exact "
                                         "with megatron-core 0.19 without Apex/TE, docs/FINETUNE.md); CPU: ignored")
    lr: float = option(3e-4, "peak learning rate", min=0.0)
    min_lr: float = option(0.0, "learning rate at the end of the cosine decay (an absolute value)", min=0.0)
    schedule: str = option("cosine", "cosine (linear warmup, cosine decay to min_lr at the last step) or constant "
                           "(after warmup)", choices=("cosine", "constant"))
    warmup_steps: int = option(0, "linear warmup steps", min=0)
    betas: list[float] = option([0.9, 0.95], "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon", min=0.0)
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (not applied to 1-D weights: norms, biases)",
                                 min=0.0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)", min=0.0)
    eval_interval: int = option(0, "evaluate every N steps (held-out loss, passkey check; 0 = only before the first "
                                "and after the last step)", min=0)
    eval_batches: int = option(0, "held-out sequences per evaluation (0 = no held-out loss)", min=0)
    eval_position_buckets: int = option(8, "held-out loss by position: the sequence cut into this many buckets "
                                        "(token p's loss predicts token p+1 from tokens 0..p; 0 = off)", min=0)
    eval_position_spacing: str = option("log2", "bucket edges: log2 (0, seq/2^(n-1), ..., seq/4, seq/2, seq; "
                                        "fewer buckets when seq < 2^(n-1)) or linear (n equal buckets)",
                                        choices=("log2", "linear"))
    eval_position_view: str = option("sequence", "position of a token: sequence (its index in the training "
                                     "sequence) or document (its index in its own packed document: the context it "
                                     "sees; needs data.packing)", choices=("sequence", "document"))


@dataclass(frozen=True)
class PasskeySection:
    """Passkey retrieval at every evaluation: a 5-digit pass key hidden in filler text, scored in one forward."""

    lengths: list[int] | None = option(None, "prompt lengths in tokens, each a multiple of 2 * parallel.cp "
                                       "(null = no passkey check)")
    depths: list[float] = option([0.0, 0.25, 0.5, 0.75, 1.0], "where the pass key sits: the share of the filler "
                                 "before it (0 = the start, 1 = just before the question)")
    trials: int = option(4, "prompts (random pass keys) per length and depth", min=1)


@dataclass(frozen=True)
class CheckpointSection:
    """Megatron distributed checkpoints (megatron.core.dist_checkpointing)."""

    save: bool = option(True, "write checkpoints")
    dir: str | None = option(None, "checkpoint directory (null = <logging.output_dir>/checkpoints)")
    interval: int = option(0, "save every N steps (0 = only at the end)", min=0)
    save_at_end: bool = option(True, "save after the last step (and when --max-steps stops the run)")
    keep_last: int = option(2, "keep the newest N checkpoints (0 = keep all)", min=0)
    resume: str = option("auto", "auto (continue from dir/latest when it exists), never, or a checkpoint path to "
                         "continue from (model, optimizer, step, data position, RNG)")
    pretrained: str | None = option(None, "weights to start from when not resuming (fine-tuning): a checkpoint "
                                    "dir, or hf:DIR (a Hugging Face Llama/Mistral/Qwen2 directory, converted on the "
                                    "fly into <logging.output_dir>/hf_import; the model section must match its "
                                    "config.json); optimizer and step start fresh")
    export_hf: str | None = option(None, "write the final weights as a Hugging Face directory here (rank 0, after "
                                   "the last step: safetensors, config.json, tokenizer files of a local "
                                   "huggingface tokenizer)")


@dataclass(frozen=True)
class LoggingSection:
    """Console, metrics and plot."""

    output_dir: str = option("runs/finetune", "metrics.json, loss.png, the data cache and (by default) checkpoints")
    interval: int = option(1, "print a log line every N steps", min=1)
    progress_bar: bool = option(True, "tqdm progress bar on rank 0 (when tqdm is installed and stderr is a "
                                "terminal)")
    plot: bool = option(True, "write loss.png (when matplotlib is installed)")


SECTIONS: dict[str, type] = {
    "model": ModelSection, "tokenizer": TokenizerSection, "data": DataSection, "parallel": ParallelSection,
    "train": TrainSection, "passkey": PasskeySection, "checkpoint": CheckpointSection, "logging": LoggingSection,
}
TOP_LEVEL = {"name": "recipe name (free text)", "description": "what the recipe is for (free text)",
             "seed": "seed of weight initialisation and data order (integer)"}

__all__ = ["SECTIONS", "TASP_FIELDS", "TOP_LEVEL", "CheckpointSection", "DataSection", "LoggingSection",
           "ModelSection", "ParallelSection", "PasskeySection", "RopeScaling", "TokenizerSection", "TrainSection"]
