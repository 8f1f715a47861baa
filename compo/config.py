"""Run configuration: the pydantic models of every section, loaded from YAML with CLI overrides.

The models live in :mod:`compo.core.config` (everything in compo stands on them); this module is
the public name users import them by, and re-exports them unchanged."""

from compo.core.config import (  # noqa: F401
    TRACKERS, BCOConfig, ConfigError, DataConfig, EvalConfig, KTOConfig, LoggingConfig, ModelConfig, NoiseConfig,
    OracleConfig, PeftConfig, RunConfig, SplitConfig, Stage1Config, ToyDataConfig, ToyModelConfig, ZOConfig,
    apply_overrides, dump_config, load_config, parse_override, reference_table,
)
