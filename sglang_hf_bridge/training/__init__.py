"""Forward-only training on the engine: MeZO as a drop-in HF Trainer, prompt-based heads."""

from ..errors import DataParallelError  # also sglang_hf_bridge.training.distributed.DataParallelError
from .data import load_lmbff_tsv
from .mezo import MeZOTrainer, MeZOTrainingArguments, negative_accuracy, step_seed
from .prompts import PromptClassifier, PromptCollator, PromptTemplate, accuracy_metrics

__all__ = ["DataParallelError", "MeZOTrainer", "MeZOTrainingArguments", "PromptClassifier", "PromptCollator",
           "PromptTemplate", "accuracy_metrics", "load_lmbff_tsv", "negative_accuracy", "step_seed"]
