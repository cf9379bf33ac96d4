"""`hybridmig run`'s defaults are written once, in source/options.py."""

import dataclasses
import inspect

from hybridmig.cli.main import main
from hybridmig.source.migration import Migration
from hybridmig.source.options import DEFAULTS, RunOptions
from hybridmig.source.precopy import PreCopy

#: RunOptions field -> the `run` flag's parameter name
CLI_NAMES = {"target_downtime_ms": "target_downtime", "compress": "no_compress"}


def test_the_cli_flags_default_to_the_options():
    params = {p.name: p.default for p in main.commands["run"].params}
    for field in dataclasses.fields(RunOptions):
        default = params[CLI_NAMES.get(field.name, field.name)]
        want = getattr(DEFAULTS, field.name)
        if field.name == "compress":
            assert default is (not want)
        elif field.name == "bandwidth_limit":
            assert default == str(want)  # a size, "100M"
        elif field.name == "switchover":
            # resolved in run: DEFAULTS' for a process, precopy for a container
            assert default is None and want == "auto"
        else:
            assert default == want, field.name


def test_migration_and_precopy_default_to_the_options():
    for cls in (Migration, PreCopy):
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if hasattr(DEFAULTS, name):
                assert param.default == getattr(DEFAULTS, name), (cls.__name__, name)
