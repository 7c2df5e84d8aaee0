"""Hub access: a hub id or a local folder in, a folder of checkpoint files out.

The only module in aim-mlx that touches the network. huggingface_hub is imported inside the functions, so
`import aim_mlx` stays cheap. Downloads go to the ordinary Hugging Face cache (HF_HOME / HF_HUB_CACHE), and
HF_HUB_OFFLINE=1 makes every call read that cache only.
"""

import difflib
import json
import re
import sys
from pathlib import Path

from ..errors import ConfigError, ModelNotFoundError
from ..log import logger
from .folder import (
    CONFIG_FILE,
    INDEX_FILE,
    PREPROCESSOR_FILE,
    SAFETENSORS_FILES,
    SHARD_PATTERN,
    TOKENIZER_FILES,
)
from .variants import DEFAULT_MODEL, VARIANTS, find_variant

# The checkpoint and nothing else: config, weights (one file or shards), and a text tower's tokenizer (absent
# from the vision-only repos, which costs nothing). At the pinned revisions Apple's repos hold the same
# tensors twice (model.safetensors and mlx_model.safetensors): fetch one. Pickles are never fetched.
ALLOW_PATTERNS = (
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    SAFETENSORS_FILES[0],
    INDEX_FILE,
    SHARD_PATTERN,
    *TOKENIZER_FILES,
)
# Any one of these makes a folder loadable (mlx_model.safetensors: a cache filled by ml-aim's MLX backend).
WEIGHT_FILES = (*SAFETENSORS_FILES, INDEX_FILE)

# `name` or `owner/name` as the hub spells them; '--' and '..' are refused because the hub refuses them.
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_PART}/)?{_PART}", re.ASCII)
_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve(path_or_id: str, revision: str | None = None, *, cache_dir: str | Path | None = None) -> Path:
    """The folder holding the checkpoint `path_or_id`, downloading only the files aim-mlx needs.

    A local folder is returned as is. A hub id from the variant table (with or without `apple/`, any case)
    defaults to its pinned revision, any other id to `main`; `revision` overrides. `cache_dir` defaults to
    huggingface_hub's (HF_HUB_CACHE). Raises ModelNotFoundError with what to do when it cannot.
    """
    return _resolve(path_or_id, revision, cache_dir, local_files_only=False)


def is_cached(path_or_id: str, revision: str | None = None, *, cache_dir: str | Path | None = None) -> bool:
    """Whether `resolve` would succeed from the local cache alone. Never touches the network."""
    try:
        _resolve(path_or_id, revision, cache_dir, local_files_only=True)
    except ModelNotFoundError:
        return False
    return True


def _resolve(path_or_id: str, revision: str | None, cache_dir, local_files_only: bool) -> Path:
    if not path_or_id:  # Path("") would be the working directory
        raise ModelNotFoundError(f"no model given; pass a hub id such as {DEFAULT_MODEL} or a local folder")
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ConfigError(
                f"revision={revision!r} applies only to hub ids, and {path_or_id} is a local folder; "
                "drop the revision"
            )
        _check_complete(local, str(local), "pass a folder holding config.json and model.safetensors")
        return local
    if path_or_id.startswith((".", "/", "~", "\\")) or local.exists():
        what = "is a file, not a folder" if local.exists() else "does not exist"
        raise ModelNotFoundError(
            f"{path_or_id} {what}; pass a folder holding config.json and model.safetensors, "
            f"or a hub id such as {DEFAULT_MODEL}"
        )

    repo_id, revision = _hub_id(path_or_id, revision)
    label = f"{repo_id}@{revision[:7] if _COMMIT.fullmatch(revision) else revision}"
    from huggingface_hub import snapshot_download

    def fetch(local_only: bool) -> str:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=list(ALLOW_PATTERNS),
            local_files_only=local_only,
        )

    try:
        folder = None
        if _COMMIT.fullmatch(revision) and not local_files_only:
            # A commit never changes: a complete cached copy needs no network round trip.
            try:
                folder = fetch(local_only=True)
                _check_complete(Path(folder), label, "")
            except (*_hub_failures(), ModelNotFoundError):
                folder = None
        folder = folder or fetch(local_only=local_files_only)
    except _hub_failures() as exc:
        raise ModelNotFoundError(_explain(exc, repo_id, revision, label)) from exc
    folder = Path(folder)
    hint = (
        f"the repo lacks it at this revision or the cached download is incomplete; run "
        f"`{_download_command(repo_id, revision)}` on a connected machine, or pass a local folder"
    )
    variant = find_variant(repo_id)
    if variant is not None and variant.pickled:
        hint = (
            f"{repo_id} publishes its weights only as pytorch_model.bin, a pickle, which aim-mlx reads only "
            f"when converting: `aim-mlx convert --hf-path {repo_id} --mlx-path "
            f"{repo_id.split('/')[1].lower()}`, then load that folder"
        )
    _check_complete(folder, label, hint)
    logger.info("resolved %s to %s", label, folder)
    return folder


def download_files(
    repo_id: str, names: list[str], revision: str = "main", *, cache_dir: str | Path | None = None
) -> Path:
    """The cached snapshot folder holding the files `names` of `repo_id` at `revision`, pickles included.

    For `aim-mlx convert` only, which reads pickles with torch's weights-only loader; `resolve` never fetches
    them. Raises ModelNotFoundError with what to do when a file cannot be had.
    """
    label = f"{repo_id}@{revision[:7] if _COMMIT.fullmatch(revision) else revision}"
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(names))
        )
    except _hub_failures() as exc:
        raise ModelNotFoundError(_explain(exc, repo_id, revision, label, names)) from exc
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{label} has no {', '.join(missing)}; run `{_download_command(repo_id, revision, names)}` on a "
            "connected machine, or pass a local folder holding the files"
        )
    logger.info("fetched %s from %s to %s", ", ".join(names), label, folder)
    return folder


def _hub_id(model_id: str, revision: str | None) -> tuple[str, str]:
    """(repo id, revision): table ids get their canonical spelling and pinned revision, others `main`."""
    if not _REPO_ID.fullmatch(model_id) or ".." in model_id or "--" in model_id:
        raise ModelNotFoundError(
            f"{model_id!r} is neither a local folder nor a hub id (`name` or `owner/name`), "
            f"e.g. {DEFAULT_MODEL}"
        )
    variant = find_variant(model_id)
    if variant is not None:
        return variant.repo_id, revision or variant.revision
    return model_id, revision or "main"


def _check_complete(folder: Path, label: str, hint: str) -> None:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if (folder / INDEX_FILE).is_file():
        missing += _missing_shards(folder / INDEX_FILE)  # the index wins over single files (see weights.py)
    elif not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append("safetensors weights (model.safetensors or its index)")
    if missing:
        raise ModelNotFoundError(f"{label} has no {', '.join(missing)}; {hint}")


def _missing_shards(index: Path) -> list[str]:
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
        if not all(isinstance(s, str) and s == Path(s).name for s in shards):
            return []
        return sorted(s for s in shards if not (index.parent / s).is_file())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # a malformed index is a weights error, reported by weights.py when it loads


def _hub_failures() -> tuple[type[BaseException], ...]:
    """What a failed fetch raises: huggingface_hub's errors are OSErrors; its HTTP client's are not always."""
    failures: list[type[BaseException]] = [OSError]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        error = getattr(sys.modules.get(module), name, None)  # only the client huggingface_hub imported
        if isinstance(error, type):
            failures.append(error)
    return tuple(failures)


def _explain(exc: BaseException, repo_id: str, revision: str, label: str, files=None) -> str:
    """One line: what went wrong fetching `repo_id` at `revision`, and what to do."""
    from huggingface_hub import constants, errors

    local = "or pass a local folder: aim_mlx.load('/path/to/folder')"
    fetch = f"download it on a connected machine (`{_download_command(repo_id, revision, files)}`) {local}"
    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 1.x only
    if isinstance(exc, incomplete):
        return (
            f"{label} is only partly in the local Hugging Face cache and the hub cannot be reached; {fetch}"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} on the hub; pass an existing branch, tag or commit"
    if isinstance(exc, errors.GatedRepoError):
        return (
            f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and log in "
            f"(`hf auth login`), {local}"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (
            f"no model {repo_id} on the hub{_did_you_mean(repo_id)} (or it is private: log in with "
            f"`hf auth login`); check the id, {local}"
        )
    if isinstance(exc, errors.HfHubHTTPError):
        return f"the hub failed to serve {label} ({_first_line(exc)}); try again later, {local}"
    network = (errors.LocalEntryNotFoundError, ConnectionError, TimeoutError)
    if isinstance(exc, network) or not isinstance(exc, OSError):  # not an OSError: the HTTP client's own
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        return f"{label} is not in the local Hugging Face cache and {reason}; {fetch}"
    return f"{label} could not be stored in the Hugging Face cache ({_first_line(exc)}); {local}"


def _download_command(repo_id: str, revision: str, files=None) -> str:
    command = f"hf download {repo_id} --revision {revision}"
    if files:
        return f"{command} {' '.join(files)}"
    if find_variant(repo_id) is not None:  # the exact files, so that the duplicate MLX copy stays behind
        return f"{command} config.json preprocessor_config.json model.safetensors"
    return command


def _did_you_mean(repo_id: str) -> str:
    known = {v.repo_id.lower(): v.repo_id for v in VARIANTS.values()}
    key = (repo_id if "/" in repo_id else f"apple/{repo_id}").lower()
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.9)
    return f" (did you mean {known[close[0]]}?)" if close and close[0] != key else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
