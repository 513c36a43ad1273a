"""The hub client: the token, one-commit uploads with retries, and one-line explanations of hub errors.

The token comes from ``HF_TOKEN`` or the login cache (``huggingface_hub.get_token``); it is passed to
the client only, never printed, logged or written, and scrubbed from any error message.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from spark_quant.errors import UserError


def resolve_token() -> str:
    """HF_TOKEN, else the login cache; a clear one-line error if there is neither."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN (a write token) or run `hf auth login`; "
                        "or pass --dry-run to stage the release without uploading")
    return token


def _scrub(text: str, token: str | None) -> str:
    text = text.replace(token, "***") if token else text
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def is_transient(e: BaseException) -> bool:
    """Worth retrying: the connection failed or dropped, the hub timed out, was overloaded or rate-limited."""
    import httpx

    status = _status(e)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(e, (httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    cause = e.__cause__ or e.__context__
    return cause is not None and cause is not e and is_transient(cause)


def explain(e: BaseException, repo_id: str, endpoint: str, token: str | None, attempts: int) -> UserError:
    """One line a user can act on, for an error of the hub client; never includes the token."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = _status(e)
    if isinstance(e, OfflineModeIsEnabled):
        msg = "HF_HUB_OFFLINE is set: unset it to upload, or pass --dry-run to stage the release only"
    elif status == 401:
        msg = f"{endpoint} rejected the token (401): set HF_TOKEN to a valid write token or run `hf auth login`"
    elif status == 403:
        msg = (f"{repo_id}: not writable with this token (403): the repo belongs to another user or organization, "
               "or the token is read-only; use a write token with access, or another --repo-id")
    elif status == 404:
        msg = (f"{repo_id}: not found or not visible with this token (404); check --repo-id, the namespace "
               "and the token's permissions")
    elif status == 409:
        msg = f"{repo_id}: the hub refused the commit (409, conflict): retry, or check --revision"
    elif is_transient(e):
        what = f"HTTP {status}" if status else type(e).__name__
        msg = (f"{endpoint}: could not upload to {repo_id} ({what}) after {attempts} attempt(s); nothing was "
               "committed (the release is one commit). Check the network or HF_ENDPOINT and rerun")
    else:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        msg = f"{repo_id}: the hub refused the upload ({status or type(e).__name__}: {first})"
    return UserError(_scrub(msg, token))


def commit_operations(folder: Path) -> list:
    """The one commit's operations: every file of the staged release, sorted, as the hub client hashes it.

    This is the list ``upload_folder`` builds, sent with ``create_commit`` instead: with hf_xet installed,
    huggingface_hub's ``upload_folder`` is a streamed multi-commit pipeline (a batch is committed when it
    is 5 minutes old), so a slow upload of BiCodec/ and wav2vec2 could leave a commit with the card but
    without all the weights. ``create_commit`` uploads the LFS/Xet blobs first and commits once."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder).resolve()
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
            for p in sorted(folder.rglob("*")) if p.is_file()]


def upload(folder: Path, repo_id: str, token: str, private: bool, revision: str | None, message: str,
           retries: int, backoff_s: float):
    """create_repo(exist_ok=True), then the whole folder as one commit; transient failures are retried.
    A failed try leaves no commit behind; a retry re-sends only what the hub lacks (blobs are content
    addressed), and a release identical to the branch head makes no new commit."""
    from huggingface_hub import HfApi, constants

    api = HfApi(token=token)
    endpoint = constants.ENDPOINT
    attempt = 0
    while True:
        attempt += 1
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            return api.create_commit(repo_id, commit_operations(folder), commit_message=message,
                                     repo_type="model", revision=revision)
        except Exception as e:  # noqa: BLE001 - classified below; the token never leaves this function
            if is_transient(e) and attempt < retries:
                wait = backoff_s * 2 ** (attempt - 1)
                print(f"publish: attempt {attempt}/{retries} failed ({_scrub(type(e).__name__, token)}); "
                      f"retrying in {wait:g}s", flush=True)
                time.sleep(wait)
                continue
            raise explain(e, repo_id, endpoint, token, attempt) from None
