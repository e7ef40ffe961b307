"""Training Aligners: one engine (`engine.fit`, `engine.evaluate`) for every objective (`objectives`: SFT, correction,
DPO, KTO, distillation, GRPO), the run directory and its resumable state (`state`), the flags as dataclasses
(`config`), and the whole run that the finetune/ scripts call (`run.train`)."""

from lit_aligner.training.config import (DistillConfig, DistillRunConfig, DistillTrainConfig, DPOLossConfig,
                                         DPORunConfig, DPOTrainConfig, GRPOConfig, GRPORunConfig, GRPOTrainConfig,
                                         KTOLossConfig, KTORunConfig, RunConfig,
                                         SFTRunConfig, TrainConfig, TrainError)
from lit_aligner.training.engine import FitResult, evaluate, fit, lr_at
from lit_aligner.training.objectives import OBJECTIVES, Objective, ObjectiveModule, get_objective, register
from lit_aligner.training.run import train

__all__ = ["DistillConfig", "DistillRunConfig", "DistillTrainConfig",
           "DPOLossConfig", "DPORunConfig", "DPOTrainConfig", "FitResult", "GRPOConfig", "GRPORunConfig",
           "GRPOTrainConfig", "KTOLossConfig", "KTORunConfig",
           "OBJECTIVES", "Objective", "ObjectiveModule",
           "RunConfig", "SFTRunConfig", "TrainConfig", "TrainError", "evaluate", "fit", "get_objective", "lr_at",
           "register", "train"]
