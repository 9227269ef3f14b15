"""fedsb: federated fine-tuning of language models with LoRA-SB (Fed-SB)."""

__version__ = "0.1.0"
