"""Keyed pseudonyms: HMAC-SHA256 of ids and path components under a secret key the operator holds.

An unsalted hash of a hospital id is no pseudonym: PatientIDs are short MRNs, and hashing every
candidate MRN takes seconds. With a secret key, the same id always maps to the same pseudonym
(splits and resumes stay stable) but nobody without the key can test a guess. The key is read
from where ``ingest.pseudonym_key`` points (an environment variable or a file / s3:// object) and
is never written anywhere by mama-ray: not to a config, shard, manifest, log or model card.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import warnings
from pathlib import Path

from mama_ray.storage import StorageOptions, is_s3, read_bytes

ID_HEX = 20  # hex characters of a pseudonym (80 bits: no collision among millions of ids)
MIN_KEY_BYTES = 16  # a key shorter than 128 bits is refused
KEY_HINT = ("set it to env:NAME (an environment variable holding the key) or the path / s3:// URI "
            "of a key file; make one with `python -c \"import secrets; print(secrets.token_hex(32))\" "
            "> ~/.mama-ray-pseudonym.key && chmod 600 ~/.mama-ray-pseudonym.key`")


def pseudonym(value: str | None, key: bytes) -> str | None:
    """Keyed one-way id of a UID, patient id or path component; None/empty stays None.

    Args:
        value: the identifying value.
        key: the secret key (see :func:`load_key`).
    Returns:
        The first :data:`ID_HEX` hex characters of HMAC-SHA256(key, value).
    """
    if not value:
        return None
    return hmac.new(key, str(value).encode(), hashlib.sha256).hexdigest()[:ID_HEX]


def pseudonym_path(path: str, key: bytes) -> str:
    """Every ``/``-separated component of ``path`` replaced by its pseudonym (structure kept)."""
    return "/".join(pseudonym(part, key) for part in path.split("/") if part)


def key_id(key: bytes) -> str:
    """A short public fingerprint of the key (names which key made an output, reveals nothing)."""
    return pseudonym("mama-ray pseudonym key id", key)[:12]


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"pseudonym key file {path} is readable by other users (chmod 600 it)", stacklevel=3)


def load_key(spec: str, opts: StorageOptions | None = None) -> bytes:
    """The key that ``spec`` (``env:NAME``, a file path or an s3:// URI) points to.

    Raises:
        ValueError: the spec is empty, names nothing readable, or the key is too short. The
            message never repeats the spec's value unless it is ``env:NAME`` (a pasted key must
            not end up in a log).
    """
    if not spec:
        raise ValueError(f"is empty: an ingest needs a secret key for its HMAC pseudonyms; {KEY_HINT}")
    if spec.startswith("env:"):
        name = spec[4:]
        if not name or name not in os.environ:
            raise ValueError(f"names environment variable {name!r}, which is not set; {KEY_HINT}")
        key = os.environ[name].strip().encode()
    elif is_s3(spec):
        key = read_bytes(spec, opts).strip()
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError("is neither env:NAME nor an existing key file or s3:// URI (its value is "
                             f"not shown: it might be a key); {KEY_HINT}")
        _check_private(path)
        key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the key it names is shorter than {MIN_KEY_BYTES} bytes; {KEY_HINT}")
    return key
