"""``make certs``: a test CA and certificates for mutual TLS, with the openssl CLI.

Writes ``ca.pem`` and, for each name, ``NAME.pem`` + ``NAME-key.pem``, good for
serving and for calling (every process of a mesh is both), valid for the
host names and addresses given. Start each process with
``--tls-cert NAME.pem --tls-key NAME-key.pem --tls-ca ca.pem``. For tests and
trials; a real deployment brings its own CA.
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from expertmesh.errors import ExpertmeshError

NAMES = ("node", "router", "client")
HOSTS = ("localhost", "127.0.0.1", "::1")
_DAYS = 825

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = expertmesh
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = {sans}
"""


def write_test_certs(directory: Path, names=NAMES, hosts=HOSTS) -> Path:
    """Write a fresh CA and one certificate per name into ``directory``; returns it.

    Raises:
        ExpertmeshError: openssl is missing or failed.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ExpertmeshError("make certs needs the openssl command")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sans = ", ".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "openssl.cnf"
        config.write_text(_CONFIG.format(sans=sans))
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        ca, ca_key = directory / "ca.pem", Path(tmp) / "ca-key.pem"
        _run(openssl, "req", "-x509", "-config", config, "-extensions", "ca", *key, "-keyout", ca_key,
             "-out", ca, "-days", str(_DAYS), "-subj", "/CN=expertmesh test CA")
        for name in names:
            csr = Path(tmp) / f"{name}.csr"
            _run(openssl, "req", "-new", "-config", config, *key, "-keyout", directory / f"{name}-key.pem",
                 "-out", csr, "-subj", f"/CN={name}")
            _run(openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial",
                 str(secrets.randbits(63)), "-days", str(_DAYS), "-extfile", config, "-extensions", "leaf",
                 "-out", directory / f"{name}.pem")
            (directory / f"{name}-key.pem").chmod(0o600)
    return directory


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _run(*args) -> None:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if done.returncode:
        raise ExpertmeshError(f"openssl {args[1]} failed: {done.stderr.strip().splitlines()[-1:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m expertmesh.testing.certs", description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--name", action="append", default=None, help=f"a certificate to make (default: {', '.join(NAMES)})")
    p.add_argument("--host", action="append", default=[], help="a host name or address the certificates are valid "
                   f"for, besides {', '.join(HOSTS)} (repeat for more)")
    args = p.parse_args(argv)
    try:
        out = write_test_certs(args.directory, args.name or NAMES, HOSTS + tuple(args.host))
    except ExpertmeshError as e:
        print(f"expertmesh certs: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote ca.pem and {', '.join(f'{n}.pem' for n in args.name or NAMES)} (with keys) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
