"""megatron-normistral: continual pretraining of Mistral-NeMo for the languages of Norway."""

__version__ = "0.1.0"
