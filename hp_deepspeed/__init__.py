"""hp-deepspeed: multi-task T5 fine-tuning with HyperPrompt task-conditioning on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
