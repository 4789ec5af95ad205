"""The GPT of "Let's build GPT" and its layers: the attention layer, the linear and dropout layers
whose kernels are chosen per call (fastgpt.model.kernels), and the KV cache of generation."""

from fastgpt.model.attention import CausalSelfAttention
from fastgpt.model.gpt import GPT, BigramLanguageModel, LanguageModel, ModelConfig, build_model, num_parameters

__all__ = ["BigramLanguageModel", "CausalSelfAttention", "GPT", "LanguageModel", "ModelConfig", "build_model",
           "num_parameters"]
