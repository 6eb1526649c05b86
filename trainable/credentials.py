"""Secrets in the URIs the product accepts, taken out before anything prints, stores or pickles
them: a tracking server's `https://user:password@host` or `https://token@host`, a storage or
artifact location's `s3://KEY:SECRET@bucket/prefix`, a database's
`postgresql://user:password@host/db` (Optuna's storage), and a query string's
`?password=...`, `?token=...`, `?sig=...` (a database driver's or a signed URL's).

Where a client reads credentials from the environment (MLflow's, pyarrow's, boto3's), they go
there, for this process and the local Ray it starts, and the URI comes back without them. A
database URL keeps its password (the driver needs it to connect): it stays in this process's
memory, and what is printed or pickled is its redacted form, which `recall` turns back into the
URL this process was given.
"""

from __future__ import annotations

import os
import re
import shlex
from urllib.parse import unquote

# user:secret@ (the secret may hold '/', as AWS secret keys do) or token@ right after "://".
_USERINFO = re.compile(r"(?<=://)((?:[^@\s/:]*:[^@\s]*|[^@\s/:]+))@")
# A query parameter that carries a credential: a database driver's user and password, a
# token, a signed URL's signature and key (S3's X-Amz-*, Azure's sig, GCS's key).
_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:user(?:name)?|password|passwd|pwd|pass|secret|token|access_token|auth|api_?key|key|sig"
    r"|signature|credential|x-amz-signature|x-amz-credential|x-amz-security-token|awsaccesskeyid)=)[^&#\s]+"
)
# An environment assignment on a command line whose name says it holds a secret.
_ENV_SECRET = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:PASSWORD|PASSWD|TOKEN|SECRET|_KEY)[A-Za-z0-9_]*=).+$", re.I)
# Where a database URL's password may come from instead of the URL (which is kept in clear by
# whatever holds a command line: a Ray job's entrypoint, a shell's history).
DATABASE_PASSWORD_VAR = "DEEPLAB_OPTUNA_STORAGE_PASSWORD"
_KNOWN: dict[str, str] = {}  # redacted URL -> the URL with its secret, as given to this process


def split_credentials(uri: str) -> tuple[str, str | None]:
    """(the URI without its user:secret@ or token@ part, that part or None)."""
    m = _USERINFO.search(uri)
    return (uri, None) if m is None else (uri[: m.start()] + uri[m.end() :], m.group(1))


def redacted(value):
    """The value (a URI, or a config holding URIs) with credentials replaced by ***: what is
    stored with a run or a checkpoint is read by everyone who can read those."""
    if isinstance(value, str):
        return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub("***@", value))
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def redacted_command(args: list[str]) -> str:
    """A command line as it may be printed or logged: each word redacted as a value is, and an
    environment assignment of a secret (`MLFLOW_TRACKING_PASSWORD=...`) with its value
    replaced; quoted for a POSIX shell."""
    return shlex.join(_ENV_SECRET.sub(r"\1***", redacted(str(a))) for a in args)


def holds_credentials(args: list[str]) -> bool:
    """Whether any word of a command line holds a credential that `redacted_command` hides."""
    return redacted_command(args) != shlex.join(str(a) for a in args)


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


def database_url(url: str) -> str:
    """The URL this process connects to a database with: the one it was given (`recall`), with
    the password from DEEPLAB_OPTUNA_STORAGE_PASSWORD where the URL names a user but no password."""
    url = recall(url)
    password = os.environ.get(DATABASE_PASSWORD_VAR)
    if not password or url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.password is not None:
        return url
    return parsed.set(password=password).render_as_string(hide_password=False)
