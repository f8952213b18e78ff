"""Configuration: the typed loader (load.py), the program's sections (program.py) and the stages'
own (vlm.py, lm.py). Import from here: `from lumo_ray.config import LumoConfig, load_config`."""
from .lm import LMConfig, TokenLMConfig
from .load import ConfigError, build, dump_config, load_config, merge_overrides, parse_override, to_dict
from .program import (DEFAULT_SPECIALS, AudioCodecTrainConfig, AudioConfig, AuditConfig, CodecTrainConfig, DataConfig,
                      DemoConfig, GenerateConfig, ImageConfig, KMeansFitConfig, LumoConfig, NormalizeConfig, RuntimeConfig, ServeConfig, TextConfig,
                      TokenizeConfig, TokenSpaceConfig, TrackingConfig, UTIConfig, VerifyConfig)
from .vlm import VLMConfig

__all__ = ["AudioCodecTrainConfig", "AudioConfig", "AuditConfig", "CodecTrainConfig", "ConfigError", "DEFAULT_SPECIALS",
           "DataConfig", "DemoConfig", "GenerateConfig", "ImageConfig", "KMeansFitConfig", "LMConfig", "LumoConfig", "NormalizeConfig", "RuntimeConfig",
           "ServeConfig", "TextConfig",
           "TokenLMConfig", "TokenSpaceConfig", "TokenizeConfig", "TrackingConfig", "UTIConfig", "VLMConfig",
           "VerifyConfig", "build", "dump_config", "load_config", "merge_overrides", "parse_override", "to_dict"]
