"""Hub access without the minute of retries: detect an unreachable hub once, then work from the HF cache.

Offline, huggingface_hub retries every file request with back-off: a hub id printed ~46 retry lines
over a minute before failing. Before the first hub (non-local) load, `prepare_hub_access` tries one TCP
connection to the hub endpoint (`huggingface_hub.constants.ENDPOINT`, through the configured proxy if
any) with a short timeout, once per process. When it fails, the process switches to offline mode (what
`HF_HUB_OFFLINE=1` does), so a cached model or dataset still loads and a missing one fails at once.
Setting `HF_HUB_OFFLINE` (to any value) skips the check: the user has decided (`HF_HUB_OFFLINE=0` for a
hub that is reachable but slower than the check's timeout to connect).

Our own hub calls pass `local_files_only=True` once offline (`cache_only()`), which is public API. The
libraries that we cannot pass it to (transformers' loaders under peft, `datasets.load_dataset`, and
lm-eval loading its tasks' data) read the mode from module constants copied from the environment when
they were imported; `go_offline` sets those constants: the one place that touches another library's
internals (tests/test_hub.py pins the names it relies on for the supported versions).
`check_now()` runs the check before a command hands the hub to another library (`codi lm-eval`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import urllib.parse
import urllib.request

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
_USER_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class OfflineError(ConnectionError):
    """A hub id is needed, the hub is unreachable (or offline mode is on), and the cache lacks it."""


_reachable: dict[str, bool] = {}  # endpoint -> result of the one check of this process
_went_offline: list[str] = []  # the endpoint this process found unreachable (at most one entry)
_noted: set[str] = set()  # hub ids already logged as loaded from the cache


# A hub repository id: "name" or "owner/name", each starting with a letter or digit, then letters,
# digits, "-", "_", "." (what the hub accepts, less a few spellings it refuses itself, e.g. "a--b").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(name: str | None, *, owner: bool = False) -> bool:
    """Whether `name` is read as a hub repository id: spelled like one (`owner=True`: with its owner,
    "owner/name"), and not an existing path on this machine. The one rule of the package: everything
    else (an existing path, "./x", "~/x", a name no repository can have) is a local path."""
    if not name or not _HUB_ID.match(name) or (owner and "/" not in name):
        return False
    return not os.path.exists(name)


def is_local(source: str) -> bool:
    """A path on this machine (existing, or spelled like a path), as opposed to a hub id."""
    return not is_hub_id(source)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _address(url: str) -> tuple[str, int] | None:
    """(host, port) a connection to `url` goes to first: its proxy when one applies, else its host."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            return proxy_parts.hostname, proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def can_connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """One TCP connection within `timeout` seconds, name resolution included (run in a thread, since
    `socket.create_connection`'s timeout does not bound a hanging DNS lookup)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, name="codi-hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result) and result[0]


def hub_reachable() -> bool:
    """Whether the hub endpoint accepts a TCP connection (checked once per process and endpoint)."""
    url = endpoint()
    if url not in _reachable:
        address = _address(url)
        _reachable[url] = address is not None and can_connect(*address)
    return _reachable[url]


def user_chose_mode() -> bool:
    return any(os.environ.get(name) is not None for name in _USER_SWITCHES)


def go_offline() -> None:
    """Switch huggingface_hub, transformers and datasets to offline mode for this process (and its
    children). The environment variable is the public switch, but they read it once, at import:
    huggingface_hub into `constants.HF_HUB_OFFLINE` (what `is_offline_mode()` and every request check
    at call time; transformers asks it too) and datasets into `datasets.config.HF_HUB_OFFLINE`. So the
    constants of modules already imported are set as well. Should a release rename them, the
    assignments below would silently do nothing and an unreachable hub would cost the minute of
    retries again: tests/test_hub.py::test_offline_switch_reaches_the_pinned_libraries fails first."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:  # imported already: its copy was taken at import
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def cache_only() -> bool:
    """Whether hub files come from the HF cache only in this process (pass as `local_files_only`)."""
    from huggingface_hub import is_offline_mode

    return bool(_went_offline) or is_offline_mode()


def check_now() -> None:
    """The one check of `prepare_hub_access`, now, for a command that hands hub access to another
    library (lm-eval fetches its tasks' datasets itself): run before that library is imported."""
    if not user_chose_mode() and not _went_offline and not hub_reachable():
        _went_offline.append(endpoint())
        go_offline()


def prepare_hub_access(source: str) -> None:
    """Before loading `source` from the hub: when the hub is unreachable, go offline (cache only)."""
    if not is_local(source):
        check_now()


def offline_reason() -> str | None:
    """Why hub ids resolve from the cache only in this process, or None when the hub is in use."""
    from huggingface_hub import is_offline_mode

    if _went_offline:
        return f"the hub at {_went_offline[0]} is unreachable"
    if is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    return None


def note_cache_use(what: str, source: str) -> None:
    """Log (once per source) that `source` came from the cache because the hub is unreachable."""
    if _went_offline and not is_local(source) and source not in _noted:
        _noted.add(source)
        logger.info(
            "%s %r loaded from the HF cache: the hub at %s is unreachable", what, source, _went_offline[0]
        )


def download_repo(source: str, what: str, *, local_files_only: bool = False, **kwargs) -> str:
    """The local folder of the hub repository `source` (`snapshot_download`, with its kwargs): from the
    cache alone when offline or unreachable; one line naming `source` when that cannot be done."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    prepare_hub_access(source)
    try:
        folder = snapshot_download(source, local_files_only=local_files_only or cache_only(), **kwargs)
    except LocalEntryNotFoundError as error:
        if offline_reason() is None:  # local_files_only asked by the caller
            raise OfflineError(
                f"the {what} {source!r} is not (fully) in the HF cache (local_files_only)"
            ) from error
        raise OfflineError(offline_message(what, source)) from error
    except (HfHubHTTPError, ValueError) as error:  # unknown repository, gated, bad revision or id
        raise FileNotFoundError(
            f"{source}: no such local folder, nor a {what} on the hub ({error})"
        ) from error
    note_cache_use(what, source)
    return folder


def upload_folder(folder: str, repo_id: str, *, allow_patterns: list[str] | None = None, **kwargs):
    """`HfApi.upload_folder` of `folder` to the model repository `repo_id` (created when missing)."""
    from huggingface_hub import HfApi

    api = HfApi(token=kwargs.pop("token", None))
    repo_id = api.create_repo(repo_id, private=kwargs.pop("private", None), exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, allow_patterns=allow_patterns, repo_type="model", **kwargs
    )


def offline_message(what: str, source: str) -> str:
    """One line for a hub id that cannot be loaded from the cache while offline."""
    from huggingface_hub import constants

    if _went_offline:
        then = "download it where there is network (HF_HUB_OFFLINE=1 then uses the cache without a check)"
    else:
        then = "unset HF_HUB_OFFLINE to download it"
    return (
        f"cannot load the {what} {source!r}: {offline_reason() or 'offline'} and {source!r} is not (fully) "
        f"in the HF cache ({constants.HF_HUB_CACHE}). Pass a local path instead, or {then}"
    )


# The files of a checkpoint folder that make the model (what a hub repository of it holds); a run folder
# also holds training state (optimizer, scheduler, RNG, metrics, checkpoint-N), which is not pushed.
MODEL_FILE_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "adapter_config.json", "codi_config.json", "coconut_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template*", "README.md", "MODEL_CARD.md",
]  # fmt: skip


# allow_patterns match through folders (`*` matches `/`): a run folder's checkpoints and logs stay out
RUN_ONLY_PATTERNS = ["checkpoint-*", "runs/*", ".staging/*"]


class TrainerPushMixin:
    """For an HF Trainer whose model saves `codi.io.checkpoint` folders: `--push_to_hub` (`--hub_model_id`,
    `--hub_strategy`, `--hub_token`, `--hub_revision`) uploads the folders our saver wrote. The Trainer's
    own push copies only the HF weight files into the run folder (half a CODI checkpoint) and replaces
    the model card with its training summary."""

    def create_model_card(self, *args, **kwargs) -> None:
        """Nothing: `save_pretrained` wrote this package's card (a README.md of the user's is kept)."""

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the final model into the run folder and upload its model files to `hub_model_id`."""
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        return upload_folder(
            self.args.output_dir, self.hub_model_id, allow_patterns=MODEL_FILE_PATTERNS,
            ignore_patterns=RUN_ONLY_PATTERNS,
            commit_message=commit_message, token=token or self.args.hub_token,
            revision=revision or self.args.hub_revision,
        )  # fmt: skip

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """On each save (hub_strategy every_save, checkpoint, all_checkpoints): the checkpoint's model
        files to the repository's root, and with `checkpoint`/`all_checkpoints` the whole folder too.
        Synchronous: the folder is renamed into place when the Trainer's save returns."""
        strategy = str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy))
        if not self.is_world_process_zero() or strategy == "end":
            return
        message = f"Training in progress, step {self.state.global_step}"
        options = {"token": self.args.hub_token, "revision": self.args.hub_revision}
        upload_folder(
            checkpoint_folder,
            self.hub_model_id,
            allow_patterns=MODEL_FILE_PATTERNS,
            commit_message=message,
            **options,
        )
        if strategy in ("checkpoint", "all_checkpoints"):
            where = "last-checkpoint" if strategy == "checkpoint" else os.path.basename(checkpoint_folder)
            message += ", checkpoint"
            upload_folder(
                checkpoint_folder, self.hub_model_id, path_in_repo=where, commit_message=message, **options
            )
