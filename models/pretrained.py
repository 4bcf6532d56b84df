"""One loader and one saver for a trained decoder: `Transformer.from_pretrained`,
`model.save_pretrained` and `model.push_to_hub`.

`from_pretrained(path)` takes what a user has at hand: a run folder (its newest of last.ckpt and
interrupted.ckpt), a `.ckpt` file of `train.py`, a folder written by `save_pretrained`, or the
Hugging Face Hub id of one (`owner/name`, when no such local path exists). The model comes back
in eval mode with its encoding config, and with `model.tokenizer` (a `tokenizers.Tokenizer`) and
`model.meta` (the checkpoint's `"bipe"` entry: data statistics, the run's data settings with its
segmenter, the training step).

`save_pretrained(folder)` writes the Hugging Face Hub layout: `config.json` (the model and
encoding config and the metadata), `model.safetensors` (the weights), `tokenizer.json`, and
`bipe_manifest.json` (each file's SHA-256, which `from_pretrained` checks), for every encoding
(BiPE included). The folder is replaced as a whole (`bipe.io.replace_folder`): a crash or a full
disk leaves the old folder or the new one, never new weights beside an old config. `push_to_hub`
uploads that folder in one commit. `python -m models.export_hf` turns a `rope` model into a
transformers `LlamaForCausalLM` folder instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import load_file, save
from tokenizers import Tokenizer

from bipe.errors import CheckpointError, first_line
from bipe.io import interrupted_folder, replace_folder
from models.checkpoint import (
    CHECKPOINT_KEY,
    FORMAT_VERSION,
    load_checkpoint,
    model_state_dict,
    to_plain,
)
from models.config import ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "bipe_manifest.json"
MANIFEST_FORMAT = 1
MODEL_TYPE = "bipe-transformer"
# Every file save_pretrained may write: a new save replaces all of them, so a tokenizer.json of
# an earlier save never outlives it beside other weights.
SAVED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, MANIFEST_FILE)

M = TypeVar("M", bound="PretrainedMixin")


def is_saved_folder(path: Path) -> bool:
    """True for a folder written by `save_pretrained` (config.json and model.safetensors)."""
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


# -- the manifest ---------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces (weights can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def write_manifest(folder: Path, written_by: str) -> Path:
    """Write `bipe_manifest.json` listing the SHA-256 of every file now in `folder`: called last
    by a writer, so it names exactly the files the writer wrote (what a later save may replace)
    and lets a reader detect a damaged or partly replaced file."""
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "written_by": written_by,
                                "files": files}, indent=2) + "\n")
    return path


def read_manifest(folder: Path) -> dict[str, str] | None:
    """`{file: sha256}` of a folder's manifest; None when it has none (saved before manifests);
    CheckpointError when it cannot be read."""
    path = folder / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({first_line(exc)}): copy the folder "
                              "again, or save the model again") from None
    return {str(k): str(v) for k, v in files.items()}


def verify_folder(folder: Path) -> dict[str, str] | None:
    """Check every file the manifest lists against its SHA-256: CheckpointError naming the first
    missing or changed one; returns the manifest, or None (and a warning) for a folder without
    one, which still loads: folders saved before manifests existed cannot be verified."""
    files = read_manifest(folder)
    if files is None:
        log.warning("%s has no %s (saved before manifests existed): its files cannot be "
                    "verified; save it again to add one", folder, MANIFEST_FILE)
        return None
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing, though {MANIFEST_FILE} lists it (an "
                                  "incomplete copy): copy the whole folder again")
        try:
            got = sha256_file(path)
        except OSError as exc:
            raise CheckpointError(f"{path} cannot be read: {first_line(exc)}") from None
        if got != want:
            raise CheckpointError(f"{path} does not match its SHA-256 in {MANIFEST_FILE} (a "
                                  "damaged copy or disk, or an edited file): copy the folder "
                                  "again from its source, or save the model again")
    return files


def owned_files(folder: Path) -> set[str] | None:
    """The names in `folder` that a previous `save_pretrained` or export wrote (the ones a new
    one may replace), or None when it holds neither (a folder of someone else's files)."""
    try:
        files = read_manifest(folder)
    except CheckpointError:
        files = None  # unreadable: not proof that the folder is ours
    if files is not None:
        return {name.split("/")[0] for name in files} | {MANIFEST_FILE}
    try:  # saved before manifests existed
        ours = json.loads((folder / CONFIG_FILE).read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        ours = False
    return set(SAVED_FILES) if ours else None


def replaceable_files(folder: Path, *, overwrite: bool, what: str, flag: str) -> set[str]:
    """The names in `folder` that a new save may replace (the previous save's, or none for a new
    or empty folder). CheckpointError, naming `what` and `flag`, for a file, or for a folder of
    other files without `overwrite`: a save must not take someone else's folder over."""
    if not folder.exists():
        return set()
    if not folder.is_dir():
        raise CheckpointError(f"{what}={folder} is a file; name a folder")
    own = owned_files(folder)
    if own is not None or overwrite or not any(folder.iterdir()):
        return own or set()
    raise CheckpointError(f"{what}={folder} is not empty and holds no saved model or export "
                          f"(no {MANIFEST_FILE}); name a new or empty folder, or pass {flag} to "
                          "write the model's files into it (its other files are kept)")


# -- reading --------------------------------------------------------------------------------


def read_saved_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(meta, state dict)` of a `save_pretrained` folder, its files checked against the
    manifest first; CheckpointError naming a bad file."""
    listed = verify_folder(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} cannot be read: {first_line(exc)}") \
            from None
    if config.get("model_type") != MODEL_TYPE or CHECKPOINT_KEY not in config:
        raise CheckpointError(f"{folder} holds no model saved by this project (config.json has "
                              f"model_type {config.get('model_type')!r}); for a transformers "
                              "Llama folder use python -m models.convert_hf")
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{folder / WEIGHTS_FILE} cannot be read (truncated or "
                              f"corrupted?): {first_line(exc)}") from None
    meta = dict(config[CHECKPOINT_KEY])
    tokenizer = folder / TOKENIZER_FILE
    if tokenizer.is_file():
        if listed is not None and TOKENIZER_FILE not in listed:
            log.warning("%s was added after the model was saved (%s does not list it): it is "
                        "used unverified", tokenizer, MANIFEST_FILE)
        meta["tokenizer"] = tokenizer.read_text()
    return meta, state


def is_hub_id(path: str | os.PathLike[str]) -> bool:
    """True when `path` can only mean a Hub repo: a string `owner/name` that is no local path."""
    if not isinstance(path, str) or path.count("/") != 1 or path[0] in "./~" \
            or path.endswith(".ckpt") or Path(path).expanduser().exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def download_from_hub(repo_id: str, *, key: str = "checkpoint",
                      revision: str | None = None) -> Path:
    """The local folder of Hub repo `repo_id` (its saved-model files only, through the Hugging
    Face cache); CheckpointError naming the repo id when it cannot be had."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{key}={repo_id} is no local path, and the Hub repo {repo_id}"
    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=list(SAVED_FILES)))
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE=1 is set (unset it to download)" if constants.HF_HUB_OFFLINE
               else "this machine is offline or cannot reach the Hub")
        raise CheckpointError(f"{where} is not in the local Hugging Face cache and cannot be "
                              f"downloaded: {why}; check the path, or download the repo where "
                              "there is a network first") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where} does not exist (or is private: log in with hf auth "
                              "login); check the path or the repo id") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{where} cannot be downloaded: {first_line(exc)}") from None
    if not is_saved_folder(folder):
        raise CheckpointError(f"Hub repo {repo_id} holds no model saved by save_pretrained (no "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    return folder


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for a module built from a `ModelConfig` (the
    decoder); see the module docstring."""

    tokenizer: Any = None
    meta: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(cls: type[M], path: str | os.PathLike[str], *,
                        model_config_hook: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                        map_location: Any = "cpu", key: str = "checkpoint",
                        revision: str | None = None) -> M:
        """The model of a run folder, a `.ckpt`, a saved folder or a Hub repo id, in eval mode.

        `model_config_hook` may edit the model config dict first, e.g. to set RoPE scaling for
        evaluation at a longer length; `revision` pins a Hub repo's branch, tag or commit.
        CheckpointError naming the path when it is missing, truncated, corrupted (a file that
        fails its manifest's SHA-256) or not ours.
        """
        p = Path(path).expanduser()
        if is_hub_id(path):
            p = download_from_hub(str(path), key=key, revision=revision)
        elif not p.exists() and (aside := interrupted_folder(p)) is not None:
            raise CheckpointError(f"{key}={path} does not exist: a save into it was interrupted "
                                  f"and left its previous content in {aside}; rename that "
                                  f"folder to {p.name}, or save the model again")
        if p.is_dir() and is_saved_folder(p):
            meta, state = read_saved_folder(p)
        else:
            ckpt = load_checkpoint(p, key=key, map_location=map_location)
            meta, state = ckpt[CHECKPOINT_KEY], model_state_dict(ckpt)
        config = dict(meta["model_config"])
        if model_config_hook is not None:
            config = model_config_hook(config)
        model = cls(ModelConfig.from_dict(config))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{key}={path}: its weights do not fit its own model config "
                                  f"({first_line(exc)})") from None
        model.eval()
        model.tokenizer = Tokenizer.from_str(meta["tokenizer"]) if meta.get("tokenizer") else None
        model.meta = dict(meta)
        return model

    def save_pretrained(self, folder: str | os.PathLike[str], *, tokenizer: Any = None,
                        meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
        """Write `config.json`, `model.safetensors`, `tokenizer.json` (when the model has a
        tokenizer, or one is given) and `bipe_manifest.json` into `folder`, replacing a previous
        save as a whole (module docstring); returns it.

        A folder of other files is refused (CheckpointError) unless `overwrite`; then the model's
        files are added and the others kept.
        """
        folder = Path(folder).expanduser()
        own = replaceable_files(folder, overwrite=overwrite, what="save_pretrained folder",
                                flag="overwrite=True")
        info = {k: v for k, v in {**(self.meta or {}), **(meta or {})}.items() if k != "tokenizer"}
        info.update(format_version=FORMAT_VERSION,
                    model_config=to_plain(self.config.to_dict(), "model_config"))
        weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        files = {WEIGHTS_FILE: save(weights)}
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            files[TOKENIZER_FILE] = tokenizer.to_str().encode("utf-8")
        config = {"model_type": MODEL_TYPE, "architectures": ["Transformer"],
                  CHECKPOINT_KEY: to_plain(info, CHECKPOINT_KEY)}
        files[CONFIG_FILE] = (json.dumps(config, indent=2, default=str) + "\n").encode("utf-8")

        def write(tmp: Path) -> None:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            write_manifest(tmp, "models.pretrained.save_pretrained")

        return replace_folder(folder, write, replaces=own | set(SAVED_FILES))

    def push_to_hub(self, repo_id: str, *, tokenizer: Any = None,
                    meta: Mapping[str, Any] | None = None, private: bool | None = None,
                    commit_message: str = "Upload model", token: str | None = None) -> Any:
        """Upload the `save_pretrained` folder of this model to Hub repo `repo_id` (created if
        missing) in one commit, which also deletes the files of an earlier save the new one has
        not (a stale tokenizer.json); returns the commit info. CheckpointError naming the repo id
        when the Hub cannot be reached or refuses."""
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        # HfHubHTTPError derives from the HTTP client's own base error, which a refused
        # connection raises too; catching that base reports a network failure in one line.
        failures = (OSError, *HfHubHTTPError.__bases__)
        with tempfile.TemporaryDirectory(prefix=".bipe-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", tokenizer=tokenizer, meta=meta)
            api = huggingface_hub.HfApi(token=token)
            try:
                api.create_repo(repo_id, private=private, exist_ok=True)
                return api.upload_folder(repo_id=repo_id, folder_path=folder,
                                         commit_message=commit_message,
                                         delete_patterns=list(SAVED_FILES))
            except OfflineModeIsEnabled:
                raise CheckpointError(f"cannot push to Hub repo {repo_id}: HF_HUB_OFFLINE=1 is "
                                      "set; unset it on a machine with network access") from None
            except failures as exc:
                raise CheckpointError(f"cannot push to Hub repo {repo_id}: {first_line(exc)} "
                                      "(offline, not logged in (hf auth login), or no write "
                                      "access?)") from None
