"""primekd: knowledge distillation of LLMs with response-priming prompts."""

__version__ = "0.1.0"
