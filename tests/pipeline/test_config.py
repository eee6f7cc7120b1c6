"""The job spec: YAML/flags -> JobSpec, and every bad input named with its fix."""

import pytest

from pipeline.cli import args_to_dict, build_parser, spec_from_args
from pipeline.config import JobSpec, dump_yaml, load_yaml, spec_from_dict
from pipeline.errors import VlmqError


def _spec(**recipe):
    return spec_from_dict({"model": "m", "out": "o", "recipe": recipe})


def test_defaults_are_w4_g128_rtn_asym():
    s = _spec()
    assert (s.recipe.method, s.recipe.wbits, s.recipe.group_size, s.recipe.sym, s.recipe.abits) == ("rtn", 4, 128, False, 16)
    assert s.calib.num_samples == 128 and s.calib.seed == 42


def test_unknown_key_names_key_and_nearest():
    with pytest.raises(VlmqError) as e:
        spec_from_dict({"model": "m", "out": "o", "recipe": {"wbit": 3}})
    assert "recipe.wbit" in e.value.problem and "recipe.wbits" in e.value.fix
    with pytest.raises(VlmqError) as e:
        spec_from_dict({"modle": "m", "out": "o"})
    assert "'modle'" in e.value.problem and "'model'" in e.value.fix


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_bad_wbits(bits):
    with pytest.raises(VlmqError, match="--wbits"):
        _spec(wbits=bits)


def test_bad_group_size():
    with pytest.raises(VlmqError, match="--group-size"):
        _spec(group_size=100)


def test_w4a8_forces_per_channel_symmetric_and_rejects_group_size():
    s = _spec(wbits=4, abits=8)
    assert s.recipe.group_size is None and s.recipe.sym
    with pytest.raises(VlmqError, match="per output channel"):
        _spec(wbits=4, abits=8, group_size=128)
    with pytest.raises(VlmqError, match="--wbits 4"):
        _spec(wbits=3, abits=8)


def test_type_errors_are_named():
    with pytest.raises(VlmqError, match="recipe.wbits.*number"):
        _spec(wbits="four")
    with pytest.raises(VlmqError, match="recipe.sym.*true or false"):
        _spec(sym="maybe")


def test_flags_override_yaml(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: /m\nout: /o\nrecipe:\n  method: awq\n  wbits: 3\ncalib:\n  num_samples: 64\n")
    ns = build_parser().parse_args(["quantize", str(job), "--wbits", "4", "--group-size", "channel"])
    s = spec_from_args(ns)
    assert s.recipe.method == "awq" and s.recipe.wbits == 4 and s.recipe.group_size is None
    assert s.calib.num_samples == 64 and s.model == "/m"


def test_only_given_flags_reach_the_spec():
    ns = build_parser().parse_args(["quantize", "--model", "x", "--out", "y", "--no-clip"])
    assert args_to_dict(ns) == {"model": "x", "out": "y", "recipe": {"clip": False}}


def test_yaml_round_trip(tmp_path):
    s = _spec(method="mbq", wbits=3)
    p = tmp_path / "s.yaml"
    p.write_text(dump_yaml(s))
    assert spec_from_dict(load_yaml(p)) == s


def test_missing_model_is_named():
    ns = build_parser().parse_args(["quantize", "--out", "y"])
    with pytest.raises(VlmqError, match="no model"):
        spec_from_args(ns)


def test_work_dir_default_is_beside_output():
    assert str(JobSpec(model="m", out="/x/ckpt").work_path) == "/x/ckpt.work"
