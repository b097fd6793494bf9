"""respec: exact, adaptive speculative decoding for the rollout phase of RL fine-tuning (ReSpec)."""

from respec.engine.checkpoint import load_model, save_model
from respec.engine.drafter import Eagle3Drafter, init_drafter, load_drafter, save_drafter
from respec.engine.generate import (
    Engine,
    GenerationResult,
    RequestOutput,
    SequenceOutput,
    SpecConfig,
    StepStats,
)
from respec.engine.model import ModelConfig, Transformer, init_model
from respec.engine.sampling import SamplingParams
from respec.engine.tuner import Tuner, TunerConfig
from respec.errors import RespecError

__all__ = [
    "Eagle3Drafter", "Engine", "GenerationResult", "ModelConfig", "RequestOutput", "RespecError", "SamplingParams",
    "SequenceOutput", "SpecConfig", "StepStats", "Transformer", "Tuner", "TunerConfig", "init_drafter",
    "init_model", "load_drafter", "load_model", "save_drafter", "save_model",
]
