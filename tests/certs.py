"""Helpers (no tests): X.509 certificates made for a test with the `openssl` command line (no Python dependency).

    ca = make_ca(tmp_path, "test-ca")
    server = make_cert(tmp_path, ca, "server", dns=["localhost"], ips=["127.0.0.1"])   # .cert, .key paths
    client = make_cert(tmp_path, ca, "client", client=True)

Keys are EC P-256 (fast to make: a few milliseconds each), or RSA 2048 with `rsa` (OPC UA's Basic256Sha256 takes
no other); certificates valid for a day. `uris` adds URI subjectAltNames (an OPC UA application certificate names its
application URI so) and the key usages OPC UA wants of one.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HAVE_OPENSSL", "Pair", "make_ca", "make_cert"]

HAVE_OPENSSL = shutil.which("openssl") is not None


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _run(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()}")


def _key(path: Path, rsa: bool = False) -> None:
    if rsa:
        _run("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(path))
    else:
        _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def make_ca(folder: Path, name: str = "test-ca", rsa: bool = False) -> Pair:
    """A self-signed certificate authority."""
    pair = Pair(folder / f"{name}.crt", folder / f"{name}.key")
    _key(pair.key, rsa)
    _run("req", "-x509", "-new", "-key", str(pair.key), "-out", str(pair.cert), "-days", "1", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return pair


def make_cert(folder: Path, ca: Pair, name: str, dns: list[str] | None = None, ips: list[str] | None = None,
              client: bool = False, uris: list[str] | None = None, rsa: bool = False) -> Pair:
    """A leaf certificate signed by `ca`: a server's (names in subjectAltName) or, with `client`, a client's; with
    `uris`, an OPC UA application's (server and client both)."""
    pair = Pair(folder / f"{name}.crt", folder / f"{name}.key")
    _key(pair.key, rsa)
    csr = folder / f"{name}.csr"
    _run("req", "-new", "-key", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}")
    ext = folder / f"{name}.ext"
    alt = [f"URI:{u}" for u in uris or []] + [f"DNS:{d}" for d in dns or []] + [f"IP:{i}" for i in ips or []]
    usage = "serverAuth,clientAuth" if uris else "clientAuth" if client else "serverAuth"
    lines = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}"]
    if uris:
        lines.append("keyUsage=critical,digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment")
    if alt:
        lines.append("subjectAltName=" + ",".join(alt))
    ext.write_text("\n".join(lines) + "\n")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
         "-out", str(pair.cert), "-days", "1", "-extfile", str(ext))
    return pair
