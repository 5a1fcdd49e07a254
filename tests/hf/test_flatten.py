"""The generated modeling file: flattened from the package, importing nothing a bare torch + transformers install
lacks, each top-level name defined once; and the flattener's refusals on small fake packages."""

import ast
import re
import textwrap

import pytest
from transformers.dynamic_module_utils import get_imports

from hybrid_lm.hf.flatten import ALLOWED_PACKAGES, FlattenError, build_modeling_source, bundle_modules


@pytest.fixture(scope="module")
def source():
    return build_modeling_source()


def test_every_top_level_name_is_defined_once(source):
    seen = {}
    for stmt in ast.parse(source).body:
        names = [stmt.name] if hasattr(stmt, "name") else [t.id for t in getattr(stmt, "targets", [])
                                                           if isinstance(t, ast.Name)]
        for name in names:
            assert name not in seen, f"{name} defined at lines {seen[name]} and {stmt.lineno}"
            seen[name] = stmt.lineno
    for name in ("HybridLMForCausalLM", "HybridLMCache", "HybridLM", "GatedDeltaNet", "DeepSeekSparseAttention",
                 "LightningIndexer", "gated_delta_rule", "sparse_attention", "lightning_indexer_topk"):
        assert name in seen


def test_imports_only_what_a_bare_install_has(source, tmp_path):
    path = tmp_path / "modeling_hybrid_lm.py"
    path.write_text(source)
    assert set(get_imports(path)) <= ALLOWED_PACKAGES  # what transformers checks before running remote code
    # older transformers scan the text with regexes after cutting try/except blocks: no line may name another package
    text = re.sub(r"\s*try\s*:.*?except.*?:", "", source, flags=re.DOTALL)
    found = re.findall(r"^\s*import\s+(\S+)\s*$", text, flags=re.MULTILINE)
    found += re.findall(r"^\s*from\s+(\S+)\s+import", text, flags=re.MULTILINE)
    assert {m.split(".")[0] for m in found if not m.startswith(".")} <= ALLOWED_PACKAGES
    relative = re.findall(r"^\s*from\s+(\.\S*)\s+import", source, flags=re.MULTILINE)
    assert relative == [".configuration_hybrid_lm"]
    assert "hybrid_lm" not in {m.split(".")[0] for m in found}


def test_optional_packages_only_inside_try_blocks(source):
    tree = ast.parse(source)
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for n in ast.walk(s)}
    optional = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and (getattr(n, "module", None) or n.names[0].name).split(".")[0] in ("fla", "flash_attn", "triton")]
    assert optional, "the fla / flash-attn fast paths should survive flattening"
    assert all(id(n) in guarded for n in optional)


def test_sections_follow_the_discovered_modules(source):
    modules = bundle_modules()
    headers = re.findall(r"^# ---- hybrid_lm/(\S+)\.py ----$", source, flags=re.MULTILINE)
    assert headers == [name.replace(".", "/") for name in modules]
    assert modules[-1] == "hf.modeling_hybrid_lm"
    for needed in ("ops.gated_delta_rule", "layers.dsa", "layers.gated_deltanet", "registry", "model.model"):
        assert needed in modules
    assert not any(name.startswith(("ops.triton", "model.io", "training", "data")) for name in modules)
    assert modules.index("registry") < modules.index("layers.attention") < modules.index("layers.dsa")
    assert "def _ops_attention_check_inputs(" in source and "def _ops_conv_check_inputs(" in source
    tree = ast.parse(source)
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "ops"]
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"attention", "sparse_attention", "gated_delta_rule", "causal_conv1d"} <= calls


def fake_package(tmp_path, files: dict):
    pkg = tmp_path / "fakepkg"
    for name, text in {"__init__.py": "", **files}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(text))
    return pkg


def flatten(pkg, root):
    return build_modeling_source("0", root=root, package_dir=pkg, drop={})


def test_fake_package_is_discovered_renamed_and_inlined(tmp_path):
    pkg = fake_package(tmp_path, {
        "ops/__init__.py": "from .a import double\nfrom .b import triple\nfrom . import extra as _extra\n",
        "ops/a.py": '"""a"""\nimport math\n\nSCALE = 2\n\ndef _check(x):\n    return x * SCALE\n\n'
                    'def double(x):\n    return _check(x)\n',
        "ops/b.py": '"""b"""\nimport math\n\nSCALE = 3\n\ndef _check(x):\n    return x * SCALE\n\n'
                    'def triple(x):\n    return _check(x) + math.floor(0.5)\n',
        "ops/extra.py": "import yaml\n",
        "plugins/__init__.py": "from .p1 import Plugin\n",
        "plugins/p1.py": "from ..registry import REGISTRY\n\nclass Plugin:\n    pass\n\nREGISTRY.append(Plugin)\n",
        "registry.py": "REGISTRY = []\n\ndef plugins():\n    from . import plugins  # noqa\n    return REGISTRY\n",
        "model.py": '"""m"""\nfrom . import ops\nfrom .registry import plugins\n\ndef both(x):\n'
                    '    return ops.double(x) + ops.triple(x) + len(plugins())\n',
    })
    src = flatten(pkg, "model")
    namespace = {}
    exec(compile(src, "flat.py", "exec"), namespace)
    assert namespace["both"](5) == 10 + 15 + 1
    assert {"_ops_a_check", "_ops_b_check", "_ops_a_SCALE", "_ops_b_SCALE", "Plugin"} <= set(namespace)
    assert src.count("import math") == 1 and "yaml" not in src  # a package's side-effect imports are not followed
    sections = re.findall(r"^# ---- fakepkg/(\S+)\.py ----$", src, flags=re.MULTILINE)
    assert sections.index("registry") < sections.index("plugins/p1") and sections[-1] == "model"


@pytest.mark.parametrize("files, match", [
    ({"a.py": "def f():\n    return 1\n\ndef h():\n    pass\n", "b.py": "def f():\n    return 2\n",
      "model.py": "from .a import f\nfrom .b import f as g\n"}, "cannot be flattened"),
    ({"a.py": "def f():\n    return 1\n", "b.py": "def f():\n    return 2\n\ndef h():\n    pass\n",
      "model.py": "from .a import f\nfrom .b import h\n"}, "'f' is defined by"),
    ({"model.py": "from .missing import g\n"}, "no module 'missing'"),
    ({"model.py": "from .a import g\n\ndef h():\n    pass\n", "a.py": "from .model import h\n\ndef g():\n    pass\n"},
     "import cycle"),
    ({"model.py": "import yaml\n\ndef f():\n    return yaml\n"}, "would import 'yaml'"),
    ({"ops/__init__.py": "from .x import f\n", "ops/x.py": "def f():\n    pass\n",
      "model.py": "from . import ops\n\ng = ops\n\ndef h():\n    return ops.f()\n"}, "used other than as"),
    ({"a.py": "_n = 1\n\ndef f(_n):\n    return _n\n", "b.py": "_n = 2\n\ndef k():\n    pass\n",
      "model.py": "from .a import f\nfrom .b import k\n"}, "bound locally"),
])
def test_unsafe_packages_fail_loudly(tmp_path, files, match):
    with pytest.raises(FlattenError, match=match):
        flatten(fake_package(tmp_path, files), "model")
