"""References "module:attr": what Python callables become, and the one-line refusals of what
other processes could not import (lambdas, closures, a script's objects)."""

import functools
import sys
import types

import pytest

from impala import config, refs
from impala.distributions import ActionSpec
from impala.errors import ConfigError
from impala.examples import custom_net, envs


def test_a_top_level_function_or_class_becomes_its_reference_and_resolves_back():
    assert refs.reference_to(custom_net.build, "x") == "impala.examples.custom_net:build"
    assert refs.reference_to(custom_net.TwoTowerMLP, "x") == (
        "impala.examples.custom_net:TwoTowerMLP"
    )
    assert refs.resolve("impala.examples.custom_net:build", "x") is custom_net.build
    assert refs.resolve("impala.examples.envs:NoisyObservations.observation", "x") is (
        envs.NoisyObservations.observation
    )


def _one_line_error(call, *args) -> str:
    with pytest.raises(ConfigError) as err:
        call(*args)
    line = str(err.value)
    assert "\n" not in line and line, line
    return line


def test_what_other_processes_cannot_import_is_refused_in_one_line(monkeypatch):
    def nested(observation_space, action_spec, config):
        return None

    line = _one_line_error(refs.reference_to, lambda *a: None, "--net")
    assert line.startswith("--net: a lambda cannot be imported") and "top level of a module" in line
    line = _one_line_error(refs.reference_to, nested, "--net")
    assert "is defined inside a function" in line and "test_what_other" in line
    line = _one_line_error(
        refs.reference_to, functools.partial(custom_net.build, hidden=3), "--net"
    )
    assert "a partial object cannot be given by reference" in line
    line = _one_line_error(
        refs.reference_to, custom_net.TwoTowerMLP(2, ActionSpec.discrete(2), 2, 1), "--net"
    )
    assert "a TwoTowerMLP object cannot be given by reference" in line

    # a script run by path: its objects live in __main__, which has no importable name
    script = types.ModuleType("__main__")
    script.__spec__ = None
    exec("def build(observation_space, action_spec, config): pass", script.__dict__)
    monkeypatch.setitem(sys.modules, "__main__", script)
    line = _one_line_error(refs.reference_to, script.build, "--net")
    assert "defined in the script being run (__main__)" in line and "move it into a module" in line
    # ... but `python -m package.module` has one: other processes import it by that name
    script.__spec__ = types.SimpleNamespace(name="mypkg.train")
    assert refs.reference_to(script.build, "--net") == "mypkg.train:build"


def test_a_function_replaced_after_its_definition_is_refused():
    def wrapper(*args):
        return custom_net.build(*args)

    wrapper.__module__, wrapper.__qualname__ = "impala.examples.custom_net", "build"
    line = _one_line_error(refs.reference_to, wrapper, "--net")
    assert "does not import back as the object given" in line


@pytest.mark.parametrize(
    "reference, message",
    [
        ("no_such_module_x:build", "cannot import module 'no_such_module_x' for network"),
        ("impala.examples.custom_net:nope", "module 'impala.examples.custom_net' has no attribute"),
        ("impala.examples.custom_net:TwoTowerMLP.nope", "has no attribute 'TwoTowerMLP.nope'"),
        ("__main__:build", "module '__main__' is the script being run"),
        ("build", "is not a reference 'package.module:attr'"),
        ("a b:c", "is not a reference"),
    ],
)
def test_unresolvable_references_are_one_line(reference, message):
    assert message in _one_line_error(refs.resolve, reference, f"network '{reference}'")


def test_a_module_that_fails_to_import_names_the_missing_package(tmp_path, monkeypatch):
    (tmp_path / "needs_a_package.py").write_text("import a_package_not_installed_here\n")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('no licence file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = _one_line_error(refs.resolve, "needs_a_package:build", "network")
    assert "module 'a_package_not_installed_here' is not installed" in line
    line = _one_line_error(refs.resolve, "raises_on_import:build", "network")
    assert "raised RuntimeError: no licence file" in line


def test_config_turns_callables_into_references_and_kwargs_into_json():
    cfg = config.Config(
        env=envs.make_cartpole, env_kwargs={"noise": 0.1}, net=custom_net.build, net_kwargs={}
    )
    assert cfg.env == "impala.examples.envs:make_cartpole"
    assert cfg.net == "impala.examples.custom_net:build"
    assert config.Config(**__import__("json").loads(cfg.to_json())) == cfg  # config.json's
    resolved = config.resolve({"env": envs.make_cartpole, "net": custom_net.build})
    assert (resolved.env, resolved.net) == (cfg.env, cfg.net)
    line = _one_line_error(lambda: config.Config(env_kwargs=[1]))
    assert "--env-kwargs must be a JSON object of keyword arguments, got [1]" in line
    line = _one_line_error(lambda: config.Config(net=lambda *a: None))
    assert line.startswith("--net: a lambda cannot be imported")
    line = _one_line_error(lambda: config.Config(env_kwargs={"size": {1, 2}}))
    assert "--env-kwargs must hold JSON values only" in line
    line = _one_line_error(lambda: config.Config(env_kwargs={"not an identifier": 1}))
    assert "names must be identifiers" in line
