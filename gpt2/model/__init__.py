"""GPT-2 and what runs inside it: the model (gpt.py: config, blocks, weights in and out), the fused loss, the FP8
matmuls, the KV-cache sampler and its log-probabilities, and the checked reading of model files.

The model knows nothing of training, data or Hydra. `from gpt2.model import GPT, GPTConfig` is the public API.
"""

from gpt2.model.gpt import GPT, GPT2_VOCAB_SIZE, PRESETS, Attention, GPTConfig, Loss  # noqa: F401 (the API)
