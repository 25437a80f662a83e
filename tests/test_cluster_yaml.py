import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.mark.parametrize("path", [CLUSTER_YAML, *sorted((ROOT / "clusters").glob("*.yaml"))], ids=lambda p: p.name)
def test_every_cluster_file_passes_rays_own_schema_check(path):
    config = prepare_config(yaml.safe_load(path.read_text()))  # what `ray up` does before its check
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    setups = {name: node.get("worker_setup_commands", config["setup_commands"] + config["worker_setup_commands"])
              for name, node in config["available_node_types"].items() if name != config["head_node_type"]}
    setups[config["head_node_type"]] = config["setup_commands"] + config["head_setup_commands"]
    for name, commands in setups.items():  # every node installs the project; GPU nodes keep the CUDA torch
        assert any("make" in c and "install" in c for c in commands), name
        assert any(".venv/bin" in c and "~/.bashrc" in c for c in commands), name  # `ray down` runs a bare `ray stop`
        assert ("cpu-torch" in " ".join(commands)) == ("gpu" not in name), name
    # Ray's token auth on every node: the launcher's token copied over, every `ray start` in token mode.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)


def test_the_schema_check_rejects_a_broken_config():
    broken = copy.deepcopy(yaml.safe_load(CLUSTER_YAML.read_text()))
    broken["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
