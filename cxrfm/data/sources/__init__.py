"""Converters from public CXR corpora (and the synthetic phantoms) into the one Study schema.

`SOURCES` maps a source name to "module:Class"; modules are imported only when a converter is asked for,
so listing the names (config validation, `--help`) costs nothing. Each converter module defines a
subclass of `cxrfm.data.sources.base.Converter`; `cxrfm data build --source NAME --root PATH` runs it.
"""

from __future__ import annotations

import importlib

SOURCES: dict[str, str] = {
    "synthetic": "cxrfm.data.sources.synthetic:Converter",
    # report corpora
    "iu_xray": "cxrfm.data.sources.iu_xray:Converter",
    "mimic_cxr": "cxrfm.data.sources.mimic_cxr:Converter",
    "chexpert_plus": "cxrfm.data.sources.chexpert_plus:Converter",
    "chexpert": "cxrfm.data.sources.chexpert:Converter",
    "padchest": "cxrfm.data.sources.padchest:Converter",
    "rexgradient": "cxrfm.data.sources.rexgradient:Converter",
    # grounding and VQA corpora
    "ms_cxr": "cxrfm.data.sources.ms_cxr:Converter",
    "vindr_cxr": "cxrfm.data.sources.vindr_cxr:Converter",
    "chestxray8": "cxrfm.data.sources.chestxray8:Converter",
    "rsna_pneumonia": "cxrfm.data.sources.rsna_pneumonia:Converter",
    "siim_pneumothorax": "cxrfm.data.sources.siim_pneumothorax:Converter",
    "vqa_rad": "cxrfm.data.sources.vqa_rad:Converter",
    "slake": "cxrfm.data.sources.slake:Converter",
    "medical_diff_vqa": "cxrfm.data.sources.medical_diff_vqa:Converter",
}


def check_source_name(name: str) -> str:
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; allowed: {sorted(SOURCES)}")
    return name


def get_converter(name: str):
    """The converter class registered under `name` (a subclass of base.Converter)."""
    check_source_name(name)
    module_name, _, class_name = SOURCES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # a dependency of the converter is missing: show that, not a misleading message
        raise ValueError(f"data source {name!r} is registered but its converter module {module_name} is not "
                         f"installed in this version of cxrfm; choose another source from {sorted(SOURCES)}") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ValueError(f"{module_name} defines no class {class_name!r} (registered for source {name!r})") from None
