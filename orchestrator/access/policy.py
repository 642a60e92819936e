"""The access policy: principals, roles and grants, and what they decide.

One YAML document (kept in the store, see ``access.store``), validated by pydantic::

    principals:
      alice: {roles: [admin], access_keys: [AKIA...ALICE]}     # s3:// identity: access key ids
      bob:   {roles: [street-reader], access_keys: [BOBKEY]}
      carol: {roles: [street-reader], os_users: [carol]}       # file:// (single-user) identity
    roles:
      admin:
        grants: [{datasets: "*", actions: [read, write, admin]}]
      street-reader:
        grants:
          - datasets: ["street", "street-*"]                   # fnmatch globs
            actions: [read]
            row_filter: "attributes.consent = 'yes' and not 'restricted' in tags"
            hidden_fields: [attributes.gps, instances.attributes.plate]

Semantics, chosen so that adding a grant can only add access:
* a principal may do an action on a dataset if any grant of any of its roles matches the dataset
  name and lists the action (``admin`` implies ``write`` implies ``read``);
* rows: if any matching read grant has no ``row_filter`` the principal sees every row; otherwise
  it sees the rows that match at least one of the filters (ORed);
* fields: a field is hidden only if every matching read grant hides it.
Secrets never appear here: principals are named by access key *ids*; the storage server holds
the secrets (``access.seaweed``) and proves them.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import AccessDenied, ConfigError, QueryError
from orchestrator.yaml_docs import load_mapping, validation_message

Action = Literal["read", "write", "admin"]
IMPLIES: dict[str, set[str]] = {"read": {"read"}, "write": {"read", "write"},
                                "admin": {"read", "write", "admin"}}
_HIDDEN = re.compile(r"^(attributes|instances\.attributes)\.[^.\s][^\s]*$")
_GLOB = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,127}\*?)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grant(_Strict):
    datasets: list[str] = Field(min_length=1, description="dataset name globs (fnmatch)")
    actions: list[Action] = Field(min_length=1)
    row_filter: str | None = Field(None, description="slice query: the rows this grant shows")
    hidden_fields: list[str] = Field(default_factory=list)

    @field_validator("datasets", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("datasets")
    @classmethod
    def _glob_shapes(cls, v: list[str]) -> list[str]:
        # Storage servers match grants as key globs where '*' also crosses '/': only an exact
        # name or a name prefix followed by one trailing '*' stays inside its datasets.
        for g in v:
            if not _GLOB.match(g):
                raise ValueError(f"dataset pattern {g!r}: use an exact name or a prefix ending in '*' "
                                 "(e.g. 'street', 'street-*', '*')")
        return v

    @field_validator("hidden_fields")
    @classmethod
    def _field_names(cls, v: list[str]) -> list[str]:
        for f in v:
            if not _HIDDEN.match(f):
                raise ValueError(f"{f!r}: hidden fields are attributes.<key> or instances.attributes.<key>")
        return v

    @field_validator("row_filter")
    @classmethod
    def _parses(cls, v: str | None) -> str | None:
        if v is not None:
            from orchestrator.query.parse import parse

            try:
                parse(v)
            except QueryError as exc:
                raise ValueError(f"row_filter is not a valid slice query: {exc.message}") from None
        return v

    def covers(self, dataset: str, action: str) -> bool:
        granted = set().union(*(IMPLIES[a] for a in self.actions))
        return action in granted and any(fnmatch.fnmatchcase(dataset, g) for g in self.datasets)


class Role(_Strict):
    grants: list[Grant] = Field(default_factory=list)


class Principal(_Strict):
    roles: list[str] = Field(default_factory=list)
    access_keys: list[str] = Field(default_factory=list, description="S3 access key ids (not secrets)")
    os_users: list[str] = Field(default_factory=list, description="file:// stores: OS user names")


@dataclass(frozen=True)
class ReadView:
    """What one principal sees of one dataset: rows (None: all) and hidden fields."""

    row_filter: str | None
    hidden_fields: frozenset[str]

    @property
    def hidden_attributes(self) -> frozenset[str]:
        return frozenset(f.split(".", 1)[1] for f in self.hidden_fields if f.startswith("attributes."))

    @property
    def hidden_instance_attributes(self) -> frozenset[str]:
        return frozenset(f.split(".", 2)[2] for f in self.hidden_fields if f.startswith("instances."))


class Policy(_Strict):
    principals: dict[str, Principal] = Field(default_factory=dict)
    roles: dict[str, Role] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Policy:
        for name, p in self.principals.items():
            if not _NAME.match(name):
                raise ValueError(f"principal name {name!r}: use lowercase letters, digits, '.', '_', '-'")
            for r in p.roles:
                if r not in self.roles:
                    raise ValueError(f"principal {name!r} has unknown role {r!r} (roles: {sorted(self.roles)})")
        seen: dict[str, str] = {}
        for name, p in self.principals.items():
            for key in [*p.access_keys, *(f"os:{u}" for u in p.os_users)]:
                if key in seen:
                    raise ValueError(f"{key!r} belongs to both {seen[key]!r} and {name!r}")
                seen[key] = name
        return self

    # -- identities -------------------------------------------------------------------------
    def principal_for_key(self, access_key_id: str) -> str | None:
        return next((n for n, p in self.principals.items() if access_key_id in p.access_keys), None)

    def principal_for_os_user(self, user: str) -> str | None:
        return next((n for n, p in self.principals.items() if user in p.os_users), None)

    # -- decisions ---------------------------------------------------------------------------
    def grants_for(self, principal: str) -> list[Grant]:
        p = self.principals.get(principal)
        return [g for r in (p.roles if p else []) for g in self.roles[r].grants]

    def allows(self, principal: str, action: str, dataset: str) -> bool:
        return any(g.covers(dataset, action) for g in self.grants_for(principal))

    def check(self, principal: str, action: str, dataset: str) -> None:
        """Raise AccessDenied naming principal, action and dataset unless allowed."""
        if not self.allows(principal, action, dataset):
            raise AccessDenied(
                f"{principal!r} may not {action} dataset {dataset!r}",
                hint="ask an admin for a grant (`orchestrator policy show` lists roles)",
            )

    def read_view(self, principal: str, dataset: str) -> ReadView:
        self.check(principal, "read", dataset)
        grants = [g for g in self.grants_for(principal) if g.covers(dataset, "read")]
        filters = [g.row_filter for g in grants]
        row_filter = None if any(f is None for f in filters) else " or ".join(f"({f})" for f in filters)
        hidden = frozenset.intersection(*(frozenset(g.hidden_fields) for g in grants))
        return ReadView(row_filter, hidden)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def parse_policy(text: str, source: str = "policy") -> Policy:
    """YAML text → Policy; every problem is a ConfigError naming the line or the key path."""
    doc = load_mapping(text, source, "principals, roles")
    try:
        return Policy.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, f"{source} is not a valid policy"),
                          hint="see docs/guides/access.md (the policy file, with an example)") from None
