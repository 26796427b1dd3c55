"""The lab cluster's PKI: one throwaway CA and the certificates its components need.

Made once per ``lab up`` under ``<state dir>/pki`` with ``cryptography`` (a dependency of
ansible-core, so always in the venv). ECDSA P-256 keys: a certificate costs well under a
millisecond, so every simulated node gets its own client certificate (``system:node:<name>``
in ``system:nodes``, what the Node authorizer and NodeRestriction expect of a kubelet).

The service account signing key is the one thing the control plane keeps private: it signs the
tokens of the TokenRequest API (``kubectl create token``), with which the tests act as
restricted users.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# The apiserver's in-cluster names and the first address of the service range it is given.
APISERVER_HOSTS = LOOPBACK_HOSTS + ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                    "kubernetes.default.svc.cluster.local", "10.96.0.1")
VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class KeyPair:
    cert: str
    key: str


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: str, data: bytes, private: bool = False) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _sans(hosts: Sequence[str]) -> List[x509.GeneralName]:
    names: List[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


class ClusterPKI:
    """The CA and the certificates of one lab cluster, in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.ca_cert_path = self.path("ca.crt")
        self._ca_key: Optional[ec.EllipticCurvePrivateKey] = None
        self._ca_cert: Optional[x509.Certificate] = None
        self._node_key: Optional[ec.EllipticCurvePrivateKey] = None

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def create(self) -> "ClusterPKI":
        os.makedirs(self.directory, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpunode-lab-ca")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        _write(self.path("ca.key"), _pem_key(key), private=True)
        self._ca_key, self._ca_cert = key, cert
        sa_key = ec.generate_private_key(ec.SECP256R1())
        _write(self.path("sa.key"), _pem_key(sa_key), private=True)
        _write(self.path("sa.pub"), sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return self

    def load(self) -> "ClusterPKI":
        with open(self.ca_cert_path, "rb") as handle:
            self._ca_cert = x509.load_pem_x509_certificate(handle.read())
        with open(self.path("ca.key"), "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._ca_key = key
        return self

    @property
    def service_account_key(self) -> str:
        return self.path("sa.key")

    @property
    def service_account_pub(self) -> str:
        return self.path("sa.pub")

    def issue(self, name: str, common_name: str, organizations: Tuple[str, ...] = (),
              server_hosts: Sequence[str] = (), client: bool = True,
              key: Optional[ec.EllipticCurvePrivateKey] = None) -> KeyPair:
        """A certificate ``<name>.crt`` / ``<name>.key`` signed by the CA: a client certificate
        (user ``common_name`` in groups ``organizations``) and, with ``server_hosts``, a serving
        certificate for those names and addresses."""
        if self._ca_key is None or self._ca_cert is None:
            raise RuntimeError("ClusterPKI: create() or load() first")
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usages = []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if server_hosts:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                           critical=False)
        )
        if server_hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_sans(server_hosts)), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        pair = KeyPair(self.path(name + ".crt"), self.path(name + ".key"))
        _write(pair.cert, cert.public_bytes(serialization.Encoding.PEM))
        _write(pair.key, _pem_key(key), private=True)
        return pair

    def node_client(self, node: str) -> KeyPair:
        """The node's kubelet client certificate. The nodes share one key (each has its own
        certificate and identity), which keeps a 1,000-node fleet's PKI to a second."""
        if self._node_key is None:
            self._node_key = ec.generate_private_key(ec.SECP256R1())
        os.makedirs(self.path("nodes"), exist_ok=True)
        return self.issue(os.path.join("nodes", node), "system:node:%s" % node, ("system:nodes",),
                          key=self._node_key)
