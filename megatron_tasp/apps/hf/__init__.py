"""Hugging Face Llama-family weights <-> Megatron-Core GPTModel checkpoints of ``megatron-tasp finetune``.

- :mod:`.config`: ``config.json`` <-> the recipe's model section (pure Python);
- :mod:`.weights`: tensor names and layouts (fused QKV per query group, SwiGLU ``[gate; up]``, norms, vocabulary
  padding; torch only);
- :mod:`.io`: safetensors (single file or sharded) and tokenizer files;
- :mod:`.convert`: import into / export from Megatron distributed checkpoints through the app's GPTModel;
- :mod:`.start`: ``checkpoint.pretrained: hf:DIR`` and ``checkpoint.export_hf`` inside a fine-tuning run.

Command line: ``megatron-tasp convert hf-to-mcore HF_DIR OUT_DIR`` and ``megatron-tasp convert mcore-to-hf
CKPT_DIR OUT_DIR`` (:mod:`megatron_tasp.apps.convert`).
"""
