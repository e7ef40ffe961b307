"""Training data: raw rows of public datasets (`formats`), tokenized with the loss on the response only (`tokenize`),
one tokenized dataset type and its collate (`dataset`), prepared directories on disk (`prepared`, written by
`prepare`), the loader every trainer and evaluator calls (`load`), and the offline default dataset (`default`)."""

from lit_aligner.data.dataset import (KIND_FIELDS, KINDS, RESPONSE_FIELDS, Ragged, TokenizedDataset, fit_responses,
                                      pad_rows)
from lit_aligner.data.formats import FORMATS, DataError, Example, hh_messages, split_hh
from lit_aligner.data.load import (DataOptions, DataSource, build_datasets, check_template_variables_fit, describe,
                                   load_data, report, split_indices)
from lit_aligner.data.prepare import PrepareConfig, prepare, run_prepare
from lit_aligner.data.prepared import load_prepared, save_prepared, storable_info, tokenizer_fingerprint
from lit_aligner.losses import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "KIND_FIELDS", "KINDS", "RESPONSE_FIELDS", "FORMATS", "DataError", "DataOptions",
           "DataSource", "Example", "PrepareConfig", "Ragged", "TokenizedDataset", "build_datasets",
           "check_template_variables_fit", "describe",
           "fit_responses", "hh_messages", "load_data", "load_prepared", "pad_rows", "prepare", "report",
           "run_prepare", "save_prepared", "split_hh", "split_indices", "storable_info", "tokenizer_fingerprint"]
