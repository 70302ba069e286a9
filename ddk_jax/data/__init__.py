"""Multi-domain data for DDK: sources, tokenizer, preparation, pipelines and
the dynamic mixture. See docs/data.md.

The public names below are imported lazily, so that light entry points do not
pay for importing grain/JAX.
"""

import importlib

_EXPORTS = {
    # config
    "DataConfigError": "config", "default_data_config": "config",
    "with_defaults": "config", "domain_specs": "config",
    "domain_names": "config", "initial_weights": "config",
    "check_weights": "config", "DomainSpec": "config",
    # tokenizer
    "TextTokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "load_tokenizer_from_config": "tokenizer", "tokenizer_hash": "tokenizer",
    "check_same_tokenizer": "tokenizer", "check_vocab_fits": "tokenizer",
    # preparation
    "prepare": "prepare", "ensure_prepared": "prepare",
    "load_manifest": "prepare",
    # pipelines and mixture
    "build_train_dataset": "pipeline", "build_train_iterator": "pipeline",
    "build_validation": "pipeline", "ValidationBatches": "pipeline",
    "domain_rows": "pipeline", "ROW_KEYS": "pipeline",
    "DynamicMixtureIterDataset": "mixture",
    "DynamicMixtureDatasetIterator": "mixture", "stack_rows": "mixture",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
