"""Secrets in the URIs the product accepts, taken out before anything prints, stores or pickles
them: a tracking server's `https://user:password@host` or `https://token@host`, a storage or
artifact location's `s3://KEY:SECRET@bucket/prefix`, a database's
`postgresql://user:password@host/db` (Optuna's storage).

Where a client reads credentials from the environment (MLflow's, pyarrow's, boto3's), they go
there, for this process and the local Ray it starts, and the URI comes back without them. A
database URL keeps its password (the driver needs it to connect): it stays in this process's
memory, and what is printed or pickled is its redacted form, which `recall` turns back into the
URL this process was given.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

# user:secret@ (the secret may hold '/', as AWS secret keys do) or token@ right after "://".
_USERINFO = re.compile(r"(?<=://)((?:[^@\s/:]*:[^@\s]*|[^@\s/:]+))@")
_KNOWN: dict[str, str] = {}  # redacted URL -> the URL with its secret, as given to this process


def split_credentials(uri: str) -> tuple[str, str | None]:
    """(the URI without its user:secret@ or token@ part, that part or None)."""
    m = _USERINFO.search(uri)
    return (uri, None) if m is None else (uri[: m.start()] + uri[m.end() :], m.group(1))


def redacted(value):
    """The value (a URI, or a config holding URIs) with credentials replaced by ***: what is
    stored with a run or a checkpoint is read by everyone who can read those."""
    if isinstance(value, str):
        return _USERINFO.sub("***@", value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def credentials_to_env(uri: str) -> str:
    """The URI without its credentials, which move to where the client reads them: an http(s)
    tracking URI's `user:password` to MLFLOW_TRACKING_USERNAME/_PASSWORD (a lone token to
    MLFLOW_TRACKING_TOKEN), an s3:// location's `KEY:SECRET` to AWS_ACCESS_KEY_ID/
    _SECRET_ACCESS_KEY. Any other URI comes back as it is (see `remember`)."""
    bare, userinfo = split_credentials(uri)
    if userinfo is None or not uri.startswith(("http://", "https://", "s3://")):
        return uri
    user, sep, secret = (unquote(part) for part in userinfo.partition(":"))
    if uri.startswith("s3://"):
        os.environ.update(AWS_ACCESS_KEY_ID=user, AWS_SECRET_ACCESS_KEY=secret)
    elif sep:
        os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=secret)
    else:
        os.environ["MLFLOW_TRACKING_TOKEN"] = user
    return bare


def remember(url: str) -> str:
    """A URL whose client needs its secret in it (a database's): kept in this process, and
    returned redacted, the form that may be printed or pickled."""
    shown = redacted(url)
    if shown != url:
        _KNOWN[shown] = url
    return shown


def recall(url: str) -> str:
    """The URL this process was given for a redacted one (`remember`), else `url` itself."""
    return _KNOWN.get(url, url)
