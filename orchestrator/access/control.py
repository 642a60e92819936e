"""Who is acting on a store and what the policy in force lets them do.

The principal is resolved from the credentials in use, not from a name the caller asserts:
on ``s3://`` the access key id (the server proves the secret on every request), on ``file://``
the OS user (single-user mode: the file permissions are the real boundary). A store without a
policy is open to whoever can reach its storage, and the acting name is
``ORCHESTRATOR_PRINCIPAL`` or the OS user, recorded but not enforced.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.access.policy import Policy, ReadView
from orchestrator.access.store_policy import PolicyVersion, read_policy
from orchestrator.errors import AccessDenied

if TYPE_CHECKING:
    from orchestrator.handle import StoreHandle


@dataclass(frozen=True)
class AccessControl:
    policy: PolicyVersion | None
    principal: str | None  # None: the credentials in use belong to no principal of the policy
    identity: str          # how the principal was recognised, for messages

    @property
    def name(self) -> str:
        """The acting principal's name (for lineage and commit records)."""
        return self.principal or self.identity

    @property
    def policy_version(self) -> int | None:
        return self.policy.version if self.policy else None

    def _known(self) -> str:
        if self.principal is None:
            raise AccessDenied(
                f"{self.identity} is not a principal in the store's access policy "
                f"(version {self.policy_version})",
                hint="ask a store admin to add it (`orchestrator policy show` lists principals)",
            )
        return self.principal

    def allows(self, action: str, dataset: str) -> bool:
        if self.policy is None:
            return True
        return self.principal is not None and self.policy.policy.allows(self.principal, action, dataset)

    def check(self, action: str, dataset: str) -> None:
        """AccessDenied naming principal, action and dataset unless the policy allows it."""
        if self.policy is not None:
            self.policy.policy.check(self._known(), action, dataset)

    def read_view(self, dataset: str) -> ReadView | None:
        """Rows and fields this principal may read of ``dataset`` (None: everything)."""
        if self.policy is None:
            return None
        view = self.policy.policy.read_view(self._known(), dataset)
        return view if view.row_filter or view.hidden_fields else None

    def check_admin(self) -> None:
        """Changing the policy needs ``admin`` on every dataset (a grant on ``*``)."""
        if self.policy is not None and not self.policy.policy.allows(self._known(), "admin", "*"):
            raise AccessDenied(f"{self.principal!r} may not change the access policy",
                               hint="only a principal with admin on datasets '*' may")


def identify(store: StoreHandle, policy: Policy | None) -> tuple[str | None, str]:
    """(principal under ``policy`` or None, how the credentials were recognised)."""
    if store.location.scheme == "s3":
        creds = store.location.credentials
        key = creds.access_key if creds is not None else None
        identity = f"access key {key!r}" if key else "anonymous S3 access"
        return (policy.principal_for_key(key) if (policy and key) else None), identity
    user = getpass.getuser()
    return (policy.principal_for_os_user(user) if policy else None), f"OS user {user!r}"


def resolve(store: StoreHandle) -> AccessControl:
    """The policy in force on ``store`` and the principal behind its credentials."""
    version = read_policy(store)
    principal, identity = identify(store, version.policy if version else None)
    if version is None:
        principal = os.environ.get("ORCHESTRATOR_PRINCIPAL") or getpass.getuser()
    return AccessControl(version, principal, identity)
