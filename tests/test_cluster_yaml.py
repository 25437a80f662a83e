import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_rays_own_schema_check():
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))  # what `ray up` does before its check
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    assert any("make install" in c for c in config["setup_commands"])


def test_the_schema_check_rejects_a_broken_config():
    broken = copy.deepcopy(yaml.safe_load(CLUSTER_YAML.read_text()))
    broken["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
