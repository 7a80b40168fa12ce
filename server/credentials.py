"""Credentials for a test federation: a CA, the SuperLink's TLS certificate, site keys.

    python -m server.credentials OUT_DIR --sites hospital-a hospital-b hospital-c \
        [--host coordinator.example.org] [--ip 10.0.0.5]

writes, with `openssl` and `ssh-keygen` (both must be on PATH):

    OUT_DIR/ca.crt, ca.key            a self-signed CA (give ca.crt to every site)
    OUT_DIR/server.pem, server.key    the SuperLink's certificate, signed by the CA, with
                                      SAN DNS:localhost, IP:127.0.0.1 (+ --host / --ip)
    OUT_DIR/keys/SITE, SITE.pub       one ECDSA P-384 key pair per site (`ssh-keygen -t ecdsa
                                      -b 384`): the site keeps SITE, the coordinator
                                      registers SITE.pub with `flwr supernode register`

OUT_DIR (relative or absolute) must not exist or be empty; it appears only once complete.
For tests and pilots. A real federation's TLS certificate comes from the coordinator's own
CA, and each site makes its own key pair and sends only the `.pub` file.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FederationCredentials:
    """Paths of what `make_credentials` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, Path]  # site id -> private key; the public key is the same path + ".pub"


def _run(*command: str, cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed: {result.stderr.strip()[-2000:]}")


def make_credentials(
    out: Path, sites: list[str], hosts: tuple[str, ...] = (), ips: tuple[str, ...] = (), days: int = 30
) -> FederationCredentials:
    """Write a CA, a SuperLink certificate for localhost/127.0.0.1 (+ hosts, ips) and site keys.

    Everything is made in a temporary folder beside `out` and renamed to `out` only when
    complete, so a failure leaves no half-made folder. `out` must not exist or be empty:
    replacing a CA would silently invalidate every site's trust in the coordinator.
    """
    for tool in ("openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` is not on PATH")
    if len(set(sites)) != len(sites) or any(not s or "/" in s or s.startswith(".") for s in sites):
        raise ValueError(f"site ids must be distinct file names, got {sites}")
    for ip in ips:
        ipaddress.ip_address(ip)  # a ValueError that names the bad address, not an openssl one
    # Absolute: the tools run with cwd=the temporary folder, and the caller's path may be relative.
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; remove it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        site_keys = _write_credentials(work, sites, hosts, ips, days)
        os.replace(work, out)  # atomic; also replaces an empty `out`
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return FederationCredentials(
        out / "ca.crt", out / "server.pem", out / "server.key",
        {site: out / "keys" / key.name for site, key in site_keys.items()},
    )


def _write_credentials(
    work: Path, sites: list[str], hosts: tuple[str, ...], ips: tuple[str, ...], days: int
) -> dict[str, Path]:
    (work / "keys").mkdir()
    san = ",".join(["DNS:localhost", "IP:127.0.0.1", *(f"DNS:{h}" for h in hosts), *(f"IP:{i}" for i in ips)])
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", str(days),
         "-subj", "/CN=fedvid test federation CA", cwd=work)
    _run("openssl", "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=work)
    (work / "server.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.pem", "-days", str(days), "-extfile", "server.ext", cwd=work)
    for leftover in ("server.csr", "server.ext", "ca.srl"):
        (work / leftover).unlink(missing_ok=True)
    for secret in ("ca.key", "server.key"):
        (work / secret).chmod(0o600)
    site_keys = {}
    for site in sites:
        key = work / "keys" / site
        _run("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", site, "-f", str(key), cwd=work)
        site_keys[site] = key
    return site_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.credentials", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write into")
    parser.add_argument("--sites", nargs="+", required=True, help="site ids, one key pair each")
    parser.add_argument("--host", action="append", default=[], help="extra DNS name of the SuperLink")
    parser.add_argument("--ip", action="append", default=[], help="extra IP address of the SuperLink")
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args(argv)
    try:
        creds = make_credentials(args.out, args.sites, tuple(args.host), tuple(args.ip), args.days)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"python -m server.credentials: {err}", file=sys.stderr)
        return 1
    print(f"CA {creds.ca_cert}; SuperLink certificate {creds.server_cert} (key {creds.server_key})")
    for site, key in creds.site_keys.items():
        print(f"site {site}: private key {key} (stays at the site), public key {key}.pub (register it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
