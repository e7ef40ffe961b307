"""Preparing a dataset once, for many runs: read, render, tokenize, split and write it as safetensors
(`lit_aligner.data.prepared`), which every trainer then reads as `--data DIR`. `PrepareConfig` holds the flags of
scripts/prepare_*.py; each script is a subclass with its dataset's defaults."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple, Union

from lit_aligner.data.formats import DataError
from lit_aligner.data.load import DataOptions, DataSource, build_datasets, check_template_variables_fit, report
from lit_aligner.data.prepared import META_NAME, is_prepared, save_prepared
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR, CONVERT_DEFAULT_COMMAND
from lit_aligner.files import input_files
from lit_aligner.prompts import default_template
from lit_aligner.tokenizer import ChatTemplateKwargsFlag, read_template_variables


def prepare(kind: str, data: DataSource, out_dir: Union[str, Path], tokenizer, template: str,
            options: DataOptions = DataOptions(), seed: int = 42, source: Optional[str] = None) -> Dict[str, Any]:
    """Build `kind` data from a raw file (or the default dataset) and write it to out_dir; returns info."""
    if is_prepared(data):
        raise DataError(f"{data} is a directory; the prepare scripts read a .json/.jsonl file.")
    train, val, info = build_datasets(kind, data, tokenizer, template, options, seed, source)
    save_prepared(out_dir, train, val, info, tokenizer)
    return {**info, "out_dir": str(out_dir)}


TemplateName = Literal["alpaca", "chat", "beaver", "hh", "plain", "correction"]  # a --template of the prepare scripts


@dataclass
class PrepareConfig:
    """Prepare a dataset for training: tokenized with the base model's tokenizer, split, written as safetensors."""

    data_file: Optional[Path] = None
    """the raw JSON list / JSONL (.gz) / parquet file (default: --hub-repo's files, else the offline default
    dataset)."""
    hub_repo: Optional[str] = None
    """a Hugging Face dataset repository to read when no --data-file is given (cached; HF_HUB_OFFLINE=1 works)."""
    hub_files: Tuple[str, ...] = ()
    """which files of --hub-repo (glob patterns; several are read as one dataset)."""
    access_token: Optional[str] = None
    """a Hugging Face token for a gated or private --hub-repo (default: HF_TOKEN or the cached login)."""
    kind: Literal["sft", "preference", "correction", "unpaired"] = "sft"
    """sft (one target per prompt), preference (chosen/rejected pairs), correction (Q-A-C) or unpaired (labelled
    completions for KTO: prompt/completion/label rows, or pairs split into two)."""
    out_dir: Optional[Path] = None
    """output directory (default: data/<name>-<kind>)."""
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR
    """the converted base model whose tokenizer (and chat template) is used."""
    template: Optional[TemplateName] = None
    """prompt template (default: as the trainers: chat when the tokenizer has a chat template, else alpaca; correction
    for --kind correction)."""
    chat_template_kwargs: ChatTemplateKwargsFlag = None
    seed: int = 42
    """seed of the train/validation split."""
    force: bool = False
    """replace an existing prepared directory at --out-dir."""
    data_options: DataOptions = field(default_factory=DataOptions)

    name: str = field(default="data", init=False, repr=False)  # what default out dirs are called after

    def default_template(self, tokenizer) -> str:
        # the trainers' default for raw files, so that preparing first gives the rows training on the file would
        return "correction" if self.kind == "correction" else default_template(tokenizer)

    def default_out_dir(self) -> Path:
        stem = self.data_file.name.split(".")[0] if self.data_file is not None else self.name
        return Path("data") / f"{stem}-{self.kind}"

    def source(self) -> DataSource:
        """The rows to prepare: the data file, else --hub-repo's files (downloaded once into the Hugging Face cache),
        else None: the offline default dataset."""
        if self.data_file is not None or self.hub_repo is None:
            return self.data_file
        from lit_aligner.hub import download_dataset_files

        _, files = download_dataset_files(self.hub_repo, self.hub_files or ("*.json", "*.jsonl", "*.jsonl.gz"),
                                          self.access_token)
        return files[0] if len(files) == 1 else files

    def source_label(self) -> Optional[str]:
        return None


def run_prepare(cfg: PrepareConfig) -> Dict[str, Any]:
    """What every scripts/prepare_*.py does: check the output directory, load the tokenizer, prepare, report."""
    from lit_aligner.base import is_base_dir, load_tokenizer

    variables = read_template_variables(cfg.chat_template_kwargs, error=DataError)
    out_dir = Path(cfg.out_dir or cfg.default_out_dir())
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out-dir {out_dir} is a file; give a directory.")
    if is_base_dir(out_dir):
        raise DataError(f"--out-dir {out_dir} is a base model's directory (config.json and its weights); prepared data "
                        f"goes in a directory of its own. Choose another --out-dir (without the flag: "
                        f"{cfg.default_out_dir()}).")
    if (out_dir / META_NAME).exists() and not cfg.force:
        raise DataError(f"--out-dir {out_dir} already holds prepared data; pass --force to replace it, or choose "
                        f"another --out-dir.")
    if cfg.data_file is not None and any(out_dir.resolve() in (f.resolve(), *f.resolve().parents)
                                         for f in input_files(cfg.data_file)):
        raise DataError(f"--out-dir {out_dir} would write over --data-file {cfg.data_file}; choose another --out-dir.")
    if not Path(cfg.checkpoint_dir).is_dir():
        raise DataError(f"{cfg.checkpoint_dir}: no such base-model directory (its tokenizer is needed). Convert a "
                        f"model first (e.g. `{CONVERT_DEFAULT_COMMAND}`) or pass --checkpoint-dir.")
    tokenizer = load_tokenizer(cfg.checkpoint_dir)
    template = cfg.template or cfg.default_template(tokenizer)
    check_template_variables_fit(template, variables)
    tokenizer.template_variables = variables
    info = prepare(cfg.kind, cfg.source(), out_dir, tokenizer, template, cfg.data_options, cfg.seed,
                   cfg.source_label())
    print(report(info))
    return info
