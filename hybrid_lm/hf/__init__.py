"""Hugging Face transformers export: `export_hf` writes a folder that `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` loads without hybrid_lm installed; `import_hf` turns it back into a native model folder.

`configuration_hybrid_lm.py` ships verbatim; `modeling_hybrid_lm.py` is the transformers wrapper template, which
`flatten.build_modeling_source` appends to the package modules it reaches (`bundle.py` finds and orders them) to
generate the exported file.
Importing this package does not import transformers (the functions do, when called).
"""

from .export import export_hf, import_hf
from .flatten import FlattenError, build_modeling_source

__all__ = ["export_hf", "import_hf", "build_modeling_source", "FlattenError"]
