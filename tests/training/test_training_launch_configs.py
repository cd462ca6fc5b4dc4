"""The accelerate launch configs under deploy/accelerate load with accelerate's own (key-strict) loader and name
modules that exist."""

from __future__ import annotations

from pathlib import Path

import diffusers.models.transformers.transformer_flux as flux
import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

from dsd_model.training.sharding import BLOCKS

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "accelerate"


@pytest.mark.parametrize(("name", "kind"), [("ddp", DistributedType.MULTI_GPU), ("fsdp", DistributedType.FSDP),
                                            ("deepspeed-zero2", DistributedType.DEEPSPEED)])
def test_launch_config_loads(name, kind):
    config = ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind and config.num_machines == 1
    assert config.mixed_precision == "no", "precision comes from `dsd train --mixed-precision`"


def test_fsdp_wraps_the_flux_blocks():
    config = ClusterConfig.from_yaml_file(str(CONFIGS / "fsdp.yaml"))
    blocks = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert blocks == [cls.__name__ for cls in BLOCKS], "the blocks `dsd train --fsdp` shards"
    assert all(getattr(flux, block) in BLOCKS for block in blocks)
    assert config.fsdp_config["fsdp_version"] == 2, "`dsd train` gathers sharded parameters as FSDP2 holds them"


def test_deepspeed_is_zero_stage_2():
    assert ClusterConfig.from_yaml_file(str(CONFIGS / "deepspeed-zero2.yaml")).deepspeed_config["zero_stage"] == 2
