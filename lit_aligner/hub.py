"""Fetching models and datasets from the Hugging Face Hub with `huggingface_hub` (its cache, token, offline mode and
mirrors): `download_model` takes only what conversion needs; `download_dataset_files` the files of a dataset repo that
the prepare scripts read. Every failure is one `HubError` line: a gated repo without a token, a repo that does not
exist, no network (or HF_HUB_OFFLINE=1 and nothing cached)."""

import fnmatch
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from lit_aligner.files import UserError

# What conversion reads; weights: *.safetensors when the repo has them (never both formats), else PyTorch .bin files.
MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja"]
SAFETENSORS_FILES = ["*.safetensors", "model.safetensors.index.json"]
BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


class HubError(UserError):
    """A download that cannot happen; the message says why and what to do."""


@contextmanager
def quiet_retries() -> Iterator[None]:
    """Keep huggingface_hub's warning at each retry of a request off the terminal while the block runs: when the
    request fails for good, our one error line says so."""
    import huggingface_hub.utils.logging  # noqa: F401  (its first import sets the level: before ours, not inside)

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


@contextmanager
def _explained(repo_id: str, repo_type: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one line naming the repository and the fix."""
    from huggingface_hub import errors

    url = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    try:
        with quiet_retries():
            yield
    except errors.GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its terms at {url} with your account, then pass "
                       f"--access-token (or set HF_TOKEN).") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such {repo_type} repository on the Hub, or a private one (then pass "
                       f"--access-token). Check the name at {url}.") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{repo_id}: no such revision; leave --revision out for the main branch.") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise HubError(f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached (offline, or "
                       f"HF_HUB_OFFLINE=1); download it where there is network, or pass a local folder or file "
                       f"instead.") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{repo_id}: the Hub answered {str(e).splitlines()[0][:200]}") from None
    except (OSError, ConnectionError, errors.HTTPError) as e:  # HTTPError: its HTTP client's (httpx since hub 1.0)
        raise HubError(f"{repo_id}: cannot reach the Hub ({type(e).__name__}: {str(e)[:200]}); check the network, "
                       f"or pass a local folder or file instead.") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def list_files(repo_id: str, repo_type: str = "model", token: Optional[str] = None,
               revision: Optional[str] = None) -> List[str]:
    """The files of a repository (offline: of its cached snapshot)."""
    from huggingface_hub import HfApi, snapshot_download

    with _explained(repo_id, repo_type):
        if _offline():
            root = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=token,
                                          local_files_only=True))
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return list(HfApi(token=token).list_repo_files(repo_id, repo_type=repo_type, revision=revision))


def _matching(files: Sequence[str], patterns: Sequence[str]) -> List[str]:
    return [f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)]


def select_model_files(files: Sequence[str]) -> List[str]:
    """What conversion needs of a model repo: config, tokenizer files, and the weights in one format, safetensors
    preferred (a repo with both would otherwise be downloaded twice)."""
    weights = _matching(files, SAFETENSORS_FILES) or _matching(files, BIN_FILES)
    return _matching(files, MODEL_FILES) + weights


def fetch(repo_id: str, filenames: Sequence[str], repo_type: str = "model", token: Optional[str] = None,
          revision: Optional[str] = None) -> Path:
    """Download `filenames` of a repository into the Hugging Face cache (skipping those already there); returns the
    snapshot folder that holds them."""
    from huggingface_hub import snapshot_download

    with _explained(repo_id, repo_type):
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=token,
                                      allow_patterns=list(filenames), local_files_only=_offline()))


def download_model(repo_id: str, token: Optional[str] = None, revision: Optional[str] = None) -> Path:
    """A model repository's config, tokenizer and weights (`select_model_files`) in the Hugging Face cache; returns
    the folder to convert (`lit_aligner.convert.convert_hf`)."""
    files = select_model_files(list_files(repo_id, "model", token, revision))
    if "config.json" not in files or not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise HubError(f"{repo_id} has no config.json and weights (*.safetensors or pytorch_model*.bin) to convert; "
                       f"is it a Hugging Face transformers model repository?")
    return fetch(repo_id, files, "model", token, revision)


def download_dataset_files(repo_id: str, patterns: Sequence[str], token: Optional[str] = None,
                           revision: Optional[str] = None) -> Tuple[Path, List[Path]]:
    """The files of a dataset repository that match `patterns` (e.g. "data/*/train.jsonl"); returns (snapshot
    folder, the files)."""
    wanted = _matching(list_files(repo_id, "dataset", token, revision), patterns)
    if not wanted:
        raise HubError(f"{repo_id} has no file matching {list(patterns)}; name the files with --hub-files, or pass "
                       f"a local --data-file.")
    root = fetch(repo_id, wanted, "dataset", token, revision)
    return root, [root / f for f in wanted]
