"""Policy decisions (pure logic): grants, implication, row filters, hidden fields, errors."""

from __future__ import annotations

import pytest

from orchestrator.access.policy import parse_policy
from orchestrator.errors import AccessDenied, ConfigError

POLICY = """
principals:
  alice: {roles: [admin], access_keys: [ALICEKEY]}
  bob: {roles: [street-reader], access_keys: [BOBKEY]}
  carol: {roles: [street-reader, night-reader], os_users: [carol]}
  dave: {roles: [street-writer], access_keys: [DAVEKEY]}
  erin: {roles: [], access_keys: [ERINKEY]}
roles:
  admin:
    grants: [{datasets: "*", actions: [admin]}]
  street-reader:
    grants:
      - datasets: [street, "street-*"]
        actions: [read]
        row_filter: "attributes.consent = 'yes'"
        hidden_fields: [attributes.gps, instances.attributes.plate]
  night-reader:
    grants:
      - datasets: street
        actions: [read]
        row_filter: "'night' in tags"
        hidden_fields: [attributes.gps]
  street-writer:
    grants: [{datasets: street, actions: [write]}]
"""


@pytest.fixture
def policy():
    return parse_policy(POLICY)


def test_actions_and_globs(policy) -> None:
    assert policy.allows("alice", "admin", "anything")
    assert policy.allows("bob", "read", "street") and policy.allows("bob", "read", "street-night")
    assert not policy.allows("bob", "read", "streets")  # a glob, not a prefix
    assert not policy.allows("bob", "write", "street")
    assert policy.allows("dave", "read", "street")  # write implies read
    assert not policy.allows("dave", "admin", "street")
    assert not policy.allows("erin", "read", "street")
    assert not policy.allows("mallory", "read", "street")  # unknown principal


def test_denial_names_principal_action_dataset(policy) -> None:
    with pytest.raises(AccessDenied) as e:
        policy.check("bob", "write", "street")
    assert "'bob'" in str(e.value) and "write" in str(e.value) and "'street'" in str(e.value)


def test_row_filters_or_and_hidden_fields_intersect(policy) -> None:
    bob = policy.read_view("bob", "street")
    assert bob.row_filter == "(attributes.consent = 'yes')"
    assert bob.hidden_attributes == {"gps"} and bob.hidden_instance_attributes == {"plate"}
    carol = policy.read_view("carol", "street")  # two grants: more rows, fewer hidden fields
    assert carol.row_filter == "(attributes.consent = 'yes') or ('night' in tags)"
    assert carol.hidden_fields == {"attributes.gps"}
    assert policy.read_view("dave", "street").row_filter is None
    assert policy.read_view("alice", "street").hidden_fields == frozenset()


def test_identities(policy) -> None:
    assert policy.principal_for_key("BOBKEY") == "bob"
    assert policy.principal_for_key("nope") is None
    assert policy.principal_for_os_user("carol") == "carol"


@pytest.mark.parametrize("text, needle", [
    ("principals: {bob: {roles: [ghost]}}\nroles: {}", "unknown role 'ghost'"),
    ("roles: {r: {grants: [{datasets: x, actions: [fly]}]}}", "roles.r.grants.0.actions.0"),
    ("roles: {r: {grants: [{datasets: x, actions: [read], row_filter: 'labels.car >'}]}}", "row_filter"),
    ("roles: {r: {grants: [{datasets: x, actions: [read], hidden_fields: [gps]}]}}", "hidden fields are"),
    ("principals: {a: {access_keys: [K]}, b: {access_keys: [K]}}", "belongs to both"),
    ("principals: {a: {secret: x}}", "principals.a.secret"),
    ("roles: [oops", "not valid YAML at line"),
])
def test_bad_policies_are_config_errors(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_policy(text)
    assert needle in str(e.value)


def test_round_trip(policy) -> None:
    assert parse_policy(policy.to_yaml()) == policy
