"""The library stands alone: it needs torch and nothing else, and never imports the app.

Each library package is imported in a fresh interpreter (a module imported once stays imported, so
one process cannot test this twice). ``import torch`` itself may load some of the packages we
watch (torch.hub imports tqdm when it is installed), so what counts is what the library loads on
top of torch. The sources are also read: no library module may import ``conditioner.app``, not
even lazily inside a function.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import conditioner

PACKAGE = Path(conditioner.__file__).parent
LIBRARY = [
    "conditioner",
    "conditioner.blocks",
    "conditioner.checks",
    "conditioner.progress",
    "conditioner.optim",
    "conditioner.linalg",
    "conditioner.distributed",
    "conditioner.distributed.checkpoint",
    "conditioner.curvature",
    "conditioner.solvers",
    "conditioner.influence",
]
APP_ONLY = ("matplotlib", "sklearn", "rdata", "pandas", "tqdm", "scipy", "conditioner.app")

PROBE = """
import json, sys
import torch
before = set(sys.modules)
import importlib
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _loaded_on_top_of_torch(module: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, module], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("module", LIBRARY)
def test_importing_the_library_loads_no_app_dependency(module):
    loaded = _loaded_on_top_of_torch(module)
    assert module in loaded or module == "conditioner"
    offending = [name for name in loaded if name.split(".")[0] in APP_ONLY or name.startswith("conditioner.app")]
    assert offending == []


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_library_module_imports_the_app_or_its_dependencies():
    library_files = [p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts]
    assert len(library_files) > 30  # the walk really found the library
    offending = {}
    for path in library_files:
        bad = sorted(
            name
            for name in _imported_modules(path)
            if name.startswith("conditioner.app") or name.split(".")[0] in APP_ONLY
        )
        if bad:
            offending[str(path.relative_to(PACKAGE))] = bad
    assert offending == {}


def test_the_library_declares_torch_as_its_only_requirement():
    from importlib.metadata import requires

    unconditional = [r for r in requires("conditioner") or [] if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in unconditional] == ["torch"]


WORKLOAD = """
import sys, tempfile, warnings
for name in ("numpy", "tqdm", "matplotlib", "sklearn", "scipy", "pandas", "rdata"):
    sys.modules[name] = None  # importing any of them now raises ImportError
warnings.simplefilter("ignore")  # torch warns once that it runs without numpy
import torch
from torch import nn
from conditioner import SOAP, EigenvalueCorrectedShampoo, Muon, Shampoo, state_memory
from conditioner.curvature import GGN, lanczos
from conditioner.distributed import checkpoint
from conditioner.influence import InfluenceContext, Task, draw_subsets, influence, linear_datamodeling_score, retrain
from conditioner.influence.scores import train_batches
from conditioner.solvers import solve

torch.manual_seed(0)
x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
for optimizer_type in (SOAP, EigenvalueCorrectedShampoo, Shampoo, Muon):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = optimizer_type(model.parameters(), lr=1e-2)
    for _ in range(12):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert state_memory(optimizer) is not None
data = train_batches(x, y, 8)
ggn = GGN(model, nn.CrossEntropyLoss(), data)
assert lanczos(ggn, 2, generator=torch.Generator().manual_seed(0)).eigenvalues.isfinite().all()
assert solve(ggn, torch.randn(ggn.dim), 0.1, method="cg").residuals[-1].max() < 1e-3
scores = influence(InfluenceContext(model, Task.classification(), data), (x[:3], y[:3]), method="ekfac").scores
subsets = draw_subsets(32, 4, 0.5, seed=0)
with tempfile.TemporaryDirectory() as folder:
    measured = retrain(subsets, 1, lambda mask, seed: scores[:, mask].sum(1).double(), folder, key="k")
    checkpoint.save(folder + "/checkpoint", optimizer, model)
    assert checkpoint.load(folder + "/checkpoint", optimizer, model) == 1
assert linear_datamodeling_score(scores, subsets, measured).per_query.shape == (3,)
print("ok")
"""


def test_the_library_works_with_torch_alone():
    """Optimizers, curvature, solvers, influence, LDS and checkpoints run with numpy and every app
    dependency made unimportable: a torch-only install is enough."""
    result = subprocess.run([sys.executable, "-c", WORKLOAD], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
