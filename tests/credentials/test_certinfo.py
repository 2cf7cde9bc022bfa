"""Summaries of certificates and bundles: public data only, never a key."""

from __future__ import annotations

import datetime as dt
import json

from cryptography.hazmat.primitives import hashes

from sidecar.credentials.certinfo import (
    bundle_report,
    days_left,
    fingerprint,
    identity_summary,
    summarize,
)
from sidecar.credentials.identity import read_bundle, read_bundle_bytes
from tests.conftest import PKI


def test_summarize_server_certificate(pki: PKI):
    cert = pki.server.cert
    now = cert.not_valid_after_utc - dt.timedelta(days=10, hours=1)
    s = summarize(cert, now)
    assert s.subject == "CN=localhost,O=mtls-sidecar test"
    assert s.issuer == "CN=mtls-sidecar test root CA,O=mtls-sidecar test"
    assert s.serial == format(cert.serial_number, "X")
    assert int(s.serial, 16) == cert.serial_number
    assert s.sha256 == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert len(s.sha256.split(":")) == 32
    assert s.sans == ("DNS:localhost", "IP:127.0.0.1", "IP:::1")
    assert s.not_before == cert.not_valid_before_utc.isoformat()
    assert s.not_after == cert.not_valid_after_utc.isoformat()
    assert s.days_left == 10
    assert (s.expired, s.not_yet_valid, s.is_ca, s.self_signed) == (False, False, False, False)


def test_summarize_ca_and_client(pki: PKI):
    root = summarize(pki.root.cert)
    assert (root.is_ca, root.self_signed, root.sans) == (True, True, ())
    assert root.subject == root.issuer
    client = summarize(pki.client.cert)
    assert client.subject == "CN=sidecar-technical-user,O=SAP Cloud Platform Clients"
    assert client.issuer == "CN=mtls-sidecar test intermediate CA,O=mtls-sidecar test"
    assert (client.is_ca, client.self_signed, client.sans) == (False, False, ())
    assert 360 <= client.days_left <= 365


def test_validity_flags(pki: PKI):
    cert = pki.client.cert
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert summarize(cert, after).expired is True
    assert summarize(cert, after).days_left == 0
    assert summarize(cert, after + dt.timedelta(days=3)).days_left == -3
    assert summarize(cert, after - dt.timedelta(seconds=1)).expired is False
    early = summarize(cert, before - dt.timedelta(seconds=1))
    assert (early.not_yet_valid, early.expired) == (True, False)
    assert summarize(cert, before).not_yet_valid is False
    assert days_left(cert, after - dt.timedelta(days=2, seconds=1)) == 2


def test_summary_json(pki: PKI):
    d = summarize(pki.server.cert).to_json()
    assert d["sans"] == ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    assert d["sha256"] == fingerprint(pki.server.cert)
    json.dumps(d)


def test_bundle_report_for_btp_bundle(pki: PKI, bundle_file):
    report = bundle_report(read_bundle(pem=bundle_file))
    assert report["source"] == str(bundle_file)
    assert report["chain_length"] == 3
    subjects = [c["subject"] for c in report["certificates"]]
    assert subjects == [
        "CN=sidecar-technical-user,O=SAP Cloud Platform Clients",
        "CN=mtls-sidecar test intermediate CA,O=mtls-sidecar test",
        "CN=mtls-sidecar test root CA,O=mtls-sidecar test",
    ]
    assert [c["sha256"] for c in report["certificates"]] == [
        fingerprint(c) for c in (pki.client.cert, pki.intermediate.cert, pki.root.cert)
    ]
    assert report["key_present"] is True
    assert report["key_matches_leaf"] is True
    assert (report["leaf_expired"], report["leaf_not_yet_valid"]) == (False, False)
    assert report["not_in_chain"] == []
    assert report["warnings"] == []
    text = json.dumps(report)
    assert "PRIVATE KEY" not in text
    assert "BEGIN" not in text


def test_bundle_report_for_mismatched_key(pki: PKI):
    bundle = read_bundle_bytes(pki.server.key_pem() + pki.client.chain_pem(), source="mixed.pem")
    report = bundle_report(bundle)
    assert report["key_present"] is True
    assert report["key_matches_leaf"] is False
    assert report["chain_length"] == 3
    assert "PRIVATE KEY" not in json.dumps(report)


def test_bundle_report_without_key_and_with_extra_certificate(pki: PKI):
    bundle = read_bundle_bytes(pki.client.chain_pem() + pki.other_ca.cert_pem(), source="c.pem")
    report = bundle_report(bundle)
    assert (report["key_present"], report["key_matches_leaf"]) == (False, None)
    assert [c["subject"] for c in report["not_in_chain"]] == [
        "CN=some other CA,O=mtls-sidecar test"
    ]
    assert any("not part of the leaf's chain" in w for w in report["warnings"])


def test_bundle_report_flags_an_expired_leaf(pki: PKI):
    bundle = read_bundle_bytes(pki.client.btp_bundle(), source="b.pem")
    report = bundle_report(bundle, now=pki.client.cert.not_valid_after_utc + dt.timedelta(days=1))
    assert report["leaf_expired"] is True
    assert report["certificates"][0]["days_left"] == -1


def test_identity_summary(pki: PKI, bundle_file):
    identity = read_bundle(pem=bundle_file).identity()
    s = identity_summary(identity)
    assert s["subject"] == "CN=sidecar-technical-user,O=SAP Cloud Platform Clients"
    assert s["issuer"] == "CN=mtls-sidecar test intermediate CA,O=mtls-sidecar test"
    assert s["sha256"] == fingerprint(pki.client.cert)
    assert s["chain_length"] == 3
    assert s["key_matches"] is True
    assert "PRIVATE KEY" not in json.dumps(s)
