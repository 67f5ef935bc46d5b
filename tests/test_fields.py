"""The gitlab.* field catalogue: every field on every captured payload, and every payload type variant.

Expected values are written out by hand (checked against the payloads in /work/shared/seed and the
semantics of the original plugin), never recomputed with the code under test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enrich.flatten import MalformedEvent, flatten
from falco_gitlab import fields as fields_module
from falco_gitlab.fields import (
    BY_NAME,
    CATALOGUE,
    LEGACY_FIELDS,
    Field,
    FieldContext,
    FieldType,
    compute_fields,
    lookup_path,
    plugin_fields,
    render,
)
from falco_gitlab.model import (
    ENRICHED_SCHEMA_VERSION,
    EnrichedRecord,
    GeoInfo,
    decode_enriched,
    decode_event,
    encode_enriched,
)
from tests.enrich_support import seed_payloads

RECEIVED_AT = 1_700_000_000_123_456_789

# Fields that depend on a GeoIP database: absent from every seed payload below because their addresses
# (198.41.0.4 and 198.41.0.40) are not in MaxMind's test databases and no geo lookup is given here.
GEO_FIELDS = ("city", "country", "countryisocode", "continent", "region", "regionisocode", "asn", "as_org")

SEED_EXPECTED: dict[str, tuple[int, dict[str, object]]] = {
    'add_gpg_key': (1707538164597000000, {
        'event_id': '1234567890',
        'event_type': 'add_gpg_key',
        'author_id': '1',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Added GPG key',
        'entity_id': '1',
        'entity_type': 'User',
        'entity_path': 'root',
        'created_at': '2024-02-10T04:09:24.597Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1',
        'target_type': 'GpgKey',
        'target_details': 'Administrator',
        'destination': 'gitlab-main',
    }),
    'cluster_agent_token_created': (1707539205617000000, {
        'event_id': '1234567890',
        'event_type': 'cluster_agent_token_created',
        'author_id': '1',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': "Created cluster agent token 'testcluster' with id 2",
        'entity_id': '1',
        'entity_type': 'Project',
        'entity_path': 'test/test',
        'created_at': '2024-02-10T04:26:45.617Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '2',
        'target_type': 'Clusters::Agent',
        'target_details': 'testcluster',
        'destination': 'gitlab-main',
    }),
    'created_group_namespace_filter': (1721291670069000000, {
        'event_id': '1234567890',
        'event_type': 'created_group_namespace_filter',
        'author_id': '1',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Created namespace filter for group audit event streaming destination.',
        'entity_id': '1',
        'entity_type': 'Group',
        'entity_path': 'test',
        'created_at': '2024-07-18T08:34:30.069Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1',
        'target_type': 'AuditEvents::Group::ExternalStreamingDestination',
        'target_details': 'test_name',
        'event_name': 'created_group_namespace_filter',
        'destination': 'gitlab-main',
    }),
    'created_instance_namespace_filter': (1721291939628000000, {
        'event_id': '1234567890',
        'event_type': 'created_instance_namespace_filter',
        'author_id': '1',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Created namespace filter for instance audit event streaming destination.',
        'entity_id': '1',
        'entity_type': 'Gitlab::Audit::InstanceScope',
        'entity_path': 'gitlab_instance',
        'created_at': '2024-07-18T08:38:59.628Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1',
        'target_type': 'AuditEvents::Instance::ExternalStreamingDestination',
        'target_details': 'testdest7',
        'event_name': 'created_instance_namespace_filter',
        'destination': 'gitlab-main',
    }),
    'destroy_instance_event_streaming_destination': (1719345797405000000, {
        'event_id': '1234567890',
        'event_type': 'destroy_instance_event_streaming_destination',
        'author_id': '1234567890',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Destroy instance event streaming destination http://198.41.0.4',
        'entity_id': '1234567890',
        'entity_type': 'Gitlab::Audit::InstanceScope',
        'entity_path': 'gitlab_instance',
        'created_at': '2024-06-25T20:03:17.405Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1234567890',
        'target_type': 'AuditEvents::InstanceExternalAuditEventDestination',
        'target_details': 'test',
        'event_name': 'destroy_instance_event_streaming_destination',
        'destination': 'gitlab-main',
    }),
    'event_type_filters_created': (1707417953108000000, {
        'event_id': '1234567890',
        'event_type': 'event_type_filters_created',
        'author_id': '1234567890',
        'author_name': 'Test User',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': (
            'Created audit event type filter(s): allow_author_approval_updated, '
            'allow_committer_approval_updated'
        ),
        'entity_id': '1234567890',
        'entity_type': 'Group',
        'entity_path': 'group_name',
        'created_at': '2024-02-08T18:45:53.108Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1234567890',
        'target_type': 'AuditEvents::ExternalAuditEventDestination',
        'target_details': 'falco',
        'destination': 'gitlab-main',
    }),
    'group_access_token_created': (1707538400364000000, {
        'event_id': '1234567890',
        'event_type': 'group_access_token_created',
        'author_id': '1',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Created group token with token_id: 2 with scopes: ["read_api"].',
        'entity_id': '2',
        'entity_type': 'Group',
        'entity_path': 'test',
        'created_at': '2024-02-10T04:13:20.364Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '2',
        'target_type': 'PersonalAccessToken',
        'target_details': '6543',
        'destination': 'gitlab-main',
    }),
    'group_deploy_token_created': (1707418905053000000, {
        'event_id': '1234567890',
        'event_type': 'group_deploy_token_created',
        'author_id': '1234567890',
        'author_name': 'Test User',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': (
            'Created group deploy token with name: token-name with token_id: 1234567890 with '
            'scopes: [:read_repository].'
        ),
        'entity_id': '1234567890',
        'entity_type': 'Group',
        'entity_path': 'group_name',
        'created_at': '2024-02-08T19:01:45.053Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1234567890',
        'target_type': 'DeployToken',
        'target_details': 'token-name',
        'destination': 'gitlab-main',
    }),
    'group_require_two_factor_authentication_updated': (1707414367057000000, {
        'event_id': '1234567890',
        'event_type': 'group_require_two_factor_authentication_updated',
        'author_id': '1234567890',
        'author_name': 'Test User',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Changed require_two_factor_authentication from false to true',
        'entity_id': '1234567890',
        'entity_type': 'Group',
        'entity_path': 'group_name',
        'created_at': '2024-02-08T17:46:07.057Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'op_type': 'change',
        'op_item': 'require_two_factor_authentication',
        'op_changed_from': 'false',
        'op_changed_to': 'true',
        'target_id': '1234567890',
        'target_type': 'Group',
        'target_details': 'group_name',
        'destination': 'gitlab-main',
    }),
    'ip_restrictions_changed': (1719362175487000000, {
        'event_id': '1234567890',
        'event_type': 'ip_restrictions_changed',
        'author_id': '1234567890',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': "Group IP restrictions updated from '' to '172.0.0.0/8'",
        'entity_id': '1234567890',
        'entity_type': 'Group',
        'entity_path': 'test',
        'created_at': '2024-06-26T00:36:15.487Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1234567890',
        'target_type': 'Group',
        'target_details': 'test',
        'event_name': 'ip_restrictions_changed',
        'destination': 'gitlab-main',
    }),
    'login_failed_with_otp_authentication': (1707537764540000000, {
        'event_id': '1234567890',
        'event_type': 'login_failed_with_otp_authentication',
        'author_id': '1',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Failed to login with OTP authentication',
        'entity_id': '1',
        'entity_type': 'User',
        'entity_path': 'root',
        'failed_login': 'OTP',
        'created_at': '2024-02-10T04:02:44.540Z',
        'ip_address': '198.41.0.40',
        'client_ip': '198.41.0.40',
        'ip_private': False,
        'target_id': '1',
        'target_type': 'User',
        'target_details': 'Administrator',
        'destination': 'gitlab-main',
    }),
    'login_failed_with_standard_authentication': (1707537441347000000, {
        'event_id': '1234567890',
        'event_type': 'login_failed_with_standard_authentication',
        'author_id': '-1',
        'author_name': 'root',
        'author_class': 'Gitlab::Audit::UnauthenticatedAuthor',
        'author_kind': 'unauthenticated',
        'custom_message': 'Failed to login with STANDARD authentication',
        'entity_id': '1',
        'entity_type': 'Gitlab::Audit::InstanceScope',
        'entity_path': 'gitlab_instance',
        'failed_login': 'STANDARD',
        'created_at': '2024-02-10T03:57:21.347Z',
        'ip_address': '198.41.0.40',
        'client_ip': '198.41.0.40',
        'ip_private': False,
        'target_id': '-1',
        'target_type': 'Gitlab::Audit::UnauthenticatedAuthor',
        'target_details': 'root',
        'destination': 'gitlab-main',
    }),
    'personal_access_token_created': (1707538274903000000, {
        'event_id': '1234567890',
        'event_type': 'personal_access_token_created',
        'author_id': '1',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Created personal access token with id 1',
        'entity_id': '1',
        'entity_type': 'User',
        'entity_path': 'root',
        'created_at': '2024-02-10T04:11:14.903Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1',
        'target_type': 'User',
        'target_details': 'Administrator',
        'destination': 'gitlab-main',
    }),
    'policy_project_updated': (1719460490594000000, {
        'event_id': '1234567890',
        'event_type': 'policy_project_updated',
        'author_id': '1234567890',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Unlinked test - Security policy project as the security policy project',
        'entity_id': '1234567890',
        'entity_type': 'Project',
        'entity_path': 'test/test',
        'created_at': '2024-06-27T03:54:50.594Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1234567890',
        'target_type': 'Project',
        'target_details': 'test - Security policy project',
        'event_name': 'policy_project_updated',
        'destination': 'gitlab-main',
    }),
    'project_access_token_created': (1707379396583000000, {
        'event_id': '1234567890',
        'event_type': 'project_access_token_created',
        'author_id': '1234567890',
        'author_name': 'Test User',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': (
            'Created project access token with token_id: 1234567890 with scopes: [:api, '
            ':read_api, :create_runner, :k8s_proxy, :read_repository, :write_repository, '
            ':read_registry, :write_registry, :read_observability, :write_observability, '
            ':ai_features] and Guest access level.'
        ),
        'entity_id': '1234567890',
        'entity_type': 'Project',
        'entity_path': 'group_name/project_name',
        'created_at': '2024-02-08T08:03:16.583Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1234567890',
        'target_type': 'PersonalAccessToken',
        'target_details': 'token-name',
        'destination': 'gitlab-main',
    }),
    'project_access_token_deleted': (1707379387992000000, {
        'event_id': '1234567890',
        'event_type': 'project_access_token_deleted',
        'author_id': '1234567890',
        'author_name': 'Test User',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Revoked project access token with token_id: 1234567890',
        'entity_id': '1234567890',
        'entity_type': 'Project',
        'entity_path': 'group_name/project_name',
        'created_at': '2024-02-08T08:03:07.992Z',
        'ip_address': '198.41.0.40',
        'client_ip': '198.41.0.40',
        'ip_private': False,
        'target_id': '1234567890',
        'target_type': 'PersonalAccessToken',
        'target_details': 'token-name',
        'destination': 'gitlab-main',
    }),
    'project_require_password_to_approve_updated': (1719454184170000000, {
        'event_id': '1234567890',
        'event_type': 'project_require_password_to_approve_updated',
        'author_id': '1234567890',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Changed require user password for approvals from true to false',
        'entity_id': '1234567890',
        'entity_type': 'Project',
        'entity_path': 'test/test',
        'created_at': '2024-06-27T02:09:44.170Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'op_type': 'change',
        'op_item': 'require user password for approvals',
        'op_changed_from': 'true',
        'op_changed_to': 'false',
        'target_id': '1234567890',
        'target_type': 'Project',
        'target_details': 'test/test',
        'event_name': 'project_require_password_to_approve_updated',
        'destination': 'gitlab-main',
    }),
    'repository_git_opeation': (1708303955819000000, {
        'event_id': '1',
        'event_type': 'repository_git_operation',
        'author_id': '1',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': '{"protocol":"web","action":"git-receive-pack"}',
        'entity_id': '1',
        'entity_type': 'Project',
        'entity_path': 'test/test',
        'created_at': '2024-02-19T00:52:35.819Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1',
        'target_type': 'Project',
        'target_details': 'test',
        'git_protocol': 'web',
        'git_action': 'git-receive-pack',
        'destination': 'gitlab-main',
    }),
    'require_reauthentication_to_approve_updated': (1719454184199000000, {
        'event_id': '1234567890',
        'event_type': 'require_reauthentication_to_approve_updated',
        'author_id': '1234567890',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Changed require_reauthentication_to_approve from true to false',
        'entity_id': '1234567890',
        'entity_type': 'Project',
        'entity_path': 'test/test',
        'created_at': '2024-06-27T02:09:44.199Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'op_type': 'change',
        'op_item': 'require_reauthentication_to_approve',
        'op_changed_from': 'true',
        'op_changed_to': 'false',
        'target_id': '1234567890',
        'target_type': 'ProjectSetting',
        'target_details': 'test/test',
        'event_name': 'require_reauthentication_to_approve_updated',
        'destination': 'gitlab-main',
    }),
    'update_instance_event_streaming_destination': (1719346109645000000, {
        'event_id': '1234567890',
        'event_type': 'update_instance_event_streaming_destination',
        'author_id': '1234567890',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Changed name from falco1 to falco2',
        'entity_id': '1234567890',
        'entity_type': 'Gitlab::Audit::InstanceScope',
        'entity_path': 'gitlab_instance',
        'created_at': '2024-06-25T20:08:29.645Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'op_type': 'change',
        'op_item': 'name',
        'op_changed_from': 'falco1',
        'op_changed_to': 'falco2',
        'target_id': '1234567890',
        'target_type': 'AuditEvents::InstanceExternalAuditEventDestination',
        'target_details': 'falco1',
        'event_name': 'update_instance_event_streaming_destination',
        'destination': 'gitlab-main',
    }),
    'user_admin_status_updated': (1719376520691000000, {
        'event_id': '1234567890',
        'event_type': 'user_admin_status_updated',
        'author_id': '1234567890',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Changed admin status from false to true',
        'entity_id': '1234567890',
        'entity_type': 'User',
        'entity_path': 'test',
        'created_at': '2024-06-26T04:35:20.691Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'op_type': 'change',
        'op_item': 'admin status',
        'op_changed_from': 'false',
        'op_changed_to': 'true',
        'target_id': '1234567890',
        'target_type': 'User',
        'target_details': 'test',
        'event_name': 'user_admin_status_updated',
        'destination': 'gitlab-main',
    }),
    'user_disable_two_factor': (1707537887768000000, {
        'event_id': '1234567890',
        'event_type': 'user_disable_two_factor',
        'author_id': '1',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Disabled two-factor authentication',
        'entity_id': '1',
        'entity_type': 'User',
        'entity_path': 'root',
        'created_at': '2024-02-10T04:04:47.768Z',
        'ip_address': '198.41.0.40',
        'client_ip': '198.41.0.40',
        'ip_private': False,
        'target_id': '1',
        'target_type': 'User',
        'target_details': 'Administrator',
        'destination': 'gitlab-main',
    }),
    'user_impersonation': (1719452884000000000, {
        'event_id': '1234567890',
        'event_type': 'user_impersonation',
        'author_id': '1234567890',
        'author_name': 'Administrator',
        'author_class': 'User',
        'author_kind': 'user',
        'custom_message': 'Started Impersonation',
        'entity_id': '1234567890',
        'entity_type': 'User',
        'entity_path': 'root',
        'created_at': '2024-06-27T01:48:04.000Z',
        'ip_address': '198.41.0.4',
        'client_ip': '198.41.0.4',
        'ip_private': False,
        'target_id': '1234567890',
        'target_type': 'User',
        'target_details': 'test',
        'event_name': 'user_impersonation',
        'destination': 'gitlab-main',
    }),
}


def enrich(raw: bytes | dict[str, object], *, destination: str | None = "gitlab-main",
           header_event_type: str | None = None, geo: object = None) -> EnrichedRecord:
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return flatten(data, destination=destination, header_event_type=header_event_type,
                   received_at_ns=RECEIVED_AT, geo=geo)  # type: ignore[arg-type]


def fields_of(raw: bytes | dict[str, object], **kwargs: object) -> dict[str, object]:
    return enrich(raw, **kwargs).fields  # type: ignore[arg-type]


# --- the catalogue itself --------------------------------------------------------------------------


def test_catalogue_keeps_the_25_original_fields_in_order() -> None:
    assert LEGACY_FIELDS == (
        "event_id", "event_type", "author_id", "author_name", "author_email", "author_class",
        "custom_message", "city", "country", "countryisocode", "continent", "entity_id", "entity_type",
        "entity_path", "failed_login", "created_at", "ip_address", "op_type", "op_item", "op_changed_from",
        "op_changed_to", "target_id", "target_type", "target_details", "pluginerrormessage",
    )
    assert all(BY_NAME[name].type == "string" for name in LEGACY_FIELDS)


def test_catalogue_names_are_unique_and_plugin_json_matches() -> None:
    names = [f.name for f in CATALOGUE]
    assert len(names) == len(set(names))
    exported = plugin_fields()
    assert [entry["name"] for entry in exported] == ["gitlab." + name for name in names]
    assert {entry["name"]: entry["type"] for entry in exported}["gitlab.asn"] == "uint64"
    assert {entry["name"]: entry["type"] for entry in exported}["gitlab.ip_private"] == "bool"
    value = next(entry for entry in exported if entry["name"] == "gitlab.value")
    assert value["arg"] == {"isRequired": True, "isKey": True}


def test_seed_directory_has_the_captured_payloads() -> None:
    assert sorted(seed_payloads()) == sorted(SEED_EXPECTED)
    assert len(SEED_EXPECTED) == 23


# --- every field on every captured payload ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SEED_EXPECTED))
def test_seed_payload_fields(name: str) -> None:
    raw = seed_payloads()[name]
    record = enrich(raw)
    expected_ts, expected_fields = SEED_EXPECTED[name]
    assert record.fields == expected_fields
    assert record.ts == expected_ts
    assert record.version == ENRICHED_SCHEMA_VERSION
    assert record.raw == raw  # the original bytes, untouched
    for field in (*GEO_FIELDS, "pluginerrormessage", "author_email", "op_as", "op_with"):
        assert field not in record.fields
    # Every computed value has the type the catalogue declares.
    for key, value in record.fields.items():
        declared = BY_NAME[key].type
        assert isinstance(value, {"string": str, "uint64": int, "bool": bool}[declared]), key


@pytest.mark.parametrize("name", sorted(SEED_EXPECTED))
def test_seed_payload_round_trips_through_the_enriched_encoding(name: str) -> None:
    record = enrich(seed_payloads()[name])
    assert decode_enriched(encode_enriched(record)) == record


def test_seed_payload_with_geo_lookup() -> None:
    seen: list[str] = []

    def geo(ip: str) -> GeoInfo | None:
        seen.append(ip)
        return GeoInfo(city="London", country="United Kingdom", country_iso="GB", continent="Europe",
                       region="England", region_iso="GB-ENG", asn=20712, as_org="Andrews & Arnold Ltd")

    fields = fields_of(seed_payloads()["project_access_token_deleted"], geo=geo)
    assert seen == ["198.41.0.40"]  # details.ip_address wins over the top-level 198.41.0.4
    assert {k: fields[k] for k in GEO_FIELDS} == {
        "city": "London", "country": "United Kingdom", "countryisocode": "GB", "continent": "Europe",
        "region": "England", "regionisocode": "GB-ENG", "asn": 20712, "as_org": "Andrews & Arnold Ltd",
    }


def test_partial_geo_info_leaves_the_rest_absent() -> None:
    fields = fields_of(seed_payloads()["add_gpg_key"], geo=lambda ip: GeoInfo(country="Japan",
                                                                             country_iso="JP",
                                                                             continent="Asia"))
    assert (fields["country"], fields["countryisocode"], fields["continent"]) == ("Japan", "JP", "Asia")
    for field in ("city", "region", "regionisocode", "asn", "as_org"):
        assert field not in fields


# --- ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (1234567890, "1234567890"),
    ("1234567890", "1234567890"),
    (1707538164, "1707538164"),  # Unix seconds
    ("6f1c7a52-3b1e-4d5f-9a1c-2b3c4d5e6f70", "6f1c7a52-3b1e-4d5f-9a1c-2b3c4d5e6f70"),
    (0, "0"),
    (-5, "-5"),
    (2**70, "1180591620717411303424"),
])
def test_event_id_variants(value: object, expected: str) -> None:
    assert fields_of({"id": value, "event_type": "x"})["event_id"] == expected


def test_event_id_absent_and_null() -> None:
    assert "event_id" not in fields_of({"event_type": "x"})
    assert "event_id" not in fields_of({"id": None, "event_type": "x"})


@pytest.mark.parametrize(("author_id", "author_id_field", "kind"), [
    (-1, "-1", "unauthenticated"),
    (-2, "-2", "deploy_token"),
    (-3, "-3", "deploy_key"),
    (-4, "-4", "indexer"),
    ("-1", "-1", "unauthenticated"),
    ("-3", "-3", "deploy_key"),
    (1, "1", "user"),
    ("42", "42", "user"),
    (0, "0", "system"),
    (-9, "-9", "system"),
    ("not-a-number", "not-a-number", None),
])
def test_author_id_and_kind(author_id: object, author_id_field: str, kind: str | None) -> None:
    fields = fields_of({"author_id": author_id, "event_type": "x"})
    assert fields["author_id"] == author_id_field
    assert fields.get("author_kind") == kind


def test_author_absent() -> None:
    fields = fields_of({"event_type": "x"})
    assert "author_id" not in fields and "author_kind" not in fields


@pytest.mark.parametrize(("event", "expected"), [
    ({"target_id": "abc-123"}, "abc-123"),
    ({"target_id": 7}, "7"),
    ({"target_id": -1}, "-1"),
    ({"details": {"target_id": "from-details"}}, "from-details"),
    ({"details": {"target_id": 9}}, "9"),
    ({"target_id": 1, "details": {"target_id": 2}}, "1"),  # top level first
    ({"entity_id": "ent"}, None),
])
def test_target_id_variants(event: dict[str, object], expected: str | None) -> None:
    assert fields_of({**event, "event_type": "x"}).get("target_id") == expected


def test_entity_id_as_string_and_number() -> None:
    assert fields_of({"entity_id": "99", "event_type": "x"})["entity_id"] == "99"
    assert fields_of({"entity_id": 99, "event_type": "x"})["entity_id"] == "99"


# --- top level vs details -----------------------------------------------------------------------------


def test_attributes_fall_back_to_details() -> None:
    fields = fields_of({"event_type": "x", "details": {
        "author_name": "alice", "author_email": "alice@example.com", "author_class": "User",
        "entity_path": "grp/proj", "target_type": "Project", "target_details": "proj",
    }})
    assert (fields["author_name"], fields["author_email"], fields["author_class"], fields["entity_path"],
            fields["target_type"], fields["target_details"]) == (
        "alice", "alice@example.com", "User", "grp/proj", "Project", "proj")


def test_top_level_attributes_win_over_details() -> None:
    fields = fields_of({"event_type": "x", "author_name": "top", "author_email": "top@example.com",
                        "entity_path": "top/path", "target_type": "Top", "target_details": "top-d",
                        "details": {"author_name": "det", "author_email": "det@example.com",
                                    "entity_path": "det/path", "target_type": "Det",
                                    "target_details": "det-d"}})
    assert (fields["author_name"], fields["author_email"], fields["entity_path"], fields["target_type"],
            fields["target_details"]) == ("top", "top@example.com", "top/path", "Top", "top-d")


def test_scalar_attributes_of_other_types_are_rendered() -> None:
    fields = fields_of({"event_type": "x", "author_name": 12, "target_details": True,
                        "entity_type": 1.5, "details": {"failed_login": False}})
    assert (fields["author_name"], fields["target_details"], fields["entity_type"],
            fields["failed_login"]) == ("12", "true", "1.5", "false")


# --- custom_message -----------------------------------------------------------------------------------


def test_custom_message_string() -> None:
    fields = fields_of({"event_type": "x", "details": {"custom_message": "Added GPG key"}})
    assert fields["custom_message"] == "Added GPG key"
    assert "git_protocol" not in fields and "git_action" not in fields


@pytest.mark.parametrize(("message", "rendered", "protocol", "action"), [
    ({"protocol": "ssh", "action": "git-upload-pack"}, '{"protocol":"ssh","action":"git-upload-pack"}',
     "ssh", "git-upload-pack"),
    ({"protocol": "http", "action": "git-receive-pack"}, '{"protocol":"http","action":"git-receive-pack"}',
     "http", "git-receive-pack"),
    ({"action": "git-upload-pack", "protocol": "web", "extra": [1, {"k": None}]},
     '{"action":"git-upload-pack","protocol":"web","extra":[1,{"k":null}]}', "web", "git-upload-pack"),
    ({"note": "Ünïcode & = chars"}, '{"note":"Ünïcode & = chars"}', None, None),
    ({}, "{}", None, None),
])
def test_custom_message_object(message: dict[str, object], rendered: str, protocol: str | None,
                               action: str | None) -> None:
    fields = fields_of({"event_type": "repository_git_operation", "details": {"custom_message": message}})
    assert fields["custom_message"] == rendered
    assert fields.get("git_protocol") == protocol
    assert fields.get("git_action") == action


def test_custom_message_list_and_number() -> None:
    listed = fields_of({"event_type": "x", "details": {"custom_message": ["a", 1]}})
    assert listed["custom_message"] == '["a",1]'
    assert fields_of({"event_type": "x", "details": {"custom_message": 3}})["custom_message"] == "3"
    assert "custom_message" not in fields_of({"event_type": "x", "details": {"custom_message": None}})


# --- operations and from/to ---------------------------------------------------------------------------


@pytest.mark.parametrize(("details", "op_type", "op_item"), [
    ({"add": "ssh_key"}, "add", "ssh_key"),
    ({"change": "admin status"}, "change", "admin status"),
    ({"remove": "member"}, "remove", "member"),
    ({"add": "a", "change": "c", "remove": "r"}, "add", "a"),  # add, then change, then remove
    ({"change": "c", "remove": "r"}, "change", "c"),
    ({"change": 5}, "change", "5"),
    ({"remove": True}, "remove", "true"),
    ({}, None, None),
])
def test_op_type_and_item(details: dict[str, object], op_type: str | None, op_item: str | None) -> None:
    fields = fields_of({"event_type": "x", "details": details})
    assert fields.get("op_type") == op_type
    assert fields.get("op_item") == op_item


@pytest.mark.parametrize(("value", "rendered"), [
    (True, "true"),
    (False, "false"),
    (0, "0"),
    (30, "30"),
    (-1, "-1"),
    (2.5, "2.5"),
    ("private", "private"),
    ("", ""),
    ([1, "a"], '[1,"a"]'),
    ({"k": "v"}, '{"k":"v"}'),
    (None, None),
])
def test_from_to_keep_their_native_type(value: object, rendered: str | None) -> None:
    fields = fields_of({"event_type": "x", "details": {"change": "setting", "from": value, "to": value}})
    assert fields.get("op_changed_from") == rendered
    assert fields.get("op_changed_to") == rendered


def test_from_without_to() -> None:
    fields = fields_of({"event_type": "x", "details": {"change": "visibility", "from": "private"}})
    assert fields["op_changed_from"] == "private"
    assert "op_changed_to" not in fields


def test_op_as_and_with() -> None:
    fields = fields_of({"event_type": "member_created",
                        "details": {"add": "user_access", "as": "Developer", "with": "saml"}})
    assert (fields["op_type"], fields["op_item"], fields["op_as"], fields["op_with"]) == (
        "add", "user_access", "Developer", "saml")


# --- ip addresses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("event", "ip_address", "client_ip", "private"), [
    ({"ip_address": "81.2.69.142"}, "81.2.69.142", "81.2.69.142", False),
    ({"ip_address": None}, None, None, None),
    ({"ip_address": ""}, None, None, None),
    ({"ip_address": "   "}, None, None, None),
    ({"ip_address": "81.2.69.142, 10.0.0.1"}, "81.2.69.142, 10.0.0.1", "81.2.69.142", False),
    ({"ip_address": "10.1.2.3,81.2.69.142"}, "10.1.2.3,81.2.69.142", "10.1.2.3", True),
    ({"ip_address": "2001:218::1"}, "2001:218::1", "2001:218::1", False),
    ({"ip_address": "::1"}, "::1", "::1", True),
    ({"ip_address": "127.0.0.1"}, "127.0.0.1", "127.0.0.1", True),
    ({"ip_address": "192.168.1.20"}, "192.168.1.20", "192.168.1.20", True),
    ({"ip_address": "not-an-ip"}, "not-an-ip", "not-an-ip", None),
    ({"ip_address": ", 81.2.69.142"}, ", 81.2.69.142", None, None),
    # details.ip_address first; an empty one falls back to the top level
    ({"ip_address": "1.1.1.1", "details": {"ip_address": "81.2.69.142"}}, "81.2.69.142", "81.2.69.142",
     False),
    ({"ip_address": "81.2.69.142", "details": {"ip_address": ""}}, "81.2.69.142", "81.2.69.142", False),
    ({"ip_address": "81.2.69.142", "details": {"ip_address": None}}, "81.2.69.142", "81.2.69.142", False),
])
def test_ip_address_variants(event: dict[str, object], ip_address: str | None, client_ip: str | None,
                             private: bool | None) -> None:
    fields = fields_of({**event, "event_type": "x"})
    assert fields.get("ip_address") == ip_address
    assert fields.get("client_ip") == client_ip
    assert fields.get("ip_private") == private


def test_the_first_address_of_a_list_is_geolocated() -> None:
    seen: list[str] = []

    def geo(ip: str) -> GeoInfo | None:
        seen.append(ip)
        return GeoInfo(city="London") if ip == "81.2.69.142" else None

    fields = fields_of({"event_type": "x", "ip_address": "81.2.69.142, 89.160.20.112"}, geo=geo)
    assert seen == ["81.2.69.142"]
    assert fields["city"] == "London"


def test_no_address_no_lookup() -> None:
    def geo(ip: str) -> GeoInfo | None:
        raise AssertionError("must not be called")

    fields = fields_of({"event_type": "x", "ip_address": ""}, geo=geo)
    assert "city" not in fields and "pluginerrormessage" not in fields


def test_unlocatable_address_is_reported_not_fatal() -> None:
    def geo(ip: str) -> GeoInfo | None:
        ipaddress.ip_address(ip)  # raises ValueError like enrich.geo.GeoIP.lookup
        return None

    fields = fields_of({"event_type": "x", "ip_address": "bogus, 81.2.69.142"}, geo=geo)
    assert fields["pluginerrormessage"] == "cannot geolocate 'bogus': not an IP address"
    assert fields["client_ip"] == "bogus"
    assert "city" not in fields


# --- event type, time, destination --------------------------------------------------------------------


def test_event_type_from_header_when_body_has_none() -> None:
    assert fields_of({"id": 1}, header_event_type="user_blocked")["event_type"] == "user_blocked"
    empty = fields_of({"id": 1, "event_type": ""}, header_event_type="user_blocked")
    assert empty["event_type"] == "user_blocked"
    # the body wins when both are there
    assert fields_of({"event_type": "a"}, header_event_type="b")["event_type"] == "a"


def test_no_event_type_at_all_is_malformed() -> None:
    with pytest.raises(MalformedEvent, match="no event_type"):
        enrich({"id": 1})


@pytest.mark.parametrize(("created_at", "ts"), [
    ("2024-02-10T04:09:24.597Z", 1707538164597000000),
    ("2024-02-10T04:09:24Z", 1707538164000000000),
    ("2024-02-10T05:09:24.597+01:00", 1707538164597000000),
    ("2024-02-10T04:09:24.000001Z", 1707538164000001000),
])
def test_created_at_is_the_event_time(created_at: str, ts: int) -> None:
    record = enrich({"event_type": "x", "created_at": created_at})
    assert record.ts == ts
    assert record.fields["created_at"] == created_at
    assert "pluginerrormessage" not in record.fields


@pytest.mark.parametrize("created_at", ["yesterday", "2024-02-10T04:09:24.597", "2024-13-45T00:00:00Z"])
def test_bad_created_at_falls_back_to_receive_time(created_at: str) -> None:
    record = enrich({"event_type": "x", "created_at": created_at})
    assert record.ts == RECEIVED_AT
    assert record.fields["created_at"] == created_at
    assert record.fields["pluginerrormessage"] == (
        f"unparseable created_at {created_at!r}; using receive time")


def test_missing_created_at_uses_receive_time() -> None:
    record = enrich({"event_type": "x"})
    assert record.ts == RECEIVED_AT
    assert "created_at" not in record.fields


def test_destination_field() -> None:
    assert fields_of({"event_type": "x"}, destination="gitlab-eu")["destination"] == "gitlab-eu"
    assert "destination" not in fields_of({"event_type": "x"}, destination=None)


def test_event_name() -> None:
    assert fields_of({"event_type": "x", "details": {"event_name": "user_impersonation"}})["event_name"] == (
        "user_impersonation")


def test_minimal_event_has_only_what_it_carries() -> None:
    assert fields_of({"event_type": "x"}, destination=None) == {"event_type": "x"}


# --- unknown keys, raw bytes, path lookups ------------------------------------------------------------


def test_unknown_keys_pass_through_in_raw() -> None:
    raw = (b'{"id":1,"event_type":"x","brand_new":{"nested":[1,2,{"deep":"yes"}]},'
           b'"details":{"author_name":"a","future_key":"kept","and&eq=":"v"}}')
    record = enrich(raw)
    assert record.raw == raw
    document = json.loads(record.raw)
    assert lookup_path(document, "brand_new.nested.2.deep") == "yes"
    assert lookup_path(document, "details.future_key") == "kept"
    assert lookup_path(document, "details.and&eq=") == "v"


LOOKUP_DOC = {
    "id": 5,
    "details": {"change": "visibility", "from": False, "to": 20, "list": ["a", {"b": "c"}, None],
                "obj": {"x": 1, "y": [True]}, "empty": "", "null": None},
    "tags": [],
}


@pytest.mark.parametrize(("path", "expected"), [
    ("id", "5"),
    ("details.change", "visibility"),
    ("details.from", "false"),
    ("details.to", "20"),
    ("details.list.0", "a"),
    ("details.list.1.b", "c"),
    ("details.list.-1", None),  # null item
    ("details.list.-2.b", "c"),
    ("details.list.3", None),  # out of range
    ("details.list.-4", None),
    ("details.list.x", None),  # not an index
    ("details.obj", '{"x":1,"y":[true]}'),
    ("details.obj.y", "[true]"),
    ("details.obj.y.0", "true"),
    ("details.empty", ""),
    ("details.null", None),
    ("details.missing", None),
    ("details.change.deeper", None),  # into a string
    ("tags", "[]"),
    ("tags.0", None),
    ("nope", None),
    ("", None),
])
def test_lookup_path(path: str, expected: str | None) -> None:
    assert lookup_path(LOOKUP_DOC, path) == expected


# --- what is not an audit event -----------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "not JSON"),
    (b"not json", "not JSON"),
    (b'{"id":1,', "not JSON"),
    (b"[1, 2]", "invalid audit event"),
    (b'"a string"', "invalid audit event"),
    (b'{"id": {"nested": 1}, "event_type": "x"}', "invalid audit event"),
    (b'{"id": 1.5, "event_type": "x"}', "invalid audit event"),
    (b'{"event_type": 5}', "invalid audit event"),
    (b'{"event_type": "x", "ip_address": 12}', "invalid audit event"),
    (b'{"event_type": "x", "details": []}', "invalid audit event"),
    (b'{"id": 1}', "no event_type"),
])
def test_malformed_payloads(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent) as info:
        enrich(raw)
    assert str(info.value).startswith(reason)


_json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                 | st.text())
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_keys = st.sampled_from(["id", "author_id", "entity_id", "entity_type", "entity_path", "author_name",
                         "ip_address", "target_id", "target_type", "target_details", "created_at",
                         "event_type", "details", "custom_message", "from", "to", "add", "change",
                         "remove", "as", "with", "failed_login", "event_name", "author_class"])
_event = st.dictionaries(_keys, _json | st.dictionaries(_keys, _json, max_size=6), max_size=10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_event)
def test_any_json_object_either_enriches_or_is_malformed(event: dict[str, object]) -> None:
    raw = msgspec.json.encode(event)
    try:
        record = enrich(raw, header_event_type="fallback", geo=lambda ip: None)
    except MalformedEvent:
        return
    assert record.raw == raw
    for key, value in record.fields.items():
        assert isinstance(value, str | int | bool), key
        assert value is not None
    assert decode_enriched(encode_enriched(record)) == record


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_either_enrich_or_are_malformed(raw: bytes) -> None:
    with contextlib.suppress(MalformedEvent):
        enrich(raw, header_event_type="fallback")


# --- the generated computation ------------------------------------------------------------------------
#
# compute_fields runs one function generated from the catalogue's descriptions (falco_gitlab.fields,
# "how a field is computed"). Here each description is evaluated the plain way, attribute by attribute,
# and the generated code must agree on every field, value type and order.


def _described_value(how: object, ctx: FieldContext) -> object:
    event, details = ctx.event, ctx.event.details
    if isinstance(how, fields_module.Attr):
        top = getattr(event, how.name)
        return render(top) if top is not None or not how.details else render(getattr(details, how.name))
    if isinstance(how, fields_module.Detail):
        return render(getattr(details, how.name))
    if isinstance(how, fields_module.DetailKey):
        value = getattr(details, how.name)
        return render(value.get(how.key)) if isinstance(value, dict) else None
    if isinstance(how, fields_module.FirstDetail):
        for name in how.names:
            if getattr(details, name) is not None:
                return name if how.part == "name" else render(getattr(details, name))
        return None
    if isinstance(how, fields_module.Input):
        return getattr(ctx, how.name)
    if isinstance(how, fields_module.Geo):
        return getattr(ctx.geo, how.name) if ctx.geo is not None else None
    if isinstance(how, fields_module.Call):
        arguments = {"event": event, "details": details, "destination": ctx.destination,
                     "header_event_type": ctx.header_event_type, "ip_address": ctx.ip_address,
                     "client_ip": ctx.client_ip, "errors": ctx.errors}
        return how.function(*(arguments[name] for name in how.arguments))
    assert callable(how)
    return how(ctx)


def _described_fields(ctx: FieldContext) -> dict[str, object]:
    values = {f.name: _described_value(f.how, ctx) for f in CATALOGUE if f.how is not None}
    return {name: value for name, value in values.items() if value is not None}


_GEOS = (None, GeoInfo(city="London", country="United Kingdom", country_iso="GB", continent="Europe",
                       region="England", region_iso="GB-ENG", asn=20712, as_org="Andrews & Arnold Ltd"),
         GeoInfo(country="Japan", asn=7))


def _check_generated(raw: bytes, destination: str | None, header_event_type: str | None,
                     errors: list[str]) -> None:
    try:
        event = decode_event(raw)
    except msgspec.MsgspecError:
        return
    for geo in _GEOS:
        ctx = FieldContext(event, destination=destination, header_event_type=header_event_type, geo=geo,
                           errors=errors)
        expected = _described_fields(ctx)
        got = compute_fields(ctx)
        assert got == expected
        assert list(got) == list(expected)  # catalogue order: the same bytes on the wire
        assert [type(v) for v in got.values()] == [type(v) for v in expected.values()]
        for f in CATALOGUE:
            if f.compute is not None:
                value = f.compute(ctx)
                assert value == expected.get(f.name) and type(value) is type(expected.get(f.name)), f.name


@pytest.mark.parametrize("name", sorted(SEED_EXPECTED))
def test_generated_code_matches_the_descriptions_on_seed_payloads(name: str) -> None:
    _check_generated(seed_payloads()[name], "gitlab-main", None, [])
    _check_generated(seed_payloads()[name], None, "hdr", ["a problem", "another"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_event, st.none() | st.sampled_from(["", "gitlab-main"]), st.none() | st.sampled_from(["", "h"]),
       st.lists(st.text(max_size=5), max_size=2))
def test_generated_code_matches_the_descriptions(event: dict[str, object], destination: str | None,
                                                 header_event_type: str | None, errors: list[str]) -> None:
    _check_generated(msgspec.json.encode(event), destination, header_event_type, errors)


def test_flatten_computes_what_a_field_context_gives() -> None:
    """flatten passes compute_event_fields the parts a FieldContext would hold."""
    raw = seed_payloads()["project_access_token_deleted"]
    record = enrich(raw, header_event_type="h", geo=lambda ip: _GEOS[1])
    ctx = FieldContext(decode_event(raw), destination="gitlab-main", header_event_type="h", geo=_GEOS[1])
    assert record.fields == compute_fields(ctx)
    assert list(record.fields) == list(compute_fields(ctx))


def test_descriptions_name_real_attributes() -> None:
    with pytest.raises(ValueError, match="not an AuditEvent attribute"):
        fields_module.Attr("no_such_attribute")
    with pytest.raises(ValueError, match="not a Details attribute"):
        fields_module.Attr("id", details=True)  # there is no details.id
    with pytest.raises(ValueError, match="not a Details attribute"):
        fields_module.Detail("from")  # the Python attribute is from_
    with pytest.raises(ValueError, match="not a GeoInfo attribute"):
        fields_module.Geo("latitude")
    with pytest.raises(ValueError, match="not a Call argument"):
        fields_module.Call(len, ("ctx",))
    with pytest.raises(ValueError, match="not a part"):
        fields_module.FirstDetail(("add",), "both")


def test_a_function_of_the_context_is_a_field_computation_too() -> None:
    """Anything the descriptions cannot say: a plain function of the FieldContext, called as is."""
    custom = (
        Field("kind_and_type", FieldType.STRING, "d", "s",
              lambda c: f"{c.event.event_type}/{c.client_ip}/{c.geo is not None}"),
        Field("event_id", FieldType.STRING, "d", "s", fields_module.Attr("id")),
    )
    generated, source = fields_module._compile_all(custom)
    event = decode_event(b'{"id": 5, "event_type": "x", "ip_address": "10.0.0.1, 1.2.3.4"}')
    assert generated(event, None, None, "10.0.0.1, 1.2.3.4", "10.0.0.1", None, []) == {
        "kind_and_type": "x/10.0.0.1/False", "event_id": "5"}
    ctx = FieldContext(event, geo=GeoInfo())
    assert custom[0].compute is not None and custom[0].compute(ctx) == "x/10.0.0.1/True"
    assert "compute_event_fields" in source
