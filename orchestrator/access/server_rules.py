"""The policy as the storage server's own rules (enforcement layer 1).

The library enforces row filters and hidden fields; the server enforces which keys a set of
credentials may read, list and write, so raw S3 calls with a reader's keys cannot write, or read
a dataset without a grant. Per principal:

* everyone: read ``_policy/`` (to learn the policy) and read/write ``runs/<principal>/``;
* a read grant on dataset pattern ``g``: read + list ``datasets/g/`` (manifest and blobs);
* write (or admin on a pattern): also write there (delta-rs needs all three on the table);
* admin on ``*``: everything under the store root, the policy included.

Patterns are exact names or a prefix with one trailing ``*`` (``Policy`` enforces it): S3 and
SeaweedFS globs let ``*`` cross ``/``, and only that shape cannot reach into another dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.access.policy import Policy
from orchestrator.access.store_policy import read_policy
from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.handle import StoreHandle


def _scopes(policy: Policy, principal: str) -> tuple[bool, set[str], set[str]]:
    """(admin of everything, dataset patterns readable, dataset patterns writable)."""
    grants = policy.grants_for(principal)
    full_admin = any(g.covers("*", "admin") and "*" in g.datasets for g in grants)
    readable = {d for g in grants for d in g.datasets}
    writable = {d for g in grants if {"write", "admin"} & set(g.actions) for d in g.datasets}
    return full_admin, readable, writable


def seaweed_identities(policy: Policy, root: str, secrets: dict[str, str]) -> dict:
    """SeaweedFS ``-s3.config`` JSON. ``root``: ``bucket/prefix`` of the store; ``secrets``:
    access key id → secret key (the policy holds no secrets)."""
    root = root.strip("/")
    identities, missing = [], []
    for name in sorted(policy.principals):
        keys = policy.principals[name].access_keys
        missing += [k for k in keys if k not in secrets]
        if not keys:
            continue
        full_admin, readable, writable = _scopes(policy, name)
        if full_admin:
            actions = [f"Admin:{root}/*"]
        else:
            actions = [f"Read:{root}/_policy/*", f"List:{root}/_policy/*"]
            actions += [f"{verb}:{root}/runs/{name}/*" for verb in ("Read", "List", "Write")]
            for pattern in sorted(readable):
                actions += [f"Read:{root}/datasets/{pattern}/*", f"List:{root}/datasets/{pattern}/*"]
                if pattern in writable:
                    actions.append(f"Write:{root}/datasets/{pattern}/*")
        identities.append({"name": name, "actions": actions,
                           "credentials": [{"accessKey": k, "secretKey": secrets.get(k, "")} for k in keys]})
    if missing:
        raise ConfigError(f"no secret for access key(s) {', '.join(sorted(missing))} in the secrets file",
                          hint="give every principal's access key id its secret key")
    return {"identities": identities}


def aws_iam_policies(policy: Policy, bucket: str, prefix: str) -> dict[str, dict]:
    """One IAM policy document per role, plus ``_every_principal`` (policy read, own runs via
    ``${aws:username}``) to attach to every principal's IAM user."""
    base = f"arn:aws:s3:::{bucket}/{prefix.strip('/') + '/' if prefix.strip('/') else ''}"
    key_prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""

    def listing(patterns: list[str]) -> dict:
        return {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}",
                "Condition": {"StringLike": {"s3:prefix": patterns}}}

    docs = {"_every_principal": {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"{base}_policy/*"},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
         "Resource": f"{base}runs/${{aws:username}}/*"},
        listing([f"{key_prefix}_policy/*", f"{key_prefix}runs/${{aws:username}}/*"]),
    ]}}
    for role_name, role in sorted(policy.roles.items()):
        statements = []
        for g in role.grants:
            resources = [f"{base}datasets/{d}/*" for d in g.datasets]
            actions = ["s3:GetObject"]
            if {"write", "admin"} & set(g.actions):
                actions += ["s3:PutObject", "s3:DeleteObject"]
            statements.append({"Effect": "Allow", "Action": actions, "Resource": resources})
            statements.append(listing([f"{key_prefix}datasets/{d}/*" for d in g.datasets]))
            if "admin" in g.actions and "*" in g.datasets:
                statements.append({"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
                                   "Resource": f"{base}_policy/*"})
                statements.append(listing([f"{key_prefix}*"]))
        docs[role_name] = {"Version": "2012-10-17", "Statement": statements}
    return docs


def compile_rules(store: StoreHandle, target: str, secrets_path: Path | None) -> str:
    """The policy in force on ``store`` as JSON for ``target`` (seaweedfs | aws)."""
    pv = read_policy(store)
    if pv is None:
        raise ConfigError(f"{store.uri} has no access policy", hint="set one with `orchestrator policy set`")
    if store.location.scheme != "s3":
        raise ConfigError("server rules are for s3:// stores; a file:// store is single-user "
                          "(its file permissions are the boundary)")
    bucket, _, prefix = store.location.root.partition("/")
    if target == "aws":
        return json.dumps(aws_iam_policies(pv.policy, bucket, prefix), indent=2)
    if secrets_path is None:
        raise ConfigError("--target seaweedfs needs --secrets FILE: JSON {access_key_id: secret_key}")
    try:
        secrets = json.loads(Path(secrets_path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read secrets file {secrets_path}: {exc}") from None
    return json.dumps(seaweed_identities(pv.policy, store.location.root, secrets), indent=2)
