"""SFT -> RLVR -> OPSD in one command (``megatron-opsd pipeline``): stages exchange HF exports."""
from megatron_opsd.pipeline.config import PipelineConfig, StageConfig, load_pipeline_config
from megatron_opsd.pipeline.runner import PipelineError, run_pipeline

__all__ = ["PipelineConfig", "StageConfig", "load_pipeline_config", "run_pipeline", "PipelineError"]
