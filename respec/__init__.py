"""respec: exact, adaptive speculative decoding for the rollout phase of RL fine-tuning (ReSpec)."""

from respec.drafter import Eagle3Drafter, init_drafter, load_drafter, save_drafter
from respec.engine import Engine, GenerationResult, SequenceOutput, StepStats
from respec.errors import RespecError
from respec.model import ModelConfig, Transformer, init_model, load_model, save_model
from respec.sampling import SamplingParams, SpecConfig

__all__ = [
    "Eagle3Drafter", "Engine", "GenerationResult", "ModelConfig", "RespecError", "SamplingParams",
    "SequenceOutput", "SpecConfig", "StepStats", "Transformer", "init_drafter", "init_model", "load_drafter",
    "load_model", "save_drafter", "save_model",
]
