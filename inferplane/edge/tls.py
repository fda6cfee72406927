"""TLS for both ports: server contexts, certificate reload without a restart, client identities.

Each port listens with one `ssl.SSLContext` for its whole life (`CertReloader.context`). Its SNI
callback, which OpenSSL runs on every handshake (with or without a server name), moves the
handshake onto the newest good context built from the files. Loading a new chain into the
listening context itself (`load_cert_chain`) would also reach new handshakes, but it cannot drop
a CA from the verify store (`load_verify_locations` only adds), and a mismatched key leaves that
context with the new certificate and no key, so every later handshake would fail. Building a whole
new context checks the files (chain, key match, CA bundle) before anything serves them.

`cert_identity` turns a verified client certificate (`getpeercert()`) into the subject, common name
and SANs that the access rules match.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import logging
import signal
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("inferplane.tls")

HTTP_ALPN = ("http/1.1",)
GRPC_ALPN = ("h2",)  # grpcio clients refuse a server that does not select h2
RELOAD_INTERVAL_S = 1.0


@dataclass(frozen=True)
class TlsFiles:
    cert: str  # PEM chain: the leaf first
    key: str
    client_ca: str | None = None  # CA bundle client certificates must chain to
    require_client_cert: bool = False  # refuse handshakes without one (needs client_ca)

    def paths(self) -> tuple[str, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


class TlsFileError(ValueError):
    """A certificate, key or CA file that cannot be served (unreadable, not PEM, mismatched)."""


def server_context(files: TlsFiles, alpn: Sequence[str]) -> ssl.SSLContext:
    """A server context from the files as they are now; TlsFileError when they are unreadable,
    broken or the key does not match the certificate."""
    # Not create_default_context(CLIENT_AUTH): it would trust the system CAs for client certs.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(f"certificate {files.cert} with key {files.key}: {exc}") from exc
    if files.client_ca:
        try:
            ctx.load_verify_locations(cafile=files.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(f"client CA bundle {files.client_ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if files.require_client_cert else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def describe_cert(path: str) -> str:
    """'CN=..., serial 0x..., valid until ...' of the first certificate in a PEM file."""
    from cryptography import x509

    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    until = cert.not_valid_after_utc
    text = f"{cert.subject.rfc4514_string()}, serial {cert.serial_number:#x}, valid until {until}"
    if until < datetime.datetime.now(datetime.UTC):
        log.warning("TLS certificate %s has EXPIRED: clients will refuse it", path)
    return text


_Signature = tuple[bytes | None, ...]  # the files' sha256, None for one that cannot be read


class CertReloader:
    """The listening contexts of the ports, kept on the newest good certificate files.

    `run()` compares the files' contents (a few KB, by sha256) every `interval_s`: unlike mtimes
    this sees two same-sized writes within one clock tick, and a swapped symlink as well. SIGHUP
    (`install_sighup`) checks at once. A change builds fresh
    contexts; if that fails the error is logged and the current certificate keeps being served."""

    def __init__(self, files: TlsFiles, interval_s: float = RELOAD_INTERVAL_S) -> None:
        self.files = files
        self.interval_s = interval_s
        self._listening: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._current: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._seen = self._signature()
        self.reloads = 0  # successful reloads since start (tests and logs)
        log.info("TLS certificate %s", describe_cert(files.cert))

    def context(self, alpn: Sequence[str]) -> ssl.SSLContext:
        """The context a port listens with (one per ALPN list); raises if the files are bad."""
        key = tuple(alpn)
        ctx = self._listening.get(key)
        if ctx is None:
            ctx = server_context(self.files, key)
            current = self._current

            def switch(sslobj: Any, server_name: str | None, listening: ssl.SSLContext) -> None:
                newest = current[key]
                if newest is not listening:
                    sslobj.context = newest  # the handshake goes on with the new cert and CAs

            ctx.sni_callback = switch
            self._listening[key] = ctx
            current[key] = ctx
        return ctx

    def _signature(self) -> _Signature:
        out: list[bytes | None] = []
        for path in self.files.paths():
            try:
                with open(path, "rb") as f:
                    out.append(hashlib.sha256(f.read()).digest())
            except OSError:
                out.append(None)
        return tuple(out)

    def check(self, force: bool = False) -> bool:
        """Reload if the files changed since the last attempt (or `force`); True if reloaded."""
        signature = self._signature()
        if signature == self._seen and not force:
            return False
        # Remember the attempt even when it fails: a broken file is reported once, not every
        # second, and retried when it changes again (e.g. its key is written after it).
        self._seen = signature
        try:
            fresh = {alpn: server_context(self.files, alpn) for alpn in self._listening}
            described = describe_cert(self.files.cert)
        except (OSError, ValueError) as exc:  # TlsFileError, or a leaf cryptography cannot read
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        self._current.update(fresh)
        self.reloads += 1
        ca = f"; client CA {self.files.client_ca}" if self.files.client_ca else ""
        log.info("TLS reloaded: certificate %s from %s%s", described, self.files.cert, ca)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.check()

    @contextlib.contextmanager
    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """SIGHUP reloads at once (where the platform has it), for as long as the block runs."""
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None:
            yield
            return
        loop.add_signal_handler(sighup, self.check, True)
        try:
            yield
        finally:
            loop.remove_signal_handler(sighup)


# --- client identities -------------------------------------------------------------------------

# RFC 4514 short names; other attributes keep the name Python's ssl module gives them.
_SHORT = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
_SAN_PREFIX = {"DNS": "DNS", "URI": "URI", "email": "email", "IP Address": "IP"}


@dataclass(frozen=True)
class CertIdentity:
    """Who a verified client certificate names. `sans` are written "DNS:host", "URI:spiffe://x",
    "email:a@b", "IP:10.0.0.1" (IPv6 compressed); other SAN kinds are left out."""

    subject: str  # RFC 4514 order (most specific first): "CN=alice,O=acme"
    common_name: str | None
    sans: tuple[str, ...]


def _escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif ord(ch) < 0x20:
            out.append(f"\\{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def cert_identity(peercert: dict[str, Any]) -> CertIdentity:
    """The identity in `ssl` `getpeercert()` form (as `peer_cert` reaches the protocols)."""
    rdns: list[str] = []
    common_name: str | None = None
    for rdn in peercert.get("subject", ()):
        parts = []
        for name, value in rdn:
            if name == "commonName":  # ASN.1 order runs from the root: the last is the leaf's
                common_name = value
            parts.append(f"{_SHORT.get(name, name)}={_escape(value)}")
        rdns.append("+".join(parts))
    sans: list[str] = []
    for kind, value in peercert.get("subjectAltName", ()):
        prefix = _SAN_PREFIX.get(kind)
        if prefix is None:
            continue
        if prefix == "IP":
            with contextlib.suppress(ValueError):
                value = str(ipaddress.ip_address(value.strip()))
        sans.append(f"{prefix}:{value}")
    return CertIdentity(",".join(reversed(rdns)), common_name, tuple(sans))


__all__ = [
    "GRPC_ALPN",
    "HTTP_ALPN",
    "CertIdentity",
    "CertReloader",
    "TlsFileError",
    "TlsFiles",
    "cert_identity",
    "server_context",
]
