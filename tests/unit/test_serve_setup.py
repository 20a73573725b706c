"""What mtl-serve checks before it starts Triton: the stub environment imports each runtime the repository needs."""

import os
import shutil
import sys

import pytest

from mtl_build import pbtxt
from mtl_serve.health import CANARY_REQUEST_ID, canary_request
from mtl_serve.local import runtime_modules
from mtl_serve.runtime import ServerError, check_stub_environment


def _python_without(tmp_path, module: str):
    """A python3 for which `module` cannot be imported (as in an environment whose wheel does not load)."""
    wrapper = tmp_path / "python3"
    wrapper.write_text(
        f'#!/bin/sh\nexec {sys.executable} -c "import sys; sys.modules[\'{module}\'] = None; exec(sys.argv[1])" "$2"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def test_this_environment_passes_with_every_runtime():
    version = check_stub_environment(os.path.join(sys.prefix, "bin", "python3"), ("openvino", "onnxruntime"))
    assert int(version.split(".")[0]) < 2


def test_a_runtime_that_does_not_import_is_refused_before_triton_starts(tmp_path):
    python = _python_without(tmp_path, "openvino")
    assert check_stub_environment(python, ())  # the runtime is not needed: fine
    with pytest.raises(ServerError, match="openvino"):
        check_stub_environment(python, ("openvino",))


def test_the_runtimes_a_repository_needs_follow_its_config(built_repository, test_config, tmp_path):
    name = test_config.serving.model_name
    assert runtime_modules(built_repository) == ()  # the tests' project serves torch
    copy = tmp_path / "repo"
    shutil.copytree(built_repository / name, copy / name, symlinks=True)
    for runtime, expected in (("onnxruntime", ("onnxruntime",)), ("openvino", ("openvino",)), ("auto", ("openvino",))):
        config = pbtxt.read_config(copy / name)
        config["parameters"]["runtime"] = {"string_value": runtime}
        pbtxt.write_config(config, copy / name / "config.pbtxt")
        assert runtime_modules(copy) == expected, runtime


def test_the_watchdog_canary_carries_the_id_the_model_does_not_count():
    from multitask_core.metrics import UNCOUNTED_REQUEST_ID

    assert CANARY_REQUEST_ID == UNCOUNTED_REQUEST_ID
    assert b'"id": "mtl-serve-canary"' in canary_request(
        {"max_batch_size": 4, "input": [{"name": "TEXT", "data_type": "TYPE_STRING", "dims": ["1"]}]}
    )
