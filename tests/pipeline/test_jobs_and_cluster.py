"""The shipped cluster config and job files are valid for the tools that read them."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_yaml, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(config)  # raises on any schema violation
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0


def test_cluster_yaml_schema_rejects_a_typo():
    """The schema check above can fail: an unknown top-level key is refused."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_files_are_valid_specs(path):
    spec = spec_from_dict(load_yaml(path))
    assert spec.model and spec.out
