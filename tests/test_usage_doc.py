"""docs/usage.md lists every argument of `HessianDiagnostics` and `Monitor`, and no other: each
signature line names the parameters in order with their defaults, and the argument tables together
hold every parameter once."""

import ast
import inspect
import re
from pathlib import Path

import pytest

import hessdiag
from hessdiag.callbacks import HessianDiagnostics

USAGE = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
CLASSES = {"HessianDiagnostics": HessianDiagnostics, "Monitor": hessdiag.Monitor}


def signature_line(name):
    """The documented signature `name(...)` (the longest call of `name` opening a line) as
    (parameter, default) pairs, in order."""
    text = max(re.findall(rf"^`{name}\((.*?)\)`", USAGE, flags=re.M | re.S), key=len)
    arguments = ast.parse(f"def f({text}): pass").body[0].args
    names = [a.arg for a in arguments.posonlyargs + arguments.args] + [a.arg for a in arguments.kwonlyargs]
    positional_defaults = [inspect.Parameter.empty] * (len(arguments.args) - len(arguments.defaults))
    defaults = positional_defaults + [ast.literal_eval(d) for d in arguments.defaults]
    defaults += [inspect.Parameter.empty if d is None else ast.literal_eval(d) for d in arguments.kw_defaults]
    return list(zip(names, defaults))


def table_arguments(heading_after):
    """The parameters named in the first column of the first argument table after `heading_after`."""
    section = USAGE[USAGE.index(heading_after) :]
    table = re.search(r"^\| argument \| default \| meaning \|\n\|---\|---\|---\|\n((?:\|.*\n)+)", section, flags=re.M)
    names = []
    for row in table.group(1).splitlines():
        names += re.findall(r"`(\w+)`", row.split("|")[1])
    return names


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_signature_line_is_the_signature(name):
    actual = [(p.name, p.default) for p in inspect.signature(CLASSES[name]).parameters.values()]
    assert signature_line(name) == actual


def test_the_callback_table_holds_every_argument_once():
    documented = table_arguments("## Attach it to a Lightning run")
    assert sorted(documented) == sorted(inspect.signature(HessianDiagnostics).parameters)


def test_the_monitor_table_holds_what_the_callback_table_does_not():
    shared = set(table_arguments("## Attach it to a Lightning run"))
    own = table_arguments("## The plain-PyTorch API")
    assert len(own) == len(set(own))
    parameters = set(inspect.signature(hessdiag.Monitor).parameters)
    assert set(own) <= parameters  # no documented argument that does not exist
    assert parameters - set(own) <= shared  # every other one is in the callback's table
